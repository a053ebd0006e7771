"""Every merge method, built in memory by Materializer.state_dict, against mergekit-yaml 0.1.5.

Each recipe runs through mergekit's own CLI on stand-in models and through our
engine; the tensors must agree in names, shapes, dtypes and bytes, and
config.json in the fields that shape the model. The recipes exercise each
method's parameters (weights, gradients, filter lists, normalize, lambda,
density, int8_mask, rescale, scale), dtype/out_dtype, the shortcuts that alias a
source tensor (t = 0 / 1, weights 1/0, scale 1) and the multi-stage form.
"""

from __future__ import annotations

import pytest
import torch
from conftest import STANDINS, assert_same_tensors

from search.engine.materialize import Materializer
from search.engine.recipe import loads

# (id, recipe, random seed)
RECIPES = [
    (
        "linear-weights",
        """
models:
  - model: toy/base
    parameters: {weight: 0.3}
  - model: toy/math
    parameters: {weight: [0.2, 0.9]}
  - model: toy/code
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.1
merge_method: linear
dtype: bfloat16
""",
        None,
    ),
    (
        "linear-tokenizer-source-base",
        """
models:
  - model: toy/math
    parameters: {weight: 0.5}
  - model: toy/code
    parameters: {weight: 0.25}
merge_method: linear
base_model: toy/math
tokenizer_source: base
dtype: bfloat16
""",
        None,
    ),
    (
        "linear-unnormalized-float32-out-bf16",
        """
models:
  - model: toy/math
  - model: toy/code
merge_method: linear
parameters:
  weight: [0.25, 0.75]
  normalize: false
dtype: float32
out_dtype: bfloat16
""",
        None,
    ),
    (
        "linear-one-hot-weights",
        """
models:
  - model: toy/math
    parameters:
      weight: [{filter: self_attn, value: 1.0}, {value: 0.0}]
  - model: toy/code
    parameters:
      weight: [{filter: self_attn, value: 0.0}, {value: 1.0}]
merge_method: linear
""",
        None,
    ),
    (
        "linear-qwen2-biases-float16",
        """
models:
  - model: toy/qwen-base
    parameters: {weight: 0.6}
  - model: toy/qwen-ft
    parameters: {weight: 0.4}
merge_method: linear
dtype: float16
""",
        None,
    ),
    (
        "slerp-curves-phi",
        """
slices:
  - sources:
      - model: toy/phi-a
        layer_range: [0, 3]
      - model: toy/phi-b
        layer_range: [0, 3]
merge_method: slerp
base_model: toy/phi-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
        None,
    ),
    (
        "slerp-endpoints-alias",
        """
models:
  - model: toy/base
  - model: toy/math
merge_method: slerp
base_model: toy/math
parameters:
  t:
    - filter: self_attn
      value: 0
    - filter: mlp
      value: 1
    - value: [0.1, 0.9]
""",
        None,
    ),
    (
        "slerp-colinear-gemma-bf16-out-float32",
        """
models:
  - model: toy/gemma-base
  - model: toy/gemma-ft
merge_method: slerp
base_model: toy/gemma-base
parameters:
  t: [0.2, 0.6, 0.4]
dtype: bfloat16
out_dtype: float32
""",
        None,
    ),
    (
        "task-arithmetic",
        """
models:
  - model: toy/math
    parameters: {weight: 0.7}
  - model: toy/code
    parameters: {weight: [0.3, 1.2]}
merge_method: task_arithmetic
base_model: toy/base
parameters: {lambda: 0.9, normalize: true}
dtype: bfloat16
""",
        None,
    ),
    (
        "ties-int8-mask-float16",
        """
models:
  - model: toy/base
  - model: toy/math
    parameters: {weight: 0.7, density: 0.5}
  - model: toy/code
    parameters: {weight: 0.4, density: [0.3, 0.9]}
merge_method: ties
base_model: toy/base
parameters: {int8_mask: true}
dtype: float16
""",
        None,
    ),
    (
        "ties-three-defaults",
        """
models:
  - model: toy/math
    parameters: {weight: 1.0, density: 0.3}
  - model: toy/code
    parameters: {weight: 1.0, density: 0.3}
  - model: toy/chat
    parameters: {weight: 0.5, density: 0.6}
merge_method: ties
base_model: toy/base
""",
        None,
    ),
    (
        "dare-ties-seed-7",
        """
models:
  - model: toy/math
    parameters: {weight: 0.7, density: 0.5}
  - model: toy/code
    parameters: {weight: 0.4, density: 0.7}
merge_method: dare_ties
base_model: toy/base
dtype: bfloat16
""",
        7,
    ),
    (
        "dare-linear-seed-3-float16",
        """
models:
  - model: toy/math
    parameters: {weight: 0.7, density: [0.4, 0.8]}
  - model: toy/code
    parameters: {weight: 0.4, density: 1.0}
merge_method: dare_linear
base_model: toy/base
parameters: {lambda: 1.1}
dtype: float16
""",
        3,
    ),
    (
        "dare-ties-no-rescale-seed-11",
        """
models:
  - model: toy/math
    parameters: {weight: 0.5, density: 0.3}
  - model: toy/chat
    parameters: {weight: 0.5, density: 0.6}
merge_method: dare_ties
base_model: toy/base
parameters: {rescale: false, normalize: true}
""",
        11,
    ),
    (
        "passthrough-scale",
        """
slices:
  - sources:
    - model: toy/mistral
      layer_range: [0, 2]
  - sources:
    - model: toy/mistral
      layer_range: [1, 2]
      parameters:
        scale:
          - filter: o_proj
            value: 0.0
          - filter: down_proj
            value: 0.0
          - value: 1.0
  - sources:
    - model: toy/mistral
      layer_range: [2, 4]
      parameters: {scale: [0.5, 1.5]}
merge_method: passthrough
dtype: bfloat16
""",
        None,
    ),
    (
        "multi-stage",
        """
name: mid
models:
  - model: toy/math
  - model: toy/code
merge_method: slerp
base_model: toy/math
parameters: {t: [0.3, 0.7]}
dtype: float32
---
models:
  - model: mid
    parameters: {weight: 0.8}
  - model: toy/chat
    parameters: {weight: 0.3}
merge_method: task_arithmetic
base_model: toy/base
dtype: bfloat16
""",
        None,
    ),
    (
        "delegated-della-seed-5",
        """
models:
  - model: toy/math
    parameters: {weight: 0.6, density: 0.5, epsilon: 0.1}
  - model: toy/code
    parameters: {weight: 0.6, density: 0.4}
merge_method: della
base_model: toy/base
dtype: bfloat16
""",
        5,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _prefetch(mergekit_oracle):
    mergekit_oracle.prefetch([(text, seed) for _, text, seed in RECIPES])


@pytest.fixture(scope="module")
def materializer(standin_zoo):
    return Materializer(standin_zoo.paths([n for n in STANDINS if n.startswith("toy/")]))


@pytest.mark.parametrize("text,seed", [(t, s) for _, t, s in RECIPES], ids=[i for i, _, _ in RECIPES])
def test_state_dict_equals_mergekit(text, seed, materializer, mergekit_oracle):
    config, ours = materializer.state_dict(loads(text), seed=seed)
    their_config, theirs = mergekit_oracle.build(text, seed)
    assert_same_tensors(ours, theirs, "state_dict")
    for key in ("num_hidden_layers", "architectures", "dtype", "hidden_size", "vocab_size"):
        assert config.get(key) == their_config.get(key), key


def test_seed_changes_dare_and_is_repeatable(materializer):
    stages = loads(RECIPES[[r[0] for r in RECIPES].index("dare-ties-seed-7")][1])
    _, a = materializer.state_dict(stages, seed=7)
    _, again = materializer.state_dict(stages, seed=7)
    _, other = materializer.state_dict(stages, seed=8)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name], again[name])
    assert not torch.equal(a[name], other[name])


def test_one_hot_and_endpoint_merges_alias_the_source(materializer):
    """Where mergekit stores a source's bytes unchanged, the engine hands back that tensor itself."""
    src_math = materializer.source("toy/math")
    _, sd = materializer.state_dict(loads(RECIPES[[r[0] for r in RECIPES].index("slerp-endpoints-alias")][1]))
    name = "model.layers.1.self_attn.q_proj.weight"  # t = 0: the base (toy/math)
    assert sd[name] is src_math.tensors[name]
    _, sd = materializer.state_dict(loads(RECIPES[[r[0] for r in RECIPES].index("linear-one-hot-weights")][1]))
    assert sd[name] is src_math.tensors[name]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager-pieces"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_pass_is_bit_exact(dtype, compiled, monkeypatch):
    """Large tensors take the compiled pass (or, without it, eager ops over cache-sized
    pieces); either must give mergekit's slerp to the bit (statistics over several of
    mergekit's 1M-element chunks included)."""
    monkeypatch.setenv("MERGESEARCH_COMPILE", "1" if compiled else "0")
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    from search.engine.methods import Context, Inputs, StatCache
    from search.engine.methods import slerp as ours
    from search.engine.methods.fused import FUSE_MIN_NUMEL, use_fused

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2048, 1100, generator=g) * 0.02).to(dtype)
    b = (a.float() + torch.randn(2048, 1100, generator=g) * 0.01).to(dtype)
    a.view(-1)[:64] = 0.0
    a.view(-1)[64:128] = -0.0
    b.view(-1)[100:200] = torch.finfo(dtype).tiny / 4  # subnormal
    assert a.numel() >= FUSE_MIN_NUMEL and use_fused(a) == compiled
    ctx = Context(cache=StatCache())
    for t in (0.0, 0.13, 0.5, 0.77, 1.0):
        got = ours.merge(Inputs("w", [a, b], [None, None], 0), {"t": t}, [{}, {}], ctx)
        want = mergekit_slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0))[0]
        assert got.dtype == want.dtype
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), t


def test_linear_over_many_pieces_matches_mergekit():
    """Tensors larger than one cache-sized piece: the piecewise pass equals mergekit's whole-tensor one."""
    from mergekit.merge_methods.api import merge_tensors

    from search.engine.methods import Context, Inputs, StatCache
    from search.engine.methods import linear as ours

    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(1000, 700, generator=g) * 0.02).to(torch.bfloat16) for _ in range(3)]
    weights = [0.2, 0.5, 0.45]
    for normalize in (True, False):
        got = ours.merge(Inputs("w", xs, [None] * 3, None), {"normalize": normalize}, [{"weight": w} for w in weights], Context(cache=StatCache()))
        want = merge_tensors(xs, "linear", parameters={"weight": weights, "normalize": normalize})
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
