"""Search spaces: seeds are points of their spaces, constraints prune, real Optuna studies run.

Models are config.json files only (stand-in configs at the seeds' real depths);
nothing is built or downloaded. mergekit's own config schemas check every recipe.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import optuna
import pytest
import torch
import transformers
from optuna.trial import FixedTrial, TrialState

from search.engine.errors import UserError
from search.engine.recipe import MoERecipe, as_stages, dump_stages, load, loads, to_dict
from spaces import SPACES, ModelInfo, build_space, read_model_infos
from spaces.constraints import output_layers, output_params, parse_count
from standins import standin_config

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SWALLOW = [
    "tokyotech-llm/Swallow-7b-instruct-hf",
    "nitky/Superswallow-7b-v0.1",
    "nitky/Superswallow-7b-v0.2",
    "nitky/Superswallow-7b-v0.3",
]

# seed file -> (models it names: name -> (architecture, depth), the space it is a point of)
SEED_SPACES = {
    "phigment6-slerp.yml": (
        {"liminerity/phive": ("phi", 32), "mobiuslabsgmbh/aanaphi2-v0.1": ("phi", 32)},
        {
            "kind": "slerp",
            "models": ["liminerity/phive", "mobiuslabsgmbh/aanaphi2-v0.1"],
            "anchors": {"self_attn": 5, "mlp": 5, "rest": 1},
            "form": "slices",
            "dtype": "float16",
        },
    ),
    "zephyr-gemma-dpo-discopop-slerp.yml": (
        {"HuggingFaceH4/zephyr-7b-gemma-v0.1": ("gemma", 28), "SakanaAI/DiscoPOP-zephyr-7b-gemma": ("gemma", 28)},
        {
            "kind": "slerp",
            "models": ["HuggingFaceH4/zephyr-7b-gemma-v0.1", "SakanaAI/DiscoPOP-zephyr-7b-gemma"],
            "anchors": {"self_attn": 3, "mlp": 3, "rest": 1},
            "dtype": "bfloat16",
        },
    ),
    "solar-depth-upscale.yml": (
        {"mistralai/Mistral-7B-v0.1": ("mistral", 32)},
        {"kind": "layout", "mode": "dus", "models": ["mistralai/Mistral-7B-v0.1"], "max_layers": 48, "dtype": "bfloat16"},
    ),
    "cerebrum-interleave-56.yml": (
        {"AetherResearch/Cerebrum-1.0-7b": ("mistral", 32)},
        {"kind": "layout", "mode": "interleave", "models": ["AetherResearch/Cerebrum-1.0-7b"], "dtype": "bfloat16"},
    ),
    "llama-pro-interleaved-expansion.yml": (
        {"meta-llama/Llama-2-7b-hf": ("llama", 32)},
        {
            "kind": "expansion",
            "model": "meta-llama/Llama-2-7b-hf",
            "placement": ["end", "every", "after"],
            "dtype": "bfloat16",
        },
    ),
    "openchat-blockexpansion-36-end.yml": (
        {"openchat/openchat-3.5-0106": ("mistral", 32)},
        {"kind": "expansion", "model": "openchat/openchat-3.5-0106", "placement": ["end", "every"], "dtype": "bfloat16"},
    ),
    "swallow-moe-4x7b.yml": (
        {m: ("llama", 32) for m in ["tokyotech-llm/Swallow-7b-hf", *SWALLOW]},
        {
            "kind": "moe",
            "base": "tokyotech-llm/Swallow-7b-hf",
            "models": SWALLOW,
            "gate_mode": ["random", "hidden"],
            "prompts": {m: ["p"] for m in SWALLOW},
            "dtype": "bfloat16",
        },
    ),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """make(name -> (arch, depth)) -> name -> ModelInfo, read from config.json files written once."""
    root = tmp_path_factory.mktemp("configs")
    written: dict[tuple, Path] = {}

    def make(shapes: dict[str, tuple[str, int]]) -> dict[str, ModelInfo]:
        paths = {}
        for name, (arch, depth) in shapes.items():
            if (arch, depth) not in written:
                folder = root / f"{arch}-{depth}"
                folder.mkdir()
                standin_config(arch, depth).to_json_file(folder / "config.json")
                written[(arch, depth)] = folder
            paths[name] = written[(arch, depth)]
        return read_model_infos(paths)

    return make


@pytest.fixture(scope="module")
def toy(zoo):
    """A run's models: a llama base with three fine-tunes (8 layers), a phi pair, a longer llama."""
    return zoo(
        {
            "base": ("llama", 8),
            "fst": ("llama", 8),
            "nxt": ("llama", 8),
            "cnt": ("llama", 8),
            "phia": ("phi", 6),
            "phib": ("phi", 6),
            "deep": ("llama", 12),
        }
    )


def replay(space, params):
    return space.suggest(FixedTrial(params))


# ---- ModelInfo ---------------------------------------------------------------


CONFIG_VARIANTS = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("gemma", {}),
    ("phi", {}),
    ("phi", {"qk_layernorm": True}),
]


@pytest.mark.parametrize("arch,overrides", CONFIG_VARIANTS, ids=lambda v: str(v))
def test_param_counts_match_transformers(tmp_path, arch, overrides):
    config = standin_config(arch, 3)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.to_json_file(tmp_path / "config.json")
    info = ModelInfo.from_folder(tmp_path, "m")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert info.num_layers == 3
    assert info.total_params == model.num_parameters()
    assert info.params_per_layer == sum(p.numel() for p in model.model.layers[0].parameters())
    assert info.architecture == type(model).__name__


def test_param_counts_at_real_size(tmp_path):
    # Llama-2-7B's shape is LlamaConfig's default; its published size is 6,738,415,616.
    transformers.LlamaConfig().to_json_file(tmp_path / "config.json")
    assert ModelInfo.from_folder(tmp_path, "llama2").total_params == 6_738_415_616


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi"])
def test_residual_output_filters_name_the_projections_into_the_residual(zoo, arch):
    info = zoo({"m": (arch, 2)})["m"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(standin_config(arch, 2))
    layer = {f"model.layers.0.{k}": v for k, v in model.model.layers[0].state_dict().items()}
    for flt in info.residual_outputs:
        matched = [name for name in layer if flt in name]
        weights = [n for n in matched if n.endswith("weight")]
        assert len(weights) == 1, (flt, matched)
        assert layer[weights[0]].shape[0] == model.config.hidden_size  # writes into the residual stream


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"models\.x: no config.json"):
        ModelInfo.from_folder(tmp_path, "x")


def test_spaces_do_not_import_torch(tmp_path):
    code = (
        "import sys, spaces, optuna\n"
        f"infos = spaces.read_model_infos({{'a': {str(tmp_path)!r}}})\n"
        "sp = spaces.build_space({'kind': 'layout', 'mode': 'dus', 'models': ['a']}, infos)\n"
        "sp.suggest(optuna.trial.FixedTrial({'m': 1}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    standin_config("llama", 4).to_json_file(tmp_path / "config.json")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- every seed is a point of its space ---------------------------------------


def test_every_seed_has_a_space():
    assert sorted(p.name for p in SEEDS.glob("*.yml")) == sorted(SEED_SPACES)


@pytest.mark.parametrize("seed", sorted(SEED_SPACES))
def test_seed_round_trips_through_its_space(zoo, seed):
    shapes, spec = SEED_SPACES[seed]
    space = build_space(spec, zoo(shapes))
    [recipe] = load(SEEDS / seed)
    params = space.params(recipe)

    again = replay(space, params)
    assert again == recipe
    assert to_dict(again) == to_dict(recipe)
    assert loads(dump_stages(as_stages(again))) == [recipe]

    # The same through a real study: the enqueued trial records exactly these params.
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(params)
    trial = study.ask()
    assert space.suggest(trial) == recipe
    assert trial.params == params


def test_seed_params_are_the_published_numbers(zoo):
    def params_of(seed):
        shapes, spec = SEED_SPACES[seed]
        return build_space(spec, zoo(shapes)).params(load(SEEDS / seed)[0])

    assert params_of("solar-depth-upscale.yml") == {"m": 8}
    assert params_of("cerebrum-interleave-56.yml") == {"width": 8, "stride": 4}
    assert params_of("llama-pro-interleaved-expansion.yml") == {"placement": "every", "every": 4}
    assert params_of("openchat-blockexpansion-36-end.yml") == {"placement": "end", "count": 4}
    phigment = params_of("phigment6-slerp.yml")
    assert [phigment[f"t.mlp.{j}"] for j in range(5)] == [1, 0.5, 0.7, 0.3, 0]
    assert phigment["t.rest.0"] == 0.5


def test_seed_outside_the_space_is_refused_with_the_reason(zoo):
    shapes, spec = SEED_SPACES["solar-depth-upscale.yml"]
    narrow = build_space({**spec, "m": [10, 16]}, zoo(shapes))
    with pytest.raises(UserError, match=r"not a point of this layout space: m = 8 is outside .*\[10, 16\]"):
        narrow.params(load(SEEDS / "solar-depth-upscale.yml")[0])
    interleave = build_space(SEED_SPACES["cerebrum-interleave-56.yml"][1], zoo(SEED_SPACES["cerebrum-interleave-56.yml"][0]))
    with pytest.raises(UserError, match="not a point of this layout space"):
        interleave.params(load(SEEDS / "llama-pro-interleaved-expansion.yml")[0])
    slerp_shapes, slerp_spec = SEED_SPACES["zephyr-gemma-dpo-discopop-slerp.yml"]
    five = build_space({**slerp_spec, "anchors": 5}, zoo(slerp_shapes))
    with pytest.raises(UserError, match="self_attn curve has 3 anchors; the space has 5"):
        five.params(load(SEEDS / "zephyr-gemma-dpo-discopop-slerp.yml")[0])


def test_seed_breaking_a_constraint_is_refused(zoo):
    shapes, spec = SEED_SPACES["solar-depth-upscale.yml"]
    space = build_space({**spec, "max_layers": 40}, zoo(shapes))
    with pytest.raises(UserError, match="breaks the space's constraints: constraint: 48 layers > max_layers 40"):
        space.params(load(SEEDS / "solar-depth-upscale.yml")[0])


# ---- more points of each space round-trip -------------------------------------


def test_slerp_per_layer_curves(toy):
    space = build_space({"kind": "slerp", "models": ["fst", "nxt"], "base": "nxt", "anchors": "per_layer"}, toy)
    params = {f"t.{c}.{j}": (j + 1) / 10 for c in ("self_attn", "mlp", "rest") for j in range(8)}
    recipe = replay(space, params)
    assert recipe.base_model == "nxt" and [m.model for m in recipe.models] == ["fst", "nxt"]
    assert recipe.parameters["t"][0].value == [(j + 1) / 10 for j in range(8)]
    assert space.params(recipe) == params


def test_slerp_default_anchors_fit_a_shallow_model(zoo):
    """The default of 5 anchors per curve would not fit a 4-layer model: it gets one per layer instead."""
    shallow = zoo({"a": ("llama", 4), "b": ("llama", 4)})
    space = build_space({"kind": "slerp", "models": ["a", "b"]}, shallow)
    assert space.anchors == {"self_attn": 4, "mlp": 4, "rest": 4}
    with pytest.raises(UserError, match=r"space\.anchors: expected per_layer or a count in \[1, 4\], got 5"):
        build_space({"kind": "slerp", "models": ["a", "b"], "anchors": 5}, shallow)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "bench" / "quality").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_the_quality_benchmark_specs_build_on_the_toy_zoos_shape(zoo, path):
    """bench/quality/*.yaml are written for the toy zoo (4-layer llamas): each space builds there and has its
    default baselines, so `bench_search.py --quality --spec` fails on nothing but a missing zoo."""
    spec = yaml.safe_load(path.read_text())
    models = zoo({name: ("llama", 4) for name in spec["models"]})
    space = build_space(spec["space"], models)
    assert space.defaults()


def test_weights_per_model_and_per_layer_group(toy):
    space = build_space(
        {"kind": "weights", "method": ["ties", "linear"], "models": ["fst", "nxt"], "base": "base",
         "normalize": [True, False], "lambda": [0.5, 1.5]},
        toy,
    )
    params = {"method": "ties", "weight.fst": 0.3, "density.fst": 0.5, "weight.nxt": 0.7, "density.nxt": 0.9,
              "normalize": False, "lambda": 1.25}
    recipe = replay(space, params)
    assert recipe.base_model == "base"
    assert recipe.models[1].parameters == {"weight": 0.7, "density": 0.9}
    assert recipe.parameters == {"normalize": False, "lambda": 1.25}
    assert space.params(recipe) == params
    linear = replay(space, {"method": "linear", "weight.fst": 0.3, "weight.nxt": 0.7, "normalize": True})
    assert linear.base_model is None and linear.parameters == {"normalize": True}

    grouped = build_space(
        {"kind": "weights", "method": "dare_ties", "models": ["fst", "nxt", "cnt"], "base": "base", "groups": 3}, toy
    )
    params = {f"{w}.{g}.{m}": round(0.1 + 0.1 * g + 0.05 * i, 4) for g in range(3)
              for i, m in enumerate(["fst", "nxt", "cnt"]) for w in ("weight", "density")}
    recipe = replay(grouped, params)
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 2), (2, 5), (5, 8)]
    assert [src.model for src in recipe.slices[1].sources] == ["fst", "nxt", "cnt", "base"]
    assert recipe.slices[1].sources[3].parameters is None
    assert recipe.slices[2].sources[0].parameters == {"weight": params["weight.2.fst"], "density": params["density.2.fst"]}
    assert grouped.params(recipe) == params


def test_free_layout_from_two_models(toy):
    space = build_space({"kind": "layout", "mode": "free", "models": ["base", "deep"], "slices": [1, 4]}, toy)
    recipe = loads(
        "merge_method: passthrough\nslices:\n"
        "- sources: [{model: deep, layer_range: [0, 6]}]\n"
        "- sources: [{model: base, layer_range: [2, 8]}]\n"
        "- sources: [{model: deep, layer_range: [11, 12]}]\n"
    )[0]
    params = space.params(recipe)
    # models of different depths: start and length are asked per model, in its own range
    assert params == {"slices": 3, "slice.0.model": "deep", "slice.0.deep.start": 0, "slice.0.deep.length": 6,
                      "slice.1.model": "base", "slice.1.base.start": 2, "slice.1.base.length": 6,
                      "slice.2.model": "deep", "slice.2.deep.start": 11, "slice.2.deep.length": 1}
    assert replay(space, params) == recipe
    study = optuna.create_study()
    study.enqueue_trial(params)
    trial = study.ask()
    assert space.suggest(trial) == recipe
    assert trial.distributions["slice.1.base.start"].high == 7 and trial.distributions["slice.0.deep.start"].high == 11
    # a slice reaching past a model's last layer is cut there
    cut = replay(space, {"slices": 1, "slice.0.model": "base", "slice.0.base.start": 6, "slice.0.base.length": 5})
    assert cut.slices[0].sources[0].layer_range == (6, 8)

    one_depth = build_space({"kind": "layout", "mode": "free", "models": ["fst", "nxt"], "length": [2, 4]}, toy)
    recipe = replay(one_depth, {"slices": 2, "slice.0.model": "nxt", "slice.0.start": 7, "slice.0.length": 3,
                                "slice.1.model": "fst", "slice.1.start": 0, "slice.1.length": 4})
    assert [s.sources[0].layer_range for s in recipe.slices] == [(7, 8), (0, 4)]
    assert one_depth.params(recipe)["slice.0.length"] == 2  # the shortest length that is cut to [7, 8]


def test_interleave_alternates_models_and_closes_the_stack(toy):
    space = build_space({"kind": "layout", "mode": "interleave", "models": ["fst", "nxt"], "width": 3, "stride": 2}, toy)
    recipe = replay(space, {})
    layout = [(s.sources[0].model, s.sources[0].layer_range) for s in recipe.slices]
    assert layout == [("fst", (0, 3)), ("nxt", (2, 5)), ("fst", (4, 7)), ("nxt", (5, 8))]
    assert space.params(recipe) == {}


def test_expansion_after_layers_with_searched_copies_and_scale_on_phi(toy):
    space = build_space(
        {"kind": "expansion", "model": "phia", "placement": "after", "count": [1, 3], "copy": [0, 2], "scale": [0, 0.5]},
        toy,
    )
    params = {"count": 2, "after.0": 4, "after.1": 1, "copy.0": 1, "copy.1": 0, "scale": 0.25}
    recipe = replay(space, params)
    layout = [s.sources[0].layer_range for s in recipe.slices]
    assert layout == [(0, 2), (0, 1), (2, 5), (4, 5), (5, 6)]  # blocks after layers 1 and 4
    scale = recipe.slices[1].sources[0].parameters["scale"]
    assert [(c.filter, c.value) for c in scale] == [("dense", 0.25), ("fc2", 0.25), (None, 1.0)]
    assert output_layers(recipe, toy) == 8
    # positions come back sorted; replaying them gives the same recipe
    assert replay(space, space.params(recipe)) == recipe


def test_moe_picks_experts_and_prompts(toy):
    space = build_space(
        {"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "experts": [2, 3],
         "experts_per_token": [1, 2], "gate_mode": ["hidden", "random"],
         "prompts": {"fst": ["fst:", "first"], "nxt": ["nxt:", "next", "successor"], "cnt": ["cnt:"]}},
        toy,
    )
    params = {"gate_mode": "hidden", "experts_per_token": 2, "experts": 3, "expert.fst": 1.0, "expert.nxt": 1.0,
              "expert.cnt": 1.0, "prompt.fst.0": True, "prompt.fst.1": False,
              "prompt.nxt.0": False, "prompt.nxt.1": True, "prompt.nxt.2": True}
    recipe = replay(space, params)
    assert isinstance(recipe, MoERecipe)
    assert [(e.source_model, e.positive_prompts) for e in recipe.experts] == [
        ("fst", ["fst:"]), ("nxt", ["next", "successor"]), ("cnt", ["cnt:"])]
    assert space.params(recipe) == params
    # the two best-scored models become experts, in the order of `models`; random gates take no prompts
    two = replay(space, {"gate_mode": "random", "experts_per_token": 1, "experts": 2,
                         "expert.fst": 0.2, "expert.nxt": 0.9, "expert.cnt": 0.5})
    assert [(e.source_model, e.positive_prompts) for e in two.experts] == [("nxt", None), ("cnt", None)]
    assert space.params(two) == {"gate_mode": "random", "experts_per_token": 1, "experts": 2,
                                 "expert.fst": 0.0, "expert.nxt": 1.0, "expert.cnt": 1.0}
    # keeping no prompt of a pool means keeping all of it
    unpicked = replay(space, {**params, "prompt.fst.0": False})
    assert unpicked.experts[0].positive_prompts == ["fst:", "first"]

    loose = build_space({"kind": "moe", "base": "base", "models": ["fst", "nxt"], "experts": [1, 2],
                         "experts_per_token": [1, 2], "gate_mode": "random"}, toy)
    with pytest.raises(optuna.TrialPruned, match="1 experts picked but experts_per_token is 2"):
        replay(loose, {"experts_per_token": 2, "experts": 1, "expert.fst": 0.5, "expert.nxt": 0.1})


def test_compose_names_stages_and_prefixes_params(toy, tmp_path):
    space = build_space(
        {"kind": "compose", "max_layers": 12, "stages": [
            {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
            {"kind": "slerp", "models": ["blend", "cnt"], "anchors": 2},
            {"kind": "layout", "mode": "dus", "models": ["stage2"]},
        ]},
        toy,
    )
    params = {f"{stage}.t.{c}.{j}": 0.1 * (j + 1) for stage in ("blend", "stage2")
              for c in ("self_attn", "mlp", "rest") for j in range(2)}
    params["stage3.m"] = 3
    stages = replay(space, params)
    assert [s.name for s in stages] == ["blend", "stage2", None]
    assert stages[1].models[0].model == "blend" and stages[2].slices[0].sources[0].model == "stage2"
    text = dump_stages(stages)
    assert text.count("---") == 2 and loads(text) == stages
    assert space.params(stages) == params
    with pytest.raises(optuna.TrialPruned, match="14 layers > max_layers 12"):
        replay(space, {**params, "stage3.m": 1})

    mergekit_multi = pytest.importorskip("mergekit.scripts.multimerge")
    configs, dependencies = mergekit_multi.load_config(text, str(tmp_path))
    assert set(configs) == {"blend", "stage2", None}
    assert dependencies[None] == {"stage2"} and dependencies["stage2"] == {"blend"}


# ---- constraints ----------------------------------------------------------------


def test_max_layers_prunes_in_a_study(toy):
    space = build_space({"kind": "layout", "mode": "dus", "models": ["base"], "max_layers": 10}, toy)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        try:
            recipe = space.suggest(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, output_layers(recipe, toy))
    states = {t.params["m"]: t.state for t in study.trials}
    assert {m for m, s in states.items() if s == TrialState.PRUNED} == {m for m in states if 2 * (8 - m) > 10}
    assert any(s == TrialState.PRUNED for s in states.values()) and any(s == TrialState.COMPLETE for s in states.values())


def test_max_params_counts_the_candidate(toy):
    one = toy["fst"].total_params
    weights = build_space({"kind": "weights", "models": ["fst", "nxt"], "base": "base", "max_params": one - 1}, toy)
    with pytest.raises(optuna.TrialPruned, match=f"{one} parameters > max_params {one - 1}"):
        replay(weights, {"weight.fst": 0.5, "weight.nxt": 0.5})

    moe = build_space({"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "gate_mode": "random",
                       "experts": [2, 3], "max_params": "1M"}, toy)
    picks = {"expert.fst": 0.9, "expert.nxt": 0.8, "expert.cnt": 0.1}
    two = replay(moe, {**picks, "experts": 2})
    info = toy["base"]
    assert output_params(two, toy) == info.outside_params + 8 * (
        info.attn_params + info.norm_params + 2 * info.mlp_params + 2 * info.hidden_size)
    limit = output_params(two, toy)
    tight = build_space({"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "gate_mode": "random",
                         "experts": [2, 3], "max_params": limit}, toy)
    assert replay(tight, {**picks, "experts": 2}) == two
    with pytest.raises(optuna.TrialPruned, match="parameters > max_params"):
        replay(tight, {**picks, "experts": 3})


def test_parse_count():
    assert parse_count("1.5B", "x") == 1_500_000_000
    assert parse_count("750m", "x") == 750_000_000
    assert parse_count(7e6, "x") == 7_000_000
    with pytest.raises(UserError, match="x: expected a positive count"):
        parse_count("lots", "x")


# ---- spec validation: one line naming the field ----------------------------------


BAD_SPECS = [
    ({"kind": "nope"}, r"space\.kind: 'nope' is not a space; use one of slerp, weights"),
    ({"kind": "slerp", "models": ["fst", "foo"]},
     r"space\.models\[1\]: 'foo' is not one of the run's models \(base, fst, nxt, cnt, phia, phib, deep\)"),
    ({"kind": "slerp", "models": ["fst", "nxt", "cnt"]}, r"space\.models: lists 3 models; this space takes exactly 2"),
    ({"kind": "slerp", "models": ["fst", "deep"]}, r"space\.models\[1\]: 'deep' has num_layers 12 but 'fst' has 8"),
    ({"kind": "slerp", "models": ["fst", "nxt"], "base": "cnt"}, r"space\.base: 'cnt' must be one of models"),
    ({"kind": "slerp", "models": ["fst", "nxt"], "t": [0, 2]}, r"space\.t: \[0, 2\] goes outside the allowed \[0\.0, 1\.0\]"),
    ({"kind": "slerp", "models": ["fst", "nxt"], "anchors": 0}, r"space\.anchors: expected per_layer or a count in \[1, 8\]"),
    ({"kind": "slerp", "models": ["fst", "nxt"], "anchors": {"attn": 3}}, r"space\.anchors\.attn: not a curve"),
    ({"kind": "slerp", "models": ["fst", "nxt"], "anchor": 3}, r"space\.anchor: unknown key; use one of"),
    ({"kind": "weights", "method": "ties", "models": ["fst", "nxt"]}, r"space\.base: required by task_arithmetic"),
    ({"kind": "weights", "method": "magic", "models": ["fst"], "base": "base"}, r"space\.method: 'magic' is not one of"),
    ({"kind": "weights", "models": ["fst"], "base": "base", "density": [0.5, 0.1]}, r"space\.density: range \[0\.5, 0\.1\] is reversed"),
    ({"kind": "weights", "models": ["fst"], "base": "base", "weight": "high"}, r"space\.weight: expected a number or a range"),
    ({"kind": "weights", "models": ["fst", "base"], "base": "base"}, r"space\.base: 'base' is also in models"),
    ({"kind": "layout", "models": ["fst"]}, r"space\.mode: required but missing; add it"),
    ({"kind": "layout", "mode": "free", "models": ["fst", "phia"]}, r"space\.models\[1\]: 'phia' has model_type phi but 'fst' has llama"),
    ({"kind": "layout", "mode": "dus", "models": ["fst"], "m": [0, 4]}, r"space\.m: \[0, 4\] goes outside the allowed \[1, 7\]"),
    ({"kind": "layout", "mode": "dus", "models": ["fst"], "max_layers": 0}, r"space\.max_layers: expected a positive integer"),
    ({"kind": "layout", "mode": "dus", "models": ["fst"], "max_params": "lots"}, r"space\.max_params: expected a positive count"),
    ({"kind": "expansion", "model": "fst", "every": 4}, r"space\.every: only used by placement every; remove it"),
    ({"kind": "expansion", "model": "fst", "placement": "middle"}, r"space\.placement: 'middle' is not one of"),
    ({"kind": "moe", "base": "phia", "models": ["phib"]}, r"space\.base: 'phia' is a phi model"),
    ({"kind": "moe", "base": "base", "models": ["fst", "nxt"], "prompts": {"fst": ["a"]}},
     r"space\.prompts: gate_mode hidden needs positive prompts for every model; add prompts\.nxt"),
    ({"kind": "moe", "base": "base", "models": ["fst"], "gate_mode": "random", "experts": [1, 3]},
     r"space\.experts: \[1, 3\] goes outside the allowed \[1, 1\]"),
    ({"kind": "compose", "stages": [{"kind": "layout", "mode": "dus", "models": ["fst"]},
                                    {"kind": "slerp", "models": ["stage1", "nxt"]}]},
     r"space\.stages\[1\]\.models\[0\]: stage 'stage1' \(layout\) gives a different shape in each trial"),
    ({"kind": "compose", "stages": [{"kind": "moe", "base": "base", "models": ["fst"]}, {"kind": "layout"}]},
     r"space\.stages\[0\]\.kind: mergekit-multi cannot run a moe stage"),
    ({"kind": "compose", "stages": [{"name": "fst", "kind": "slerp", "models": ["fst", "nxt"]}, {"kind": "layout"}]},
     r"space\.stages\[0\]\.name: 'fst' is already a model or stage name"),
    ({"kind": "compose", "stages": [{"kind": "slerp", "models": ["fst", "nxt"]},
                                    {"kind": "layout", "mode": "dus", "models": ["stage1"], "m": [1, 9]}]},
     r"space\.stages\[1\]\.m: \[1, 9\] goes outside the allowed \[1, 7\]"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_bad_spec_is_one_line_naming_the_field(toy, spec, message):
    with pytest.raises(UserError, match=message) as caught:
        build_space(spec, toy)
    assert "\n" not in str(caught.value)


def test_max_params_needs_countable_models(toy):
    odd = {**toy, "odd": ModelInfo(name="odd", model_type="mamba", architecture="MambaForCausalLM",
                                    num_layers=8, hidden_size=64)}
    with pytest.raises(UserError, match=r"space\.max_params: cannot count the parameters of 'odd'"):
        build_space({"kind": "layout", "mode": "dus", "models": ["odd"], "max_params": "1M"}, odd)
    build_space({"kind": "layout", "mode": "dus", "models": ["odd"], "max_layers": 12}, odd)


# ---- real studies over every space --------------------------------------------------


STUDY_SPACES = {
    "slerp": {"kind": "slerp", "models": ["fst", "nxt"], "anchors": {"self_attn": 5, "mlp": 5, "rest": 2}},
    "slerp-per-layer": {"kind": "slerp", "models": ["phia", "phib"], "anchors": "per_layer", "form": "slices"},
    "weights": {"kind": "weights", "method": ["linear", "task_arithmetic", "ties", "dare_ties"],
                "models": ["fst", "nxt", "cnt"], "base": "base", "weight": [-0.5, 1.5],
                "normalize": [True, False], "lambda": [0.5, 1.5]},
    "weights-groups": {"kind": "weights", "method": "ties", "models": ["fst", "nxt"], "base": "base", "groups": 4},
    "layout-dus": {"kind": "layout", "mode": "dus", "models": ["fst", "nxt"], "max_layers": 12},
    "layout-interleave": {"kind": "layout", "mode": "interleave", "models": ["fst"], "width": [1, 6]},
    "layout-free": {"kind": "layout", "mode": "free", "models": ["base", "deep", "fst"], "slices": [1, 5],
                    "max_layers": 16},
    "expansion": {"kind": "expansion", "model": "fst", "placement": ["end", "every", "after"], "count": [1, 4],
                  "every": [2, 8], "copy": [0, 3], "scale": [0, 1]},
    "moe": {"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "experts_per_token": [1, 2],
            "gate_mode": ["hidden", "cheap_embed", "random", "uniform_random"],
            "prompts": {"fst": ["fst:", "first"], "nxt": ["nxt:", "next"], "cnt": ["cnt:", "count", "how many"]},
            "max_params": "2M"},
    "compose": {"kind": "compose", "max_layers": 14, "stages": [
        {"name": "blend", "kind": "weights", "method": "task_arithmetic", "models": ["fst", "nxt"], "base": "base"},
        {"kind": "expansion", "model": "blend", "placement": ["end", "after"], "count": [1, 8]}]},
}


def _mergekit_accepts(stages, tmp_path):
    """mergekit's own config schemas (no models needed) accept the exported YAML."""
    text = dump_stages(stages)
    if len(stages) > 1:
        multimerge = pytest.importorskip("mergekit.scripts.multimerge")
        multimerge.load_config(text, str(tmp_path))
    elif isinstance(stages[0], MoERecipe):
        pytest.importorskip("mergekit.moe.config").MoEMergeConfig.model_validate(loads(text)[0].model_dump())
    else:
        pytest.importorskip("mergekit.config").MergeConfiguration.model_validate(to_dict(loads(text)[0]))


@pytest.mark.parametrize("name", sorted(STUDY_SPACES))
def test_tpe_study_over_the_space(toy, tmp_path, name):
    space = build_space(STUDY_SPACES[name], toy)
    storage = f"sqlite:///{tmp_path / 'study.db'}" if name == "compose" else None
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, constant_liar=True, n_startup_trials=5)
    study = optuna.create_study(sampler=sampler, storage=storage)
    seen = 0
    for _ in range(20):
        trial = study.ask()
        try:
            recipe = space.suggest(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        stages = as_stages(recipe)
        assert loads(dump_stages(stages)) == stages
        _mergekit_accepts(stages, tmp_path)
        again = space.suggest(FixedTrial(space.params(recipe)))
        assert again == recipe and dump_stages(as_stages(again)) == dump_stages(stages)
        assert space.suggest(FixedTrial(trial.params)) == recipe  # deterministic in the params
        study.tell(trial, float(sum(v for v in trial.params.values() if isinstance(v, (int, float)))))
        seen += 1
    assert seen >= 5, f"only {seen} of 20 trials were not pruned"


def test_same_seed_same_recipes(toy):
    def run():
        space = build_space(STUDY_SPACES["weights"], toy)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3, multivariate=True, group=True))
        out = []
        for _ in range(12):
            trial = study.ask()
            out.append(dump_stages(as_stages(space.suggest(trial))))
            study.tell(trial, len(out[-1]))
        return out

    assert run() == run()


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_docstring_example_builds_and_samples(zoo, kind):
    """The spec each space's docstring shows is one a user can paste."""
    module = sys.modules[SPACES[kind].__module__]
    example = yaml.safe_load(module.__doc__.split("\n\n")[1])["space"]
    assert example["kind"] == kind
    space = build_space(example, zoo({name: ("llama", 32) for name in ("a", "b", "c", "d", "base")}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        try:
            stages = as_stages(space.suggest(trial))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        assert loads(dump_stages(stages)) == stages
        study.tell(trial, 0.0)


# ---- defaults: the merges a person would write by hand (the run's baselines) ------------

DEFAULT_SPECS = {
    "slerp": ({"kind": "slerp", "models": ["fst", "nxt"]}, ["slerp t=0.5"]),
    "weights": ({"kind": "weights", "method": "dare_ties", "base": "base", "models": ["fst", "nxt", "cnt"]},
                ["linear average", "ties w=1 d=0.5"]),
    "weights-linear": ({"kind": "weights", "method": "linear", "models": ["fst", "nxt"]}, ["linear average"]),
    "layout": ({"kind": "layout", "mode": "dus", "models": ["deep"]}, ["deep alone"]),
    "expansion": ({"kind": "expansion", "model": "base"}, ["base alone"]),
    "moe": ({"kind": "moe", "base": "base", "models": ["fst", "nxt"], "gate_mode": "random"}, ["all experts"]),
    "compose": ({"kind": "compose", "stages": [{"name": "blend", "kind": "slerp", "models": ["fst", "nxt"]},
                                                {"kind": "expansion", "model": "blend"}]},
                ["blend: slerp t=0.5, then stage2: blend alone"]),
}


@pytest.mark.parametrize("case", list(DEFAULT_SPECS))
def test_every_space_names_its_hand_written_defaults_as_valid_recipes(toy, case):
    spec, names = DEFAULT_SPECS[case]
    defaults = build_space(spec, toy).defaults()
    assert list(defaults) == names
    for recipe in defaults.values():
        stages = as_stages(recipe)
        assert loads(dump_stages(stages)) == stages  # what the worker reads back
        if not isinstance(stages[0], MoERecipe):
            schema = pytest.importorskip("mergekit.config").MergeConfiguration
            for stage in stages:
                schema.model_validate(to_dict(stage))


def test_default_values_are_the_usual_hand_settings(toy):
    slerp = build_space(DEFAULT_SPECS["slerp"][0], toy).defaults()["slerp t=0.5"]
    assert slerp.parameters == {"t": 0.5} and slerp.base_model == "fst"
    ties = build_space(DEFAULT_SPECS["weights"][0], toy).defaults()["ties w=1 d=0.5"]
    assert ties.merge_method == "ties" and ties.base_model == "base"
    assert [m.parameters for m in ties.models] == [{"weight": 1.0, "density": 0.5}] * 3
    compose = build_space(DEFAULT_SPECS["compose"][0], toy).defaults()["blend: slerp t=0.5, then stage2: blend alone"]
    assert [s.name for s in compose] == ["blend", None]
    assert compose[1].slices[0].sources[0].model == "blend"
    two_stage = {"kind": "compose", "stages": [{"name": "letters", "kind": "slerp", "models": ["fst", "nxt"]},
                 {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["letters", "cnt"]}]}
    assert list(build_space(two_stage, toy).defaults()) == [
        "letters: slerp t=0.5, then stage2: linear average", "letters: slerp t=0.5, then stage2: ties w=1 d=0.5"]
