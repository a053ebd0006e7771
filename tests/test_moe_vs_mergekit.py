"""MoE assembly against mergekit-moe 0.1.5: same tensor names, shapes, dtypes and values, bit for bit.

The stand-ins have the depth of the models the seed recipe names (32 layers for the Swallow
Llama-2 family) at tiny width. mergekit-moe runs once per session over every case, through its
own command-line entry point, with `--random-seed`; with the same seed our random routers and
expert noise are mergekit's too, so every tensor is compared, routers included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from standins import make_finetune, make_standin, make_tokenizer  # noqa: E402

from search.engine import recipe as recipes  # noqa: E402
from search.engine.errors import UserError  # noqa: E402
from search.engine.moe import build_moe  # noqa: E402
from search.engine.sources import load_source  # noqa: E402

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"  # beside the repository
SWALLOW = SEEDS / "swallow-moe-4x7b.yml"
SEED = 1234

# ---- stand-ins ----------------------------------------------------------------------


def make_tied_llama(path: Path, num_layers: int, seed: int) -> Path:
    """A Llama with tied embeddings (no lm_head stored), which the stand-in helper does not make."""
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Name as written in the recipes -> local folder."""
    root = tmp_path_factory.mktemp("moe_zoo")
    names = {}
    # The Swallow family: a Llama-2-shaped base (32 layers) and four fine-tunes of it.
    names["tokyotech-llm/Swallow-7b-hf"] = make_standin(root / "swallow", "llama", 32, seed=0)
    swallow_experts = [
        "tokyotech-llm/Swallow-7b-instruct-hf",
        "nitky/Superswallow-7b-v0.1",
        "nitky/Superswallow-7b-v0.2",
        "nitky/Superswallow-7b-v0.3",
    ]
    for i, name in enumerate(swallow_experts):
        names[name] = make_finetune(root / f"swallow_e{i}", names["tokyotech-llm/Swallow-7b-hf"], seed=10 + i)
    names["mistral"] = make_standin(root / "mistral", "mistral", 6, seed=5)
    for i in range(3):
        names[f"mistral_e{i}"] = make_finetune(root / f"mistral_e{i}", names["mistral"], seed=20 + i, scale=0.02)
    # A base whose config.json names no dtype (tensors keep their own) and a float32 expert.
    names["mistral_nodtype"] = shutil.copytree(names["mistral"], root / "mistral_nodtype")
    cfg = json.loads((names["mistral_nodtype"] / "config.json").read_text())
    del cfg["dtype"]
    (names["mistral_nodtype"] / "config.json").write_text(json.dumps(cfg))
    f32 = transformers.AutoModelForCausalLM.from_pretrained(names["mistral_e2"], dtype=torch.float32)
    names["mistral_f32"] = root / "mistral_f32"
    f32.save_pretrained(names["mistral_f32"])
    names["tied"] = make_tied_llama(root / "tied", 4, seed=6)
    for i in range(2):
        names[f"tied_e{i}"] = make_finetune(root / f"tied_e{i}", names["tied"], seed=30 + i)
    # Models that do not fit a Llama base of 32 layers, width 64.
    names["qwen"] = make_standin(root / "qwen", "qwen2", 32, seed=7)
    names["narrow"] = make_standin(root / "narrow", "llama", 32, seed=8, hidden=32)
    names["shallow"] = make_standin(root / "shallow", "llama", 8, seed=9)
    # Bases of the other layouts: Qwen3 (Qwen3-MoE) and Qwen2 (Qwen2-MoE, with a shared expert).
    for kind, seed in (("qwen3", 40), ("qwen2", 50)):
        names[kind] = make_standin(root / kind, kind, 4, seed=seed)
        for i in range(3):
            names[f"{kind}_e{i}"] = make_finetune(root / f"{kind}_e{i}", names[kind], seed=seed + 1 + i, scale=0.02)
    return names


# ---- cases: recipe text with model names as above -----------------------------------

S = ["tokyotech-llm/Swallow-7b-instruct-hf", "nitky/Superswallow-7b-v0.1", "nitky/Superswallow-7b-v0.2"]


def _moe(base: str, experts: list[dict], **top) -> str:
    return yaml.safe_dump({"base_model": base, **top, "experts": experts}, sort_keys=False)


CASES = {
    "swallow_seed": SWALLOW.read_text(),
    "uniform_random": _moe(
        "tokyotech-llm/Swallow-7b-hf",
        [{"source_model": S[0], "positive_prompts": ["chat"]}, {"source_model": S[1], "positive_prompts": ["code"]}],
        gate_mode="uniform_random", dtype="float32", experts_per_token=1,
    ),
    "cheap_embed": _moe(
        "tokyotech-llm/Swallow-7b-hf",
        [
            {"source_model": S[0], "positive_prompts": ["hello there", "how are you?"], "negative_prompts": ["def f(x):"]},
            {"source_model": S[1], "positive_prompts": ["def f(x):", "import os"]},
            {"source_model": S[2], "positive_prompts": ["2 + 2 = 4"], "negative_prompts": ["hello", "import os"]},
        ],
        gate_mode="cheap_embed",
    ),
    "hidden": _moe(
        "tokyotech-llm/Swallow-7b-hf",
        [
            {"source_model": S[0], "positive_prompts": ["hello there", "how are you today?"], "negative_prompts": ["def f(x):"]},
            {"source_model": S[1], "positive_prompts": ["def f(x):", "import os"], "negative_prompts": ["hi"]},
            {"source_model": S[2], "positive_prompts": ["2 + 2 = 4", "solve for x"]},
        ],
        gate_mode="hidden", dtype="float16",
    ),
    "mistral_hidden_noise": _moe(
        "mistral",
        [
            {"source_model": "mistral_e0", "positive_prompts": ["abc"], "noise_scale": 0.01},
            {"source_model": "mistral_e1", "positive_prompts": ["xyz"], "negative_prompts": ["abc"], "residual_scale": 0.5},
            {"source_model": "mistral_e2", "positive_prompts": ["123"], "noise_scale": 0.003, "residual_scale": 1.5},
        ],
        gate_mode="hidden", dtype="bfloat16",
    ),
    "mistral_random_noise": _moe(
        "mistral",
        [
            {"source_model": "mistral_e0", "noise_scale": 0.01},
            {"source_model": "mistral_e2", "residual_scale": 0.25},
            {"source_model": "mistral_e1", "noise_scale": 0.02, "residual_scale": 2.0},
            {"source_model": "mistral_e0"},
        ],
        gate_mode="random", experts_per_token=3,
    ),
    "no_dtype_mixed_experts": _moe(
        "mistral_nodtype",
        [{"source_model": "mistral_e0"}, {"source_model": "mistral_f32", "noise_scale": 0.01}],
        gate_mode="random", experts_per_token=1,
    ),
    "tied_hidden": _moe(
        "tied",
        [{"source_model": "tied_e0", "positive_prompts": ["aaa"]}, {"source_model": "tied_e1", "positive_prompts": ["zzz"]}],
        gate_mode="hidden", dtype="float32",
    ),
}

# The other layouts: Qwen3-MoE, Qwen2-MoE (one shared expert) and DeepSeek-MoE (one ungated shared expert).
OTHER_LAYOUTS = {
    "qwen3_moe_hidden_noise": _moe(
        "qwen3",
        [
            {"source_model": "qwen3_e0", "positive_prompts": ["abc"], "noise_scale": 0.01},
            {"source_model": "qwen3_e1", "positive_prompts": ["xyz"], "residual_scale": 0.5},
            {"source_model": "qwen3_e2", "positive_prompts": ["123"], "noise_scale": 0.003, "residual_scale": 1.5},
        ],
        gate_mode="hidden", dtype="bfloat16",
    ),
    "qwen3_moe_random": _moe(
        "qwen3", [{"source_model": f"qwen3_e{i}"} for i in range(3)], gate_mode="random", experts_per_token=1,
    ),
    "qwen2_moe_random_shared_noise": _moe(
        "qwen2",
        [{"source_model": "qwen2_e0", "noise_scale": 0.01}, {"source_model": "qwen2_e1"}],
        gate_mode="random", shared_experts=[{"source_model": "qwen2_e1", "noise_scale": 0.02, "residual_scale": 0.5}],
    ),
    # a Llama base (no attention biases: mergekit writes zeros) routed by embeddings, shared expert gated too
    "qwen2_moe_on_llama_cheap_embed": _moe(
        "tied",
        [{"source_model": "tied_e0", "positive_prompts": ["aaa"]}, {"source_model": "tied_e1", "positive_prompts": ["zzz"]}],
        gate_mode="cheap_embed", architecture="qwen", dtype="float32",
        shared_experts=[{"source_model": "tied_e0", "positive_prompts": ["mmm"], "negative_prompts": ["aaa"]}],
    ),
    # random gates are drawn for the shared expert too, though DeepSeek does not gate it
    "deepseek_random_shared": _moe(
        "mistral",
        [{"source_model": "mistral_e0", "noise_scale": 0.01}, {"source_model": "mistral_e1"}],
        gate_mode="random", shared_experts=[{"source_model": "mistral", "noise_scale": 0.01}],
    ),
    "deepseek_named_hidden": _moe(
        "mistral",
        [{"source_model": "mistral_e0", "positive_prompts": ["abc"]}, {"source_model": "mistral_e1", "positive_prompts": ["xyz"]}],
        gate_mode="hidden", architecture="deepseek", dtype="float16",
    ),
}
LAYOUT_OF = {"qwen3": "Qwen3MoeForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "deepseek": "DeepseekForCausalLM"}
CASES.update(OTHER_LAYOUTS)

# A gate mode mergekit runs though its schema does not list it (nor does ours, yet).
HIDDEN_AVG = CASES["hidden"].replace("gate_mode: hidden", "gate_mode: hidden_avg")

# Configs mergekit-moe refuses; we refuse them too, naming the field.
REFUSED = {
    "uniform_random_without_prompts": (
        _moe("tokyotech-llm/Swallow-7b-hf", [{"source_model": s} for s in S], gate_mode="uniform_random"),
        "experts[0].positive_prompts",
    ),
    "same_prompts_everywhere": (
        _moe(
            "tokyotech-llm/Swallow-7b-hf",
            [{"source_model": s, "positive_prompts": ["same"]} for s in S],
            gate_mode="cheap_embed",
        ),
        "experts:",
    ),
    "same_expert_everywhere": (
        _moe(
            "tokyotech-llm/Swallow-7b-hf",
            [{"source_model": S[0], "positive_prompts": [p]} for p in ("a", "b")],
            gate_mode="cheap_embed",
        ),
        "experts:",
    ),
    "qwen_expert": (
        _moe("tokyotech-llm/Swallow-7b-hf", [{"source_model": S[0]}, {"source_model": "qwen"}], gate_mode="random"),
        "experts[1].source_model",
    ),
    "mistral_expert_on_llama": (
        _moe("tokyotech-llm/Swallow-7b-hf", [{"source_model": S[0]}, {"source_model": "mistral_e0"}], gate_mode="random"),
        "experts[1].source_model",
    ),
    "qwen2_base_without_shared_expert": (
        _moe("qwen2", [{"source_model": "qwen2_e0"}, {"source_model": "qwen2_e1"}], gate_mode="random"),
        "base_model: no MoE layout",
    ),
    "two_shared_experts": (
        _moe("mistral", [{"source_model": "mistral_e0"}, {"source_model": "mistral_e1"}], gate_mode="random",
             shared_experts=[{"source_model": "mistral_e2"}, {"source_model": "mistral_e0"}]),
        "shared_experts: no MoE layout",
    ),
    # mergekit-moe reads a shared expert only from the base's or an expert's model (else it crashes)
    "shared_expert_of_another_model": (
        _moe("mistral", [{"source_model": "mistral_e0"}, {"source_model": "mistral_e1"}], gate_mode="random",
             shared_experts=[{"source_model": "mistral_e2"}]),
        "shared_experts[0].source_model",
    ),
    "mixtral_named_with_a_shared_expert": (
        _moe("mistral", [{"source_model": "mistral_e0"}, {"source_model": "mistral_e1"}], gate_mode="random",
             architecture="mixtral", shared_experts=[{"source_model": "mistral_e2"}]),
        "shared_experts: no MoE layout",
    ),
}


def _mapped(text: str, zoo: dict[str, Path]) -> str:
    """The recipe with every model name replaced by its local folder, for mergekit."""
    data = yaml.safe_load(text)
    data["base_model"] = str(zoo[data["base_model"]])
    for e in data["experts"] + data.get("shared_experts", []):
        e["source_model"] = str(zoo[e["source_model"]])
    return yaml.safe_dump(data, sort_keys=False)


# mergekit-moe's console-script entry point, called once per case in one process (its import
# costs seconds; its work per case is milliseconds). Each call gets the CLI's own arguments.
_DRIVER = """
import json, sys
from mergekit.scripts.moe import main
codes = {}
for name, cfg, out in json.loads(sys.argv[1]):
    try:
        main([cfg, out, "--random-seed", "%d", "--device", "cpu", "--quiet"], standalone_mode=False)
        codes[name] = 0
    except SystemExit as e:
        codes[name] = e.code
    except Exception as e:  # mergekit-moe crashes on some configs it accepts (a shared expert of another model)
        codes[name] = repr(e)
print(json.dumps(codes))
""" % SEED


@pytest.fixture(scope="session")
def mergekit_outputs(zoo, tmp_path_factory) -> dict[str, Path | int]:
    """Case name -> mergekit-moe's output folder, or its exit code when it refused the config."""
    root = tmp_path_factory.mktemp("mergekit_moe")
    jobs = []
    for name, text in {**CASES, "hidden_avg": HIDDEN_AVG, **{k: v[0] for k, v in REFUSED.items()}}.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(_mapped(text, zoo))
        jobs.append((name, str(cfg), str(root / name)))
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (root / name if code == 0 else code) for name, code in codes.items()}


@pytest.fixture(scope="session")
def sources(zoo):
    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_source(name, zoo[name])
        return cache[name]

    return load


def ours(text: str, sources, seed: int | None = SEED):
    (recipe,) = recipes.loads(text)
    return build_moe(recipe, sources, seed, "cpu")


@pytest.fixture(scope="session")
def built(sources):
    """Case name -> our (config, tensors), built once per session."""
    cache = {}

    def get(case: str):
        if case not in cache:
            cache[case] = ours(CASES[case], sources)
        return cache[case]

    return get


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# ---- the comparisons ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_equal_mergekit(case, built, mergekit_outputs):
    _, got = built(case)
    want = read_folder(mergekit_outputs[case])
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
        assert torch.equal(g, w), f"{case}: {name} differs"


def test_hidden_avg_equals_mergekit(sources, built, mergekit_outputs):
    (recipe,) = recipes.loads(CASES["hidden"])
    _, got = build_moe(recipe.model_copy(update={"gate_mode": "hidden_avg"}), sources, SEED, "cpu")
    want = read_folder(mergekit_outputs["hidden_avg"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    _, last = built("hidden")
    assert not torch.equal(got["model.layers.3.mlp.gate.weight"], last["model.layers.3.mlp.gate.weight"])


def mergekit_config(folder: Path) -> dict:
    """mergekit-moe's config.json, less the `_name_or_path` it writes for a DeepSeek-MoE (the base's folder on the
    machine that merged it): a config we write names no folder of the machine."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("_name_or_path", None)
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_config_equals_mergekit(case, built, mergekit_outputs):
    config, _ = built(case)
    assert config == mergekit_config(mergekit_outputs[case])
    layout = next((LAYOUT_OF[k] for k in LAYOUT_OF if case.startswith(k)), "MixtralForCausalLM")
    assert config["architectures"] == [layout]
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    assert experts == len(yaml.safe_load(CASES[case])["experts"])


def test_swallow_layout(built, sources):
    """The seed recipe: 32 Llama layers, 4 experts, top-2, bf16, experts fused as transformers 5 holds them."""
    config, got = built("swallow_seed")
    assert (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"]) == (32, 4, 2)
    assert config["model_type"] == "mixtral" and config["sliding_window"] is None
    assert got["model.layers.31.mlp.experts.gate_up_proj"].shape == (4, 2 * 128, 64)
    assert got["model.layers.31.mlp.experts.down_proj"].shape == (4, 64, 128)
    assert got["model.layers.0.mlp.gate.weight"].shape == (4, 64)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    # Expert 2 of layer 5 is Superswallow v0.2's MLP of layer 5, gate rows over up rows.
    e2 = sources("nitky/Superswallow-7b-v0.2").tensors
    gate_up = got["model.layers.5.mlp.experts.gate_up_proj"][2]
    assert torch.equal(gate_up[:128], e2["model.layers.5.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[128:], e2["model.layers.5.mlp.up_proj.weight"])


def test_random_routers_follow_the_seed(sources):
    """Without `--random-seed` mergekit's routers are irreproducible; with one, they are ours. Other seeds differ."""
    _, a = ours(SWALLOW.read_text(), sources, seed=1)
    _, b = ours(SWALLOW.read_text(), sources, seed=1)
    _, c = ours(SWALLOW.read_text(), sources, seed=2)
    router = "model.layers.7.mlp.gate.weight"
    assert torch.equal(a[router], b[router])
    assert not torch.equal(a[router], c[router])
    assert torch.equal(a["model.layers.7.mlp.experts.down_proj"], c["model.layers.7.mlp.experts.down_proj"])


def test_base_tensors_are_aliased_not_copied(built, sources):
    """Unchanged base tensors are the resident ones; cast ones are cast once per source, not per build."""
    name = "model.layers.3.self_attn.q_proj.weight"
    _, got = built("swallow_seed")  # bf16 from bf16
    assert got[name].data_ptr() == sources("tokyotech-llm/Swallow-7b-hf").tensors[name].data_ptr()
    _, first = built("hidden")  # float16 from bf16
    _, again = ours(CASES["hidden"], sources)
    assert first[name].dtype == torch.float16 and first[name].data_ptr() == again[name].data_ptr()


def test_names_are_transformers_mixtral_parameters(built):
    """What mergekit writes is exactly a MixtralForCausalLM's state dict: it loads with strict=True."""
    config, tensors = built("swallow_seed")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize(
    "case", ["cheap_embed", "mistral_hidden_noise", "tied_hidden", "qwen3_moe_hidden_noise", "qwen2_moe_random_shared_noise"]
)
def test_output_loads_in_transformers_and_runs(case, built, mergekit_outputs, tmp_path):
    """Written as mergekit writes it, our output loads in transformers with every tensor read
    from the file, and gives the same logits as mergekit's folder."""
    config, tensors = built(case)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert [type(model).__name__] == config["architectures"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(mergekit_outputs[case])
    ids = make_tokenizer()(["hello world", "def f(x): pass"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
        want = theirs(**ids).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, want)


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_like_mergekit(case, sources, mergekit_outputs):
    text, field = REFUSED[case]
    assert mergekit_outputs[case] != 0, "mergekit-moe accepted it"
    with pytest.raises(UserError) as err:
        ours(text, sources)
    msg = str(err.value).removeprefix("recipe: ")  # refused when the file is read, or when built
    assert msg.startswith(field) and "\n" not in msg, msg


@pytest.mark.parametrize(
    "experts, field",
    [
        ([{"source_model": S[0]}, {"source_model": "narrow"}], "experts[1].source_model"),
        ([{"source_model": "shallow"}, {"source_model": S[0]}], "experts[0].source_model"),
    ],
)
def test_experts_must_fit_the_base(experts, field, sources):
    with pytest.raises(UserError) as err:
        ours(_moe("tokyotech-llm/Swallow-7b-hf", experts, gate_mode="random"), sources)
    msg = str(err.value)
    assert msg.startswith(field + ":") and ("width" in msg or "deep" in msg), msg


@pytest.mark.parametrize(
    "update, field",
    [
        ({"experts_per_token": 4}, "experts:"),
        ({"experts_per_token": 0}, "experts_per_token:"),
        ({"gate_mode": "hidden"}, "experts[0].positive_prompts"),
        ({"dtype": "float8"}, "dtype:"),
        ({"architecture": "falcon"}, "architecture:"),
        ({"shared_experts": [{"source_model": S[0]}, {"source_model": S[1], "positive_prompts": ["x"]}]}, "shared_experts:"),
    ],
)
def test_bad_recipes_name_the_field(update, field, sources):
    """Checked in build_moe too, for recipes changed after validation (spaces build them in code)."""
    (recipe,) = recipes.loads(_moe("tokyotech-llm/Swallow-7b-hf", [{"source_model": s} for s in S[:2]], gate_mode="random"))
    if "shared_experts" in update:
        update = {"shared_experts": [recipes.Expert(**e) for e in update["shared_experts"]]}
    bad = recipe.model_copy(update=update)
    with pytest.raises(UserError) as err:
        build_moe(bad, sources, SEED, "cpu")
    assert str(err.value).startswith(field), str(err.value)


def test_prompt_gates_need_a_tokenizer_folder(sources):
    """An intermediate stage of a multi-stage recipe has tensors but no folder to read a tokenizer from."""
    base = sources("tokyotech-llm/Swallow-7b-hf")
    stage = dataclasses.replace(base, name="stage1", path=Path("<stage stage1>"))
    load = lambda n: stage if n == "tokyotech-llm/Swallow-7b-hf" else sources(n)  # noqa: E731
    (recipe,) = recipes.loads(CASES["cheap_embed"])
    with pytest.raises(UserError, match=r"^base_model: stage1 has no folder"):
        build_moe(recipe, load, SEED, "cpu")


def test_a_deepseek_moe_is_built_but_not_scored(zoo):
    """Its config names remote code transformers 5 lacks: `mergesearch merge` writes it (as above), while a
    live model for scoring is refused in one line."""
    from search.engine.materialize import Materializer

    stages = recipes.loads(CASES["deepseek_random_shared"])
    with pytest.raises(UserError, match=r"^DeepseekForCausalLM: .*cannot be scored; build it with `mergesearch merge`") as e:
        Materializer(zoo).materialize(stages, seed=SEED)
    assert "\n" not in str(e.value)


def test_merge_command_writes_a_deepseek_moe_as_mergekit_does(zoo, mergekit_outputs, tmp_path):
    from search.commands.cli import main as cli_main

    recipe = tmp_path / "deepseek.yml"
    recipe.write_text(_mapped(CASES["deepseek_random_shared"], zoo))
    assert cli_main(["merge", str(recipe), str(tmp_path / "out"), "--random-seed", str(SEED)]) == 0
    want = mergekit_outputs["deepseek_random_shared"]
    got = read_folder(tmp_path / "out")
    assert sorted(got) == sorted(read_folder(want))
    assert all(torch.equal(got[k], v) for k, v in read_folder(want).items())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == mergekit_config(want)
