"""Property-based tests (hypothesis): any input gives a valid result or one clean line.

- The recipe reader: mutations of the seed recipes (a field dropped, a type changed, a
  number made negative, huge or NaN, a wrong model name, random strings) load as a recipe
  that dumps and loads back unchanged and plans against stand-in models, or are refused
  with a RecipeError / UserError of one line. Never another exception type.
- Every space: specs with hypothesis-chosen ranges, driven by real Optuna studies (seeded
  samplers) and by params hypothesis picks within the ranges the space asks for, give a
  recipe that round-trips and that `space.params` reproduces, or a clean rejection
  (optuna.TrialPruned from a constraint, or a UserError).
- Run specs: mutations of a valid spec give a prepared run or one UserError line, and a
  refused spec writes nothing to its folder.

Runs are derandomized (the same examples every time) and small, so the file stays quick.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from optuna.trial import FixedTrial, TrialState

from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.recipe import RecipeError, as_stages, dump_stages, from_dict, loads
from search.run.run_setup import prepare_run
from search.spec.runspec import load_spec
from spaces import build_space
from standins import make_standin
from test_spaces import SEEDS, STUDY_SPACES, toy, zoo  # noqa: F401  (toy and zoo are fixtures)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    # FixedTrial warns on a value outside a distribution; CMA-ES on categorical params
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# Deterministic for CI, no example database written into the checkout, no per-example time limit
# (the machine is shared: timing must never fail a test).
SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(error: Exception, limit: int | None = None) -> None:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message, f"a multi-line message: {message!r}"
    if limit is not None:
        assert len(message) <= limit, f"a {len(message)}-character message: {message[:400]!r}"


# ---- mutations of a YAML document ----------------------------------------------

ODD_NUMBERS = st.one_of(
    st.sampled_from([-1, 0, -0.5, 0.5, 1, 2**63, 2**100, 1e308, -1e308, math.nan, math.inf, -math.inf]),
    st.integers(),
    st.floats(),
)
ODD_STRINGS = st.one_of(
    st.sampled_from(["", " ", ".", "..", "a.b", "x:y", "nan", "1e3", "null", "per_layer", "é", "a\nb", "{", "[0, 1]",
                     "x" * 300]),
    st.text(max_size=12),
)
SCALARS = st.one_of(st.none(), st.booleans(), ODD_NUMBERS, ODD_STRINGS)
ODD_VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(ODD_STRINGS, SCALARS, max_size=2)
)


def paths_in(node, path: tuple = ()) -> list[tuple]:
    """The path (keys and indices) to every value inside a document, the root excluded."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    out = []
    for key, value in items:
        out.append(path + (key,))
        out += paths_in(value, path + (key,))
    return out


def at(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw, docs: list, names: list[str], keys: list[str]):
    """`docs` (a list of YAML documents) with one or two mutations inside a document, most of
    them fitting the value they change (a number made odd, a name swapped for another or a
    wrong one), others dropping it, replacing it by any odd value or adding a key."""
    docs = copy.deepcopy(docs)
    for _ in range(draw(st.integers(1, 2))):
        paths = [p for p in paths_in(docs) if len(p) > 1]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = at(docs, path[:-1]), path[-1]
        value = parent[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ops = ["number", "number", "drop", "replace"]
        elif isinstance(value, str):
            ops = ["name", "name", "drop", "replace"]
        elif isinstance(value, (dict, list)):
            ops = ["add", "drop", "replace"]
        else:
            ops = ["drop", "replace"]
        op = draw(st.sampled_from(ops))
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(ODD_VALUES)
        elif op == "number":
            parent[key] = draw(st.integers(-2, 40) | ODD_NUMBERS)
        elif op == "name":
            parent[key] = draw(st.sampled_from(names) | ODD_STRINGS)
        elif isinstance(value, dict):
            value[draw(st.sampled_from(keys) | ODD_STRINGS)] = draw(ODD_VALUES | st.sampled_from(names))
        else:  # a list: one more of its entries, or something odd
            value.append(copy.deepcopy(draw(st.sampled_from(value))) if value else draw(ODD_VALUES))
    return docs


# ---- 1. the recipe reader ----------------------------------------------------------

# The seeds' models, at tiny width: one stand-in per architecture and depth.
SEED_MODELS = {
    ("phi", 32): ["liminerity/phive", "mobiuslabsgmbh/aanaphi2-v0.1"],
    ("mistral", 32): ["openchat/openchat-3.5-0106", "AetherResearch/Cerebrum-1.0-7b", "mistralai/Mistral-7B-v0.1"],
    ("llama", 32): ["meta-llama/Llama-2-7b-hf", "tokyotech-llm/Swallow-7b-hf", "tokyotech-llm/Swallow-7b-instruct-hf",
                    "nitky/Superswallow-7b-v0.1", "nitky/Superswallow-7b-v0.2", "nitky/Superswallow-7b-v0.3"],
    ("gemma", 28): ["HuggingFaceH4/zephyr-7b-gemma-v0.1", "SakanaAI/DiscoPOP-zephyr-7b-gemma"],
}
SEED_NAMES = [name for names in SEED_MODELS.values() for name in names] + ["stage1", "toy/nope"]

# Every seed file, plus a two-stage file as mergekit-multi reads one (a named slerp, then a
# depth up-scaling of its output), so stage names are mutated too.
SEED_DOCS = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(SEEDS.glob("*.yml"))}
SEED_DOCS["two-stages"] = [
    {"name": "stage1", **SEED_DOCS["zephyr-gemma-dpo-discopop-slerp.yml"][0]},
    {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": "stage1", "layer_range": [0, 20]}]},
        {"sources": [{"model": "stage1", "layer_range": [8, 28]}]}]},
]
RECIPE_KEYS = ["name", "merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "sources", "layer_range", "model", "t", "weight",
               "density", "filter", "value", "experts", "source_model", "positive_prompts", "gate_mode",
               "experts_per_token", "residual_weight", "shared_experts"]


@pytest.fixture(scope="module")
def seed_materializer(tmp_path_factory) -> Materializer:
    """A Materializer that maps every seed's model names to a stand-in of its architecture and depth."""
    root = tmp_path_factory.mktemp("seed_models")
    paths = {}
    for (arch, depth), names in SEED_MODELS.items():
        folder = make_standin(root / f"{arch}-{depth}", arch, depth, seed=depth, hidden=32)
        paths.update({name: folder for name in names})
    return Materializer(paths)


def recipe_documents():
    return st.sampled_from(sorted(SEED_DOCS)).flatmap(
        lambda name: mutated(SEED_DOCS[name], SEED_NAMES, RECIPE_KEYS)
    )


@settings(max_examples=150, **SETTINGS)
@given(docs=recipe_documents(), as_text=st.booleans())
# found once: a key that is empty or spans lines, a model name that spans lines or is too long for a path
@example(docs=[{"merge_method": "linear", "models": [{"model": "a"}], "": None}], as_text=False)
@example(docs=[{"merge_method": "linear", "models": [{"model": "a"}], "a\nb": None}], as_text=False)
@example(docs=[{"merge_method": "linear", "models": [{"model": "a\nb"}]}], as_text=True)
@example(docs=[{"merge_method": "linear", "models": [{"model": "x" * 300}]}], as_text=True)
def test_a_mutated_seed_recipe_loads_and_plans_or_is_refused_in_one_line(seed_materializer, docs, as_text):
    try:
        if as_text or len(docs) != 1:
            stages = loads(yaml.safe_dump_all(docs, sort_keys=False))
        else:
            stages = [from_dict(docs[0])]
    except RecipeError as e:
        assert_one_line(e)
        return
    # what loads dumps as YAML that loads back the same (compared as text: NaN != NaN)
    text = dump_stages(stages)
    assert dump_stages(loads(text)) == text
    try:
        seed_materializer.plan(stages)
    except UserError as e:
        assert_one_line(e)


# Pieces of YAML that parse into odd values (typed tags, impossible dates, huge numbers,
# aliases, several documents), strung together at random.
YAML_PIECES = ["merge_method: ", "models:", "slices:", "\n", "\n  ", "- ", ": ", "a", "[", "]", "{", "}", ", ", "0.5",
               "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!set ", "!!str ", "!!python/name:os.system ",
               "2001-13-45", "1" * 5000, "&x ", "*x", "<<: ", "? ", "---\n", "...", "'", '"', "#", "|", "\t",
               "%YAML 1.1\n", "\x08", "é", ".nan", "~"]


@settings(max_examples=150, **SETTINGS)
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(YAML_PIECES), max_size=12).map("".join))
@example(text="\x08")  # found once, with the three below
@example(text="!!int")
@example(text="a: 2001-13-45")
@example(text="a: " + "1" * 5000)
def test_any_text_is_a_recipe_or_one_line(text):
    try:
        loads(text)
    except RecipeError as e:
        assert_one_line(e)


# ---- 2. every space ------------------------------------------------------------------
# Specs over test_spaces' toy models: base, fst, nxt, cnt (llama, 8 layers), phia, phib
# (phi, 6 layers), deep (llama, 12 layers).


def knob(values, absent=True):
    """A spec knob: absent, one value (fixed), or a [low, high] pair (searched)."""
    pair = st.lists(values, min_size=2, max_size=2).map(sorted)
    return (st.none() if absent else st.nothing()) | values | pair


def subset(items, min_size=1):
    return st.lists(st.sampled_from(items), min_size=min_size, max_size=len(items), unique=True)


def choice(items):
    """A choice knob: one item (fixed) or a list of them (searched)."""
    return st.sampled_from(items) | subset(items)


def spec_of(kind: str, **keys):
    """A spec from drawn keys; a key drawn as None is left out (the space's default)."""
    return {"kind": kind, **{k.rstrip("_"): v for k, v in keys.items() if v is not None}}


CONSTRAINTS = dict(max_layers=st.none() | st.integers(4, 40), max_params=st.none() | st.sampled_from(["1M", "2M", 10**7]))
DTYPE = st.none() | st.sampled_from(["bfloat16", "float32"])
UNIT = st.floats(0, 1)


def slerp_specs():
    return st.sampled_from([["fst", "nxt"], ["phia", "phib"], ["cnt", "base"]]).flatmap(
        lambda pair: st.builds(
            spec_of, st.just("slerp"), models=st.just(pair), base=st.none() | st.sampled_from(pair),
            filters=st.none() | st.sampled_from([[], ["self_attn"], ["mlp", "self_attn"], ["input_layernorm"]]),
            anchors=st.none() | st.integers(1, 6) | st.just("per_layer"), t=knob(UNIT),
            form=st.none() | st.sampled_from(["models", "slices"]), dtype=DTYPE, **CONSTRAINTS,
        )
    )


def weights_specs():
    return st.builds(
        spec_of, st.just("weights"), method=st.none() | choice(["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]),
        models=subset(["fst", "nxt", "cnt"]), base=st.just("base"), weight=knob(st.floats(-2, 2)),
        density=knob(UNIT), groups=st.none() | st.integers(1, 8) | st.just("per_layer"),
        normalize=st.none() | choice([True, False]), lambda_=st.none() | knob(st.floats(0, 2), absent=False),
        dtype=DTYPE, **CONSTRAINTS,
    )


def layout_specs():
    dus = st.builds(spec_of, st.just("layout"), mode=st.just("dus"),
                    models=st.sampled_from([["fst"], ["fst", "nxt"], ["base", "deep"]]), m=knob(st.integers(1, 7)),
                    **CONSTRAINTS)
    interleave = st.builds(spec_of, st.just("layout"), mode=st.just("interleave"),
                           models=st.sampled_from([["fst"], ["fst", "nxt"], ["phia"]]),
                           width=knob(st.integers(1, 6)), stride=knob(st.integers(1, 6)), **CONSTRAINTS)
    free = st.builds(spec_of, st.just("layout"), mode=st.just("free"), models=subset(["base", "deep", "fst"]),
                     slices=knob(st.integers(1, 5)), length=knob(st.integers(1, 8)), dtype=DTYPE, **CONSTRAINTS)
    return dus | interleave | free


def expansion_specs():
    def spec(model, placement):
        chosen = {placement} if isinstance(placement, str) else set(placement)
        return st.builds(
            spec_of, st.just("expansion"), model=st.just(model), placement=st.just(placement),
            # count and every only where a placement uses them (else the spec is refused)
            count=knob(st.integers(1, 6)) if chosen & {"end", "after"} else st.none(),
            every=knob(st.integers(1, 6)) if "every" in chosen else st.none(),
            copy=st.none() | st.just("previous") | knob(st.integers(0, 5), absent=False),
            scale=knob(st.floats(-1, 1)), dtype=DTYPE, **CONSTRAINTS,
        )

    return st.tuples(st.sampled_from(["fst", "phia", "deep"]), choice(["end", "every", "after"])).flatmap(
        lambda drawn: spec(*drawn)
    )


PROMPTS = {"fst": ["fst:", "first"], "nxt": ["nxt:"], "cnt": ["cnt:", "count", "how many"]}


def moe_specs():
    return subset(["fst", "nxt", "cnt"]).flatmap(
        lambda pool: st.builds(
            spec_of, st.just("moe"), base=st.just("base"), models=st.just(pool), experts=knob(st.integers(1, len(pool))),
            experts_per_token=knob(st.integers(1, len(pool))),
            gate_mode=st.none() | choice(["hidden", "cheap_embed", "random", "uniform_random"]),
            prompts=st.just({m: PROMPTS[m] for m in pool}), pick_prompts=st.none() | st.booleans(), dtype=DTYPE,
            **CONSTRAINTS,
        )
    )


def compose_specs():
    """A first stage of a fixed output shape named blend, then a stage built on it."""
    first = st.sampled_from([
        {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
        {"name": "blend", "kind": "weights", "method": "task_arithmetic", "models": ["fst", "nxt"], "base": "base"},
        {"name": "blend", "kind": "layout", "mode": "dus", "models": ["fst"], "m": 3},
    ])
    second = st.one_of(
        st.builds(spec_of, st.just("slerp"), models=st.just(["blend", "cnt"]), anchors=st.integers(1, 3)),
        st.builds(spec_of, st.just("layout"), mode=st.just("dus"), models=st.just(["blend"]), m=knob(st.integers(1, 7))),
        st.builds(spec_of, st.just("expansion"), model=st.just("blend"), placement=choice(["end", "after"]),
                  count=knob(st.integers(1, 4))),
        st.builds(spec_of, st.just("weights"), method=choice(["linear", "ties"]), models=st.just(["blend", "cnt"]),
                  base=st.just("base")),
    )
    return st.builds(lambda a, b, c: spec_of("compose", stages=[a, b], **c), first, second, st.fixed_dictionaries(CONSTRAINTS))


SPACE_SPECS = {"slerp": slerp_specs, "weights": weights_specs, "layout": layout_specs, "expansion": expansion_specs,
               "moe": moe_specs, "compose": compose_specs}
SAMPLERS = {
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=2),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_asynchronous_seeding=False),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=2),
}


class DrawingTrial:
    """A trial whose every answer hypothesis draws within the range the space asks for, recorded
    as params (so hypothesis reaches the ends of each range, which samplers rarely do)."""

    def __init__(self, data):
        self.data = data
        self.params: dict = {}
        self.number = 0

    def _draw(self, name, strategy):
        self.params[name] = self.data.draw(strategy, label=name)
        return self.params[name]

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._draw(name, st.floats(low, high))

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self._draw(name, st.integers(low, high))

    def suggest_categorical(self, name, choices):
        return self._draw(name, st.sampled_from(list(choices)))

    def set_user_attr(self, key, value):
        pass


def check_point(space, recipe, params: dict) -> None:
    """The recipe round-trips through YAML, its params replay to it, and so do space.params(recipe)."""
    stages = as_stages(recipe)
    text = dump_stages(stages)
    assert loads(text) == stages
    assert dump_stages(as_stages(space.suggest(FixedTrial(params)))) == text
    found = space.params(recipe)
    assert dump_stages(as_stages(space.suggest(FixedTrial(found)))) == text, (found, params)


@pytest.mark.parametrize("kind", sorted(SPACE_SPECS))
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_any_point_of_a_space_is_a_recipe_that_round_trips_or_a_clean_rejection(toy, kind, data):
    spec = data.draw(SPACE_SPECS[kind](), label="spec")
    try:
        space = build_space(spec, toy)
    except UserError as e:
        assert_one_line(e)
        event("spec refused")  # see how often with --hypothesis-show-statistics
        return
    driver = data.draw(st.sampled_from(["drawn", *SAMPLERS]), label="driver")
    if driver == "drawn":  # params hypothesis picks, replayed with optuna's FixedTrial
        trial = DrawingTrial(data)
        try:
            recipe = space.suggest(trial)
        except optuna.TrialPruned:
            event("pruned")
            return
        event("a recipe")
        check_point(space, recipe, trial.params)
        # a real study records exactly these params for an enqueued trial
        study = optuna.create_study()
        study.enqueue_trial(trial.params)
        asked = study.ask()
        assert dump_stages(as_stages(space.suggest(asked))) == dump_stages(as_stages(recipe))
        assert asked.params == trial.params
        return
    study = optuna.create_study(sampler=SAMPLERS[driver](data.draw(st.integers(0, 2**32 - 1), label="seed")))
    for _ in range(3):
        trial = study.ask()
        try:
            recipe = space.suggest(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            event("pruned")
            continue
        event("a recipe")
        check_point(space, recipe, trial.params)
        study.tell(trial, float(len(dump_stages(as_stages(recipe)))))


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "weights", "models": ["fst"], "base": "base", "weight": math.nan},
        {"kind": "weights", "models": ["fst"], "base": "base", "weight": [0, math.inf]},
        {"kind": "weights", "models": ["fst"], "base": "base", "weight": [-1e308, 1e308]},
        {"kind": "weights", "models": ["fst"], "base": "base", "lambda": [0, 10**400]},
        {"kind": "slerp", "models": ["fst", "nxt"], "t": math.nan},
        {"kind": "expansion", "model": "fst", "scale": math.inf},
        {"kind": "expansion", "model": "fst", "placement": "after", "count": [1, 10**6]},
        {"kind": "layout", "mode": "free", "models": ["fst"], "slices": [1, 10**9]},
        {"kind": "layout", "mode": "dus", "models": ["fst"], "max_params": "1e999"},
        {"kind": "layout", "mode": "dus", "models": ["fst"], "max_params": math.nan},
        {"kind": ["layout"], "mode": "dus", "models": ["fst"]},
        {"kind": "layout", "mode": "dus", "models": [[], "nxt"]},
        {"kind": "layout", "mode": "dus", "models": ["fst"], "x" * 300: 1},
    ],
    ids=lambda spec: repr(spec)[:80],
)
def test_odd_space_specs_are_refused_in_one_line(toy, spec):
    # found once: an OverflowError in the sampler, hours of params asked for, a TypeError, a huge message
    with pytest.raises(UserError) as caught:
        build_space(spec, toy)
    assert_one_line(caught.value, limit=300)


def test_an_expansion_copy_clamped_at_the_first_layer_is_a_point_of_its_space(toy):
    # found once: a block after layer 1 copying 2 layers back copies layer 0, and params() read back 1
    space = build_space({"kind": "expansion", "model": "fst", "placement": "every", "copy": 2}, toy)
    recipe = space.suggest(FixedTrial({"every": 2}))
    assert recipe.slices[1].sources[0].layer_range == (0, 1)
    assert space.suggest(FixedTrial(space.params(recipe))) == recipe


SPACE_KEYS = ["kind", "models", "model", "base", "filters", "anchors", "t", "form", "dtype", "out_dtype",
              "tokenizer_source", "max_layers", "max_params", "method", "weight", "density", "groups", "normalize",
              "lambda", "mode", "m", "width", "stride", "slices", "length", "placement", "count", "every", "copy",
              "scale", "experts", "experts_per_token", "gate_mode", "prompts", "pick_prompts", "stages", "name"]


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_a_mutated_space_spec_builds_a_space_or_is_refused_in_one_line(toy, data):
    name = data.draw(st.sampled_from(sorted(STUDY_SPACES)), label="space")
    spec = data.draw(mutated([STUDY_SPACES[name]], list(toy) + ["blend", "stage1", "nope"], SPACE_KEYS), label="spec")[0]
    try:
        space = build_space(spec, toy)
    except UserError as e:
        assert_one_line(e)
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        trial = study.ask()
        try:
            recipe = space.suggest(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        check_point(space, recipe, trial.params)
        study.tell(trial, 0.0)


# ---- 3. run specs ---------------------------------------------------------------------

# Two valid specs over tiny models next to them: one objective with stages (a pruner, an
# enqueued recipe), and two objectives (a Pareto front) over a composed space.
GOOD_SPECS = [
    {
        "name": "prop",
        "models": {"base": "zoo/base", "fst": "zoo/fst", "nxt": "zoo/nxt"},
        "space": {"kind": "weights", "method": ["task_arithmetic", "ties"], "base": "base", "models": ["fst", "nxt"],
                  "weight": [0, 1]},
        "objectives": [{"kind": "custom", "function": "scores.py:score", "fidelities": [1, 2], "direction": "maximize"}],
        "pruner": "successive_halving",
        "sampler": "tpe",
        "trials": 4,
        "timeout": 60,
        "workers": 1,
        "seed": 0,
        "heldout_top_k": 1,
        "enqueue": ["known.yaml"],
    },
    {
        "name": "front",
        "models": {"base": "zoo/base", "fst": "zoo/fst", "nxt": "zoo/nxt"},
        "space": {"kind": "compose", "stages": [
            {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
            {"kind": "layout", "mode": "dus", "models": ["blend"], "m": [1, 1]}]},
        "objectives": [{"kind": "custom", "function": "scores.py:score", "name": "score"},
                       {"kind": "cost", "measure": "params"}],
        "sampler": {"name": "nsga2", "population_size": 4},
        "timeout": 30,
    },
]
KNOWN = "merge_method: ties\nbase_model: base\nmodels:\n" + "".join(
    f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in ("fst", "nxt")
)
# Values a mutation may swap in for a string: other valid choices, and wrong ones.
SPEC_NAMES = ["base", "fst", "nxt", "nope", "zoo/base", "zoo", "zoo/nope", "scores.py", "known.yaml", "..", "/",
              "random", "qmc", "cmaes", "gp", "nsga2", "optuna.samplers.RandomSampler", "optuna.samplers.nope",
              "median", "hyperband", "paired", "none", "cost", "perplexity", "custom", "scores.py:nope",
              "nope.py:score", "scores.py:score", "params", "layers", "minimize", "sqlite:///nope/x.db", "journal:x.log"]
SPEC_KEYS = ["name", "models", "space", "objectives", "pruner", "sampler", "trials", "timeout", "workers", "storage",
             "seed", "heldout_top_k", "enqueue", "allow_pickle", "trial_timeout", "kind", "function", "fidelities",
             "direction", "key", "heldout_function", "measure", "population_size", "n_startup_trials"]


def file_tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def spec_folder(tmp_path_factory) -> Path:
    """A run spec's folder: tiny models, the score function and a known recipe; each spec is checked once."""
    folder = tmp_path_factory.mktemp("spec")
    for seed, name in enumerate(("base", "fst", "nxt")):
        make_standin(folder / "zoo" / name, "llama", 2, seed=seed, hidden=32)
    (folder / "scores.py").write_text("def score(model, tokenizer, fidelity):\n    return 0.0\n")
    (folder / "known.yaml").write_text(KNOWN)
    for spec in GOOD_SPECS:  # valid as written (this also imports scores.py once, leaving its __pycache__)
        path = folder / "good.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        prepare_run(load_spec(path), resume=False)
        path.unlink()
    return folder


def prepared_or_one_line(spec: dict, folder: Path, elsewhere: Path) -> bool:
    """prepare_run on `spec` written to `folder`, run from `elsewhere`: True if it prepared a run,
    False if refused with one short line, having written nothing."""
    path = folder / "prop.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    before = file_tree(folder)
    with contextlib.chdir(elsewhere):  # relative storage paths land there, not in the checkout
        try:
            prepare_run(load_spec(path), resume=False)
        except UserError as e:
            # the spec's path starts many messages; its length depends on the machine
            assert_one_line(UserError(str(e).replace(str(folder), "…")), limit=300)
            assert file_tree(folder) == before, "a refused spec wrote to its folder"
            assert not any(elsewhere.iterdir()), "a refused spec wrote to the current folder"
            return False
    return True


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_a_mutated_run_spec_prepares_a_run_or_is_refused_in_one_line(spec_folder, tmp_path_factory, data):
    spec = data.draw(st.sampled_from(GOOD_SPECS).flatmap(lambda s: mutated([s], SPEC_NAMES, SPEC_KEYS)), label="spec")[0]
    prepared = prepared_or_one_line(spec, spec_folder, tmp_path_factory.mktemp("cwd"))
    event("prepared" if prepared else "refused")


@pytest.mark.parametrize(
    "change",
    [
        {"seed": -1},  # numpy's seed range: "bad options for tpe" before
        {"seed": 2**32},
        {"name": "x" * 300},  # OSError: file name too long
        {"sampler": {"name": "nsga2", "population_size": 1}},  # ValueError
        {"sampler": ".."},  # TypeError from a relative import
        {"models": {"base": "x" * 300, "fst": "zoo/fst", "nxt": "zoo/nxt"}},  # OSError: file name too long
        {"space": {**GOOD_SPECS[0]["space"], "method": ["x" * 300]}},  # a 400-character line
    ],
    ids=lambda change: repr(change)[:60],
)
def test_run_specs_that_failed_once_are_refused_in_one_line(spec_folder, tmp_path, change):
    assert not prepared_or_one_line({**GOOD_SPECS[0], **change}, spec_folder, tmp_path)


# ---- what a run prints and publishes ------------------------------------------------------------------
#
# Run folders as `mergesearch run` leaves them (run.json, trials.jsonl; best.yaml written by export's own
# code), with models under any aliases, public names and folders of a machine, any scores and held-out
# ties: every YAML block the summary (what `show` and the end of `run` print, off a terminal), the exported
# recipes and the published folder's files hold parses, and nothing published names a folder of the machine.

ALIAS = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
SCORE = st.sampled_from([0.0, 0.5, 1.0, -3.25, 1e-9, 12345.678])  # few values: held-out ties are common


@st.composite
def run_folders(draw):
    aliases = draw(st.lists(ALIAS, min_size=2, max_size=3, unique=True))
    user = draw(ALIAS)
    paths = {a: f"/home/{user}/models dir/{a}" for a in aliases}
    names = {a: draw(st.sampled_from([a, f"org-{user}/{a}.v1", f"{a} (mine)"])) for a in aliases}
    method = draw(st.sampled_from(["linear", "slerp", "task_arithmetic"]))

    def recipe() -> str:
        if method == "slerp":
            t = draw(st.lists(SCORE.map(lambda v: abs(v) % 1), min_size=1, max_size=3))
            body = {"merge_method": "slerp", "base_model": aliases[0], "models": [{"model": a} for a in aliases[:2]],
                    "parameters": {"t": [{"filter": "self_attn", "value": t}, {"value": t[0]}]}}
        else:
            body = {"merge_method": method, "models": [{"model": a, "parameters": {"weight": draw(SCORE)}}
                                                       for a in aliases[1:]]}
            if method == "task_arithmetic":
                body["base_model"] = aliases[0]
            else:
                body["models"].insert(0, {"model": aliases[0], "parameters": {"weight": 1.0}})
        return dump_stages([from_dict(body)])

    recs = []
    for number in range(draw(st.integers(1, 4))):
        state = draw(st.sampled_from(["COMPLETE", "COMPLETE", "PRUNED"]))
        value = draw(SCORE)
        recs.append({"trial": number, "baseline": None, "duplicate_of": None, "state": state,
                     "values": [value] if state == "COMPLETE" else None,
                     "heldout": draw(st.none() | SCORE.map(lambda v: [v])) if state == "COMPLETE" else None,
                     "params": {"w.0": value, "method": method}, "recipe": recipe(),
                     "stages": [{"step": 1, "scores": {"score": value}}], "reason": None})
    baselines = {draw(st.sampled_from(["linear average", "x alone"])): {"values": [draw(SCORE)],
                                                                        "heldout": [draw(SCORE)], "trial": None}}
    directions = [draw(st.sampled_from(["maximize", "minimize"]))]
    meta = {"name": draw(ALIAS), "objectives": ["score"], "directions": directions, "seed": draw(st.integers(0, 9)),
            "model_paths": paths, "model_names": names, "stages": [1], "baselines": baselines,
            "settings": {"space": {"kind": "weights", "models": aliases}, "sampler": "tpe", "pruner": "none",
                         "trials": len(recs), "objectives": [{"kind": "custom"}]}}
    return meta, recs, paths, user


def yaml_blocks_of_a_card(card: str) -> list[str]:
    import re

    return [card.split("---\n")[1]] + re.findall(r"```yaml\n(.*?)```", card, re.S)


@settings(max_examples=60, **SETTINGS)
@given(folder=run_folders())
def test_what_a_run_prints_and_publishes_parses_and_names_no_folder_of_the_machine(folder, tmp_path_factory):
    import io
    import json

    from search.engine.model_card import is_hub_name
    from search.results import export, publish, summary, winner
    from search.results.verdict import winner_vs_baselines
    from search.study import records

    meta, recs, paths, user = folder
    meta["verdict"] = winner_vs_baselines(recs, meta["directions"], meta["baselines"], {})
    run_dir = tmp_path_factory.mktemp("printed") / meta["name"]
    run_dir.mkdir()
    records.write_atomic(run_dir / "run.json", json.dumps(meta))
    records.write_trials(run_dir / "trials.jsonl", recs)
    export.write_run_outputs(run_dir)
    best = winner.winner(recs, meta["directions"])

    out = io.StringIO()
    summary.render(run_dir, summary.stdout_console(out))
    printed = out.getvalue()
    if best is None:
        assert not (run_dir / "best.yaml").exists()
        return
    best_text = (run_dir / "best.yaml").read_text()
    shown = printed.split(f"{run_dir / 'best.yaml'}:\n", 1)[1]
    assert shown.rstrip("\n") == best_text.rstrip("\n") and yaml.safe_load(shown) == yaml.safe_load(best_text)
    if winner.heldout_ties(recs, meta["directions"]):
        assert winner.TIE_RULE in printed

    for r in recs:  # what `export` prints or writes, for any trial
        exported = export.recipe_text(r, meta, "recipe.yaml")
        assert [d for d in yaml.safe_load_all(exported) if d] and loads(exported)  # mergekit's schema
    assert yaml.safe_load(export.recipe_text(best, meta, "best.yaml")) == yaml.safe_load(best_text)

    texts = publish.published_texts(best, meta, recs, "published")
    for name, text in texts.items():
        for path in [*paths.values(), f"/home/{user}", str(run_dir)]:
            assert path not in text, (name, path)
    public = set(meta["model_names"].values())
    assert {m for s in loads(texts["mergekit_config.yml"]) for m in s.referenced_models()} <= public
    blocks = yaml_blocks_of_a_card(texts["README.md"])
    front = yaml.safe_load(blocks[0])
    if "base_model" in front:  # hub ids only, and never an empty list
        assert front["base_model"] and all(is_hub_name(n) for n in front["base_model"])
    for block in blocks[1:]:
        assert yaml.safe_load(block) is not None
