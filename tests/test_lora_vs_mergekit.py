"""LoRA adapters on source models (`model: base+adapter`), against mergekit-yaml 0.1.5 (which merges them with
PEFT into a cache folder, `--lora-merge-cache`, before merging).

Adapters are PEFT folders written directly (tests/lora_standins.py): LoRAs on q/v projections, ranks and alphas
per module (rank_pattern, alpha_pattern, rslora), in float32 and bfloat16, an embedding LoRA with the base layer
PEFT saves beside it, a fully trained head (modules_to_save), a tied model's embeddings; on one model of a
merge, or on the base, and beside a model with more tokens. Each recipe's tensors must equal mergekit's to the byte, in memory and through
`mergesearch merge` (with the tokenizer mergekit writes, which it re-saves when its donor has an adapter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MergekitOracle, assert_same_tensors, read_tensors
from lora_standins import write_lora
from standins import make_finetune, make_standin
from vocab_standins import CHAT_MARKERS, make_tied, make_vocab_variant

from search.engine import merge_command
from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine import recipe as recipes
from search.engine.recipe import loads

QV = {f"model.layers.{i}.self_attn.{p}": 4 for i in range(2) for p in ("q_proj", "v_proj")}

RECIPES = {
    "qv-slerp": """
models:
  - model: {base}+{qv}
  - model: {math}
merge_method: slerp
base_model: {base}+{qv}
parameters: {{t: 0.4}}
""",
    "patterns-rslora-bf16-ties": """
models:
  - model: {base}+{patterns}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {math}
    parameters: {{weight: 0.5, density: 0.7}}
merge_method: ties
base_model: {base}
""",
    "one-adapted-of-three-linear": """
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {math}+{math_qv}
    parameters: {{weight: 0.5}}
  - model: {math}
    parameters: {{weight: 0.3}}
merge_method: linear
dtype: float32
""",
    "embedding-and-head-task-arithmetic": """
models:
  - model: {base}+{embed}
    parameters: {{weight: 0.7}}
  - model: {math}
    parameters: {{weight: 0.4}}
merge_method: task_arithmetic
base_model: {base}
""",
    "tied-embedding-slerp": """
models:
  - model: {tied}+{tied_embed}
  - model: {tied}
merge_method: slerp
base_model: {tied}
parameters: {{t: 0.5}}
""",
    "adapter-and-vocabulary-union-slerp": """
models:
  - model: {base}+{qv}
  - model: {chat}
merge_method: slerp
base_model: {base}+{qv}
parameters: {{t: 0.5}}
tokenizer_source: union
""",
    "float16-passthrough": """
slices:
  - sources:
      - model: {half}+{half_qv}
        layer_range: [0, 2]
merge_method: passthrough
""",
}


class _Paths:
    """The oracle's view: recipes name folders by their paths."""

    def paths(self, names) -> dict[str, Path]:
        return {n: Path(n) for n in names}


class LoraOracle(MergekitOracle):
    """mergekit-yaml with the LoRA merge cache it needs for `model+adapter`."""

    def _job(self, text, seed):
        key, folder, recipe, rendered, script, args = super()._job(text, seed)
        return key, folder, recipe, rendered, script, args + ["--lora-merge-cache", str(self.root / "lora-cache")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_standin(root / "base", "llama", 2, seed=401)
    math = make_finetune(root / "math", base, seed=402, scale=0.02)
    tied = make_tied(root / "tied", base)
    half = make_standin(root / "half", "llama", 2, seed=403, dtype=torch.float16)
    return {
        "base": base,
        "math": math,
        "tied": tied,
        "half": half,
        "chat": make_vocab_variant(root / "chat", base, 405, added=CHAT_MARKERS),
        "qv": write_lora(root / "qv", base, 411, linear=QV, config={"r": 4, "lora_alpha": 8}),
        "patterns": write_lora(
            root / "patterns", base, 412, dtype=torch.bfloat16,
            linear={**QV, "model.layers.1.mlp.down_proj": 2, "model.layers.0.mlp.down_proj": 2},
            config={"r": 4, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"down_proj": 2},
                    "alpha_pattern": {"layers.1.mlp.down_proj": 3}},
        ),
        "math_qv": write_lora(root / "math-qv", math, 413, linear=QV, config={"r": 4, "lora_alpha": 4}),
        "embed": write_lora(
            root / "embed", base, 414, linear={"model.layers.0.self_attn.q_proj": 4},
            embedding={"model.embed_tokens": 4}, replaced=["model.embed_tokens.base_layer.weight", "lm_head.weight"],
            config={"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
        ),
        "tied_embed": write_lora(root / "tied-embed", tied, 415, embedding={"model.embed_tokens": 4}, config={"r": 4}),
        "half_qv": write_lora(root / "half-qv", half, 416, linear=QV, dtype=torch.bfloat16, config={"r": 4, "lora_alpha": 2}),
    }


def render(case: str, folders: dict[str, Path]) -> str:
    return RECIPES[case].format(**{k: str(v) for k, v in folders.items()})


@pytest.fixture(scope="module")
def oracle(folders, tmp_path_factory) -> LoraOracle:
    mk = LoraOracle(tmp_path_factory.mktemp("lora-mergekit"), _Paths())
    mk.prefetch([(render(case, folders), None) for case in RECIPES])
    return mk


@pytest.mark.parametrize("case", list(RECIPES))
def test_state_dict_equals_mergekit(case, folders, oracle, one_torch_thread):
    text = render(case, folders)
    _, ours = Materializer({}).state_dict(loads(text))
    _, theirs = oracle.build(text)
    assert_same_tensors(ours, theirs, case)


@pytest.mark.parametrize("case", ["qv-slerp", "embedding-and-head-task-arithmetic", "adapter-and-vocabulary-union-slerp"])
def test_merge_command_writes_mergekit_folder(case, folders, oracle, tmp_path):
    text = render(case, folders)
    out = tmp_path / "out"
    merge_command.build(loads(text), text, out, {})
    theirs = oracle.folder(text)
    assert_same_tensors(read_tensors(out), read_tensors(theirs), case)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).exists() == (theirs / name).exists(), name
        if (theirs / name).exists():
            assert (out / name).read_bytes() == (theirs / name).read_bytes(), f"{name} differs from mergekit's"


def test_an_adapter_is_merged_once_per_worker_and_names_map_like_models(folders, oracle):
    """Recipe names resolve through the model map part by part (`org/base+org/lora`), and a model's adapter
    is merged when the model loads, not per candidate: unchanged tensors stay views of the base's file."""
    mat = Materializer({"org/base": folders["base"], "org/qv": folders["qv"], "org/math": folders["math"]})
    text = RECIPES["qv-slerp"].format(base="org/base", qv="org/qv", math="org/math")
    _, first = mat.state_dict(loads(text))
    source = mat.source("org/base+org/qv")
    merged = source.tensors["model.layers.0.self_attn.q_proj.weight"]
    kept = source.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert "model.layers.0.self_attn.k_proj.weight" in source.regions and "model.layers.0.self_attn.q_proj.weight" not in source.regions
    _, second = mat.state_dict(loads(text.replace("t: 0.4", "t: 0.7")))
    assert mat.source("org/base+org/qv").tensors["model.layers.0.self_attn.q_proj.weight"] is merged
    assert mat.source("org/base+org/qv").tensors["model.layers.0.self_attn.k_proj.weight"] is kept
    _, theirs = oracle.build(render("qv-slerp", folders))
    assert_same_tensors(first, theirs, "mapped names")


def test_a_pickle_adapter_loads_only_when_allowed(folders, tmp_path):
    pickled = write_lora(tmp_path / "pickled", folders["base"], 411, linear=QV, config={"r": 4, "lora_alpha": 8}, pickle=True)
    text = RECIPES["qv-slerp"].format(base=folders["base"], qv=pickled, math=folders["math"])
    with pytest.raises(UserError, match=r"^adapter .*adapter_model\.bin is a pickle checkpoint.*allow_pickle=True"):
        Materializer({}).state_dict(loads(text))
    _, ours = Materializer({}, allow_pickle=True).state_dict(loads(text))
    _, safe = Materializer({}).state_dict(loads(render("qv-slerp", folders)))
    assert_same_tensors(ours, safe, "pickled adapter")


def _bad_adapters(folders: dict[str, Path], root: Path) -> list[tuple[str, str, str]]:
    wide = make_standin(root / "wide", "llama", 2, seed=404, hidden=128)
    dora = write_lora(root / "dora", folders["base"], 421, linear=QV, config={"r": 4, "use_dora": True})
    other = write_lora(root / "other", wide, 422, linear=QV, config={"r": 4})
    head = write_lora(root / "head", folders["base"], 423, linear={"lm_head": 4}, config={"r": 4})
    rank = write_lora(root / "rank", folders["base"], 424, linear=QV, config={"r": 8})
    ia3 = write_lora(root / "ia3", folders["base"], 425, linear=QV, config={"r": 4, "peft_type": "IA3"})
    empty = root / "empty"
    empty.mkdir()
    slerp = "models:\n  - model: {m}\n  - model: %s\nmerge_method: slerp\nbase_model: %s\nparameters: {{t: 0.5}}\n" % (
        folders["base"], folders["base"])
    return [
        ("missing-folder", slerp.format(m=f"{folders['math']}+{root / 'nope'}"), r"^model .*: adapter .*nope is neither mapped nor a local folder"),
        ("no-adapter-config", slerp.format(m=f"{folders['math']}+{empty}"), r"^adapter .*empty: .* has no adapter_config\.json"),
        ("another-shape", slerp.format(m=f"{folders['math']}+{other}"), r"^adapter .*other: .*lora_A\.weight is \[4, 128\] but model\.layers\.0\.self_attn\.q_proj\.weight of model .* is \[64, 64\]; it is an adapter for a model of another shape"),
        ("dora", slerp.format(m=f"{folders['math']}+{dora}"), r"^adapter .*dora: adapter_config\.json sets use_dora, which mergesearch does not merge"),
        ("tied-head", slerp.format(m=f"{folders['tied']}+{head}"), r"^adapter .*head: it changes lm_head\.weight, but model .* ties its head to its embeddings"),
        ("rank-mismatch", slerp.format(m=f"{folders['math']}+{rank}"), r"^adapter .*rank: adapter_config\.json gives .* rank 8 but its lora_A has 4 rows"),
        ("not-lora", slerp.format(m=f"{folders['math']}+{ia3}"), r"^adapter .*ia3: it is a IA3 adapter; mergesearch merges LoRA adapters only"),
        ("two-pluses", slerp.format(m=f"{folders['math']}+{dora}+{rank}"), r"^model .*: expected MODEL or MODEL\+ADAPTER \(one '\+'\)"),
    ]


def test_bad_adapters_are_one_line_before_any_tensor(folders, tmp_path):
    for case, text, pattern in _bad_adapters(folders, tmp_path):
        mat = Materializer({})
        with pytest.raises(UserError, match=pattern) as err:
            mat.state_dict(loads(text))
        assert "\n" not in str(err.value), case
        assert not mat._sources, f"{case}: a source was loaded before the recipe was found wrong"


def test_a_run_spec_model_with_a_lora_is_searched_exported_and_rebuilt_by_mergekit(folders, tmp_path):
    """`models: {chat: {path: ..., lora: ...}}`: the workers merge the adapter once and score candidates with
    it; the winner is exported as `org/base+org/qv` (mergekit's syntax; with --local-paths, this machine's
    `folder+adapter folder`, as the recipes above that mergekit builds) and rebuilt by `mergesearch merge`
    through the model map into the weights the worker scored."""
    import yaml

    from search.commands.cli import main as cli_main
    from search.engine.merge_command import parse_model_map
    from search.results import winner
    from search.run.driver import run
    from search.spec.runspec import load_spec
    from search.study import records
    from search_fns import state_fingerprint

    (tmp_path / "fns.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                     "from search_fns import fingerprint\n")
    spec = {
        "models": {"math": str(folders["math"]),
                   "chat": {"path": str(folders["base"]), "lora": str(folders["qv"]), "name": "org/base+org/qv"}},
        "space": {"kind": "slerp", "models": ["chat", "math"], "anchors": 2},
        "objectives": [{"kind": "custom", "function": "fns.py:fingerprint"}],
        "trials": 3, "baselines": False, "heldout_top_k": 0, "seed": 0,
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec(tmp_path / "lora.yaml")
    assert loaded.adapters == {"chat": str(folders["qv"])} and loaded.model_names["chat"] == "org/base+org/qv"
    result = run(loaded, quiet=True)
    assert result.counts["complete"] == 3
    recs = records.read_trials(loaded.run_dir / "trials.jsonl")
    best = winner.rank(recs, ["maximize"])[0]

    local = tmp_path / "best.local.yaml"
    assert cli_main(["export", str(loaded.run_dir), "--local-paths", str(local)]) == 0
    assert f"model: {folders['base']}+{folders['qv']}" in local.read_text()

    public = (loaded.run_dir / "best.yaml").read_text()
    assert "model: org/base+org/qv" in public
    rebuild = next(line for line in public.splitlines() if line.startswith("# rebuild here: mergesearch merge"))
    mapping = parse_model_map([arg for arg in rebuild.split() if "=" in arg])
    assert mapping == {"org/base": str(folders["base"]), "org/qv": str(folders["qv"]), "math": str(folders["math"])}
    merge_command.build(loads(public), public, tmp_path / "rebuilt", mapping)
    assert state_fingerprint(read_tensors(tmp_path / "rebuilt")) == pytest.approx(best["values"][0], rel=1e-12)
    _, local_build = Materializer({}).state_dict(recipes.load(local))
    assert_same_tensors(read_tensors(tmp_path / "rebuilt"), local_build, "the public and the local recipe")


def test_a_run_specs_bad_adapter_is_one_line_on_the_driver(folders, tmp_path):
    import yaml

    from search.run.run_setup import prepare_run
    from search.spec.runspec import load_spec

    wide = make_standin(tmp_path / "wide", "llama", 2, seed=404, hidden=128)
    other = write_lora(tmp_path / "other", wide, 422, linear=QV, config={"r": 4})
    pickled = write_lora(tmp_path / "pickled", folders["base"], 411, linear=QV, config={"r": 4}, pickle=True)
    (tmp_path / "fns.py").write_text("def score(model, tokenizer, fidelity):\n    return 0.0\n")

    def spec(lora, **more):
        data = {"models": {"math": str(folders["math"]), "chat": {"path": str(folders["base"]), "lora": str(lora)}},
                "space": {"kind": "slerp", "models": ["chat", "math"], "anchors": 2},
                "objectives": [{"kind": "custom", "function": "fns.py:score"}], "trials": 1, **more}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        return tmp_path / "bad.yaml"

    cases = [
        (tmp_path / "nope", r"^.*bad\.yaml: models\.chat\.lora: no adapter folder at .*nope"),
        (folders["math"], r"^.*bad\.yaml: models\.chat\.lora: .*math' has no adapter_config\.json; point it at a PEFT adapter folder"),
        (other, r"^models\.chat\.lora: .*lora_A\.weight is \[4, 128\] but .* of model chat is \[64, 64\]; it is an adapter for a model of another shape"),
        (pickled, r"^models\.chat\.lora: .*adapter_model\.bin is a pickle checkpoint.*add `allow_pickle: true` to the run spec"),
    ]
    for lora, pattern in cases:
        with pytest.raises(UserError, match=pattern) as err:
            prepare_run(load_spec(spec(lora)), resume=False)
        assert "\n" not in str(err.value)
    prepare_run(load_spec(spec(pickled, allow_pickle=True)), resume=False)  # allowed: the workers read it
