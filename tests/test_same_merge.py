"""Recipes spelled apart that mergekit reads alike (search/engine/same_merge.py), and the baselines it lets
join their space: a default that lies in the space is a point of it, whatever the space kind and however
the default is written; one that does not, is not.

`same_merge` is checked against the engine itself: recipes it calls the same build the same tensors,
bit for bit, on stand-in models; and recipes that differ in one value are told apart.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import FixedTrial

from conftest import assert_same_tensors
from search.engine.errors import UserError
from search.engine.recipe import Conditional, InputSlice, OutputSlice, dump_stages, as_stages, loads
from search.engine.same_merge import same_merge
from spaces import build_space
from test_properties import SETTINGS
from test_spaces import toy, zoo  # noqa: F401  (fixtures)

# space spec -> the names of its defaults that are points of it
DEFAULTS_IN_THE_SPACE = [
    ({"kind": "slerp", "models": ["fst", "nxt"]}, {"slerp t=0.5"}),
    ({"kind": "slerp", "models": ["fst", "nxt"], "form": "slices", "anchors": {"self_attn": 8, "mlp": 1, "rest": 3}},
     {"slerp t=0.5"}),
    ({"kind": "slerp", "models": ["fst", "nxt"], "t": [0.6, 1]}, set()),  # 0.5 is outside the range
    ({"kind": "weights", "method": ["linear", "ties"], "base": "base", "models": ["fst", "nxt"], "groups": 2,
      "normalize": [True, False], "lambda": [0.5, 1.5]}, {"linear average", "ties w=1 d=0.5"}),
    ({"kind": "weights", "method": "ties", "base": "base", "models": ["fst", "nxt"], "weight": [0, 0.9]}, set()),
    ({"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]}, set()),
    ({"kind": "layout", "mode": "free", "models": ["deep"], "slices": [1, 3], "length": [1, 12]}, {"deep alone"}),
    ({"kind": "layout", "mode": "dus", "models": ["fst"]}, set()),
    ({"kind": "expansion", "model": "base", "placement": ["end"], "count": [1, 2]}, set()),
    ({"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "gate_mode": ["random", "hidden"],
      "prompts": {"fst": ["a"], "nxt": ["b"], "cnt": ["c"]}}, {"all experts"}),
    ({"kind": "compose", "stages": [
        {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
        {"kind": "weights", "method": "ties", "base": "base", "models": ["blend", "cnt"]}]},
     {"blend: slerp t=0.5, then stage2: ties w=1 d=0.5"}),
    ({"kind": "compose", "stages": [  # a `models:` default over a stage's output, as one slice per group
        {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
        {"kind": "weights", "method": ["ties", "linear"], "base": "base", "models": ["blend", "cnt"], "groups": 2}]},
     {"blend: slerp t=0.5, then stage2: ties w=1 d=0.5", "blend: slerp t=0.5, then stage2: linear average"}),
]


@pytest.mark.parametrize("spec, inside", DEFAULTS_IN_THE_SPACE, ids=lambda x: str(x)[:60] if isinstance(x, dict) else "")
def test_a_default_that_lies_in_its_space_is_a_point_of_it_whatever_the_kind(toy, spec, inside):
    space = build_space(spec, toy)
    found = set()
    for name, recipe in space.defaults().items():
        try:
            params = space.params(recipe)
        except UserError:
            continue
        found.add(name)
        assert same_merge(space.suggest(FixedTrial(params)), recipe, space.depth), name
    assert found == inside


# ---- the same tensors, bit for bit ------------------------------------------------------------------

SLERP = "merge_method: slerp\nbase_model: toy/math\nmodels:\n  - model: toy/math\n  - model: toy/code\n"
CURVES = SLERP + ("parameters:\n  t:\n    - {filter: self_attn, value: [0.5, 0.5, 0.5]}\n"
                  "    - {filter: mlp, value: 0.5}\n    - {value: [0.5, 0.5]}\n")
TIES = ("merge_method: ties\nbase_model: toy/base\nmodels:\n  - model: toy/math\n    parameters: {weight: 1.0, density: 0.5}\n"
        "  - model: toy/code\n    parameters: {weight: 1.0, density: 0.5}\n")
TIES_SLICES = "merge_method: ties\nbase_model: toy/base\nparameters: {normalize: true, lambda: 1.0}\nslices:\n" + "".join(
    f"  - sources:\n      - {{model: toy/math, layer_range: {r}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
    f"      - {{model: toy/code, layer_range: {r}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
    f"      - {{model: toy/base, layer_range: {r}}}\n" for r in ([0, 2], [2, 4]))

ALIKE = {
    "t as one number, and as curves of equal anchors": (SLERP + "parameters: {t: 0.5}\n", CURVES),
    "a gradient of 2 anchors, and of 3 on the same line": (SLERP + "parameters: {t: [0.0, 1.0]}\n",
                                                          SLERP + "parameters: {t: [0.0, 0.5, 1.0]}\n"),
    "models:, and one slice per half with the defaults written out": (TIES, TIES_SLICES),
    "slices cut at another layer": (TIES_SLICES, TIES_SLICES.replace("[0, 2]", "[0, 1]").replace("[2, 4]", "[1, 4]")),
}
APART = {
    "t off by a little": (SLERP + "parameters: {t: 0.5}\n", SLERP + "parameters: {t: 0.50001}\n"),
    "one filter's value": (CURVES, CURVES.replace("{filter: mlp, value: 0.5}", "{filter: mlp, value: 0.4}")),
    "normalize other than the default": (TIES, TIES_SLICES.replace("normalize: true", "normalize: false")),
    "another base": (TIES, TIES.replace("base_model: toy/base", "base_model: toy/chat")),
    "the layers a slice reads": (TIES_SLICES, TIES_SLICES.replace("[2, 4]", "[1, 3]")),
}


def depth_of(zoo) -> callable:
    from spaces.model_info import read_model_infos

    infos = read_model_infos({n: zoo.path(n) for n in ("toy/base", "toy/math", "toy/code", "toy/chat")})
    return lambda name: infos[name].num_layers


@pytest.mark.parametrize("case", list(ALIKE))
def test_recipes_read_alike_build_the_same_tensors(case, standin_zoo, one_torch_thread):
    from search.engine.materialize import Materializer

    a, b = (loads(text) for text in ALIKE[case])
    assert same_merge(a, b, depth_of(standin_zoo))
    models = standin_zoo.paths(["toy/base", "toy/math", "toy/code"])
    _, ours = Materializer(models).state_dict(a)
    _, theirs = Materializer(models).state_dict(b)
    assert_same_tensors(ours, theirs, case)


@pytest.mark.parametrize("case", list(APART))
def test_recipes_that_differ_in_one_value_are_told_apart(case, standin_zoo):
    a, b = (loads(text) for text in APART[case])
    assert not same_merge(a, b, depth_of(standin_zoo))


# ---- any point of a slerp space, spelled otherwise ------------------------------------------------


def respelled(recipe, num_layers: int, as_slices: bool):
    """The recipe as a person might write it: curves of equal anchors as one number, three equal curves as
    one setting, and `models:` as one slice over every layer."""
    curves = []
    for cond in recipe.parameters["t"]:
        value = cond.value
        if isinstance(value, list) and len(set(value)) == 1:
            value = value[0]
        curves.append(Conditional(filter=cond.filter, value=value))
    values = [c.value for c in curves]
    t = values[0] if all(v == values[0] for v in values) else curves
    update = {"parameters": {"t": t}}
    if as_slices:
        sources = [InputSlice(model=m.model, layer_range=(0, num_layers)) for m in recipe.models]
        update.update(models=None, slices=[OutputSlice(sources=sources)])
    return recipe.model_copy(update=update)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_any_slerp_point_written_otherwise_is_the_same_point(toy, data):
    anchors = data.draw(st.integers(1, 4), label="anchors")
    space = build_space({"kind": "slerp", "models": ["fst", "nxt"], "anchors": anchors}, toy)
    pool = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=3), label="values")
    params = {f"t.{c}.{j}": data.draw(st.sampled_from(pool)) for c in ("self_attn", "mlp", "rest") for j in range(anchors)}
    recipe = space.suggest(FixedTrial(params))
    other = respelled(recipe, space.depth("fst"), data.draw(st.booleans(), label="as slices"))
    assert same_merge(other, recipe, space.depth)
    assert space.params(other) == params
    changed = dict(params)
    key = data.draw(st.sampled_from(sorted(params)), label="changed")
    changed[key] = 0.75 if params[key] != 0.75 else 0.125
    assert not same_merge(space.suggest(FixedTrial(changed)), recipe, space.depth)
    assert dump_stages(as_stages(space.suggest(FixedTrial(space.params(other))))) == dump_stages(as_stages(recipe))
