"""The seed recipes, built in memory, against mergekit-yaml 0.1.5 on stand-ins of the same depth.

For every seed but the MoE one (tests/test_moe_vs_mergekit.py covers that):
- Materializer.state_dict gives mergekit's tensors to the byte, and its config's
  depth and architecture;
- Materializer.materialize gives a live model holding those same tensors, whose
  logits equal those of mergekit's folder loaded by transformers;
- layers a recipe takes unchanged are the source tensors themselves (aliased);
- candidates of one shape reuse one resident model and its buffers, and memory
  stays flat over many candidates.
"""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SEEDS, assert_same_tensors, tensor_bits

from search.engine.materialize import Materializer
from search.engine.recipe import load, loads

SEED_FILES = sorted(p for p in SEEDS.glob("*.yml") if "moe" not in p.name)


@pytest.fixture(scope="module")
def seed_models(standin_zoo):
    names = []
    for f in SEED_FILES:
        for stage in load(f):
            names += stage.referenced_models()
    return standin_zoo.paths(dict.fromkeys(names))


@pytest.fixture(scope="module", autouse=True)
def _prefetch(mergekit_oracle, seed_models):
    mergekit_oracle.prefetch([(f.read_text(), None) for f in SEED_FILES])


@pytest.fixture(scope="module")
def materializer(seed_models):
    return Materializer(seed_models)


def test_every_seed_is_covered():
    assert len(SEED_FILES) == 6, [f.name for f in SEED_FILES]


@pytest.mark.parametrize("seed_file", SEED_FILES, ids=[f.stem for f in SEED_FILES])
def test_state_dict_equals_mergekit(seed_file: Path, materializer, mergekit_oracle):
    config, ours = materializer.state_dict(load(seed_file))
    their_config, theirs = mergekit_oracle.build(seed_file.read_text())
    assert_same_tensors(ours, theirs, seed_file.name)
    for key in ("num_hidden_layers", "architectures", "dtype", "hidden_size", "model_type"):
        assert config.get(key) == their_config.get(key), key


@pytest.mark.parametrize("seed_file", SEED_FILES, ids=[f.stem for f in SEED_FILES])
def test_one_shot_conversion_equals_mergekit(seed_file: Path, seed_models, mergekit_oracle):
    """keep_converted=False (what `mergesearch merge` uses): inputs converted to the recipe's dtype
    into reused buffers, tensor by tensor; a result that is such an input is copied out in time."""
    materializer = Materializer(seed_models, keep_converted=False)
    _, ours = materializer.state_dict(load(seed_file))
    _, theirs = mergekit_oracle.build(seed_file.read_text())
    assert_same_tensors(ours, theirs, seed_file.name)
    assert all(source.converted == {} for source in materializer._sources.values())


@pytest.mark.parametrize("seed_file", SEED_FILES, ids=[f.stem for f in SEED_FILES])
def test_materialize_equals_mergekit_model(seed_file: Path, materializer, mergekit_oracle, tmp_path):
    stages = load(seed_file)
    model = materializer.materialize(stages)
    their_config, theirs = mergekit_oracle.build(seed_file.read_text())
    params = dict(model.named_parameters())
    assert set(params) <= set(theirs)
    for name, p in params.items():
        assert p.dtype == theirs[name].dtype and torch.equal(tensor_bits(p.data), tensor_bits(theirs[name])), name
    assert model.config.num_hidden_layers == their_config["num_hidden_layers"]
    assert not model.training

    # The live model computes what mergekit's folder, loaded by transformers, computes.
    reference = transformers.AutoModelForCausalLM.from_pretrained(mergekit_oracle.folder(seed_file.read_text()))
    reference.eval()
    assert reference.dtype == model.dtype
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# seed -> how many layers have scaled (computed, not aliased) o_proj / down_proj
PASSTHROUGH = {
    "cerebrum-interleave-56.yml": 0,
    "solar-depth-upscale.yml": 0,
    "llama-pro-interleaved-expansion.yml": 8,
    "openchat-blockexpansion-36-end.yml": 4,
}


@pytest.mark.parametrize("seed_name", PASSTHROUGH)
def test_unchanged_layers_alias_the_source(seed_name, materializer):
    stages = load(SEEDS / seed_name)
    (stage,) = stages
    source = materializer.source(stage.referenced_models()[0])
    _, sd = materializer.state_dict(stages)
    params = dict(materializer.materialize(stages).named_parameters())
    scaled_layers = 0
    out_layer = 0
    for s in stage.slices:
        src = s.sources[0]
        scaled = bool(src.parameters and "scale" in src.parameters)
        for offset in range(s.num_layers):
            layer_in = src.layer_range[0] + offset
            for part in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm"):  # scale 1.0 or none
                name_in, name_out = f"model.layers.{layer_in}.{part}.weight", f"model.layers.{out_layer}.{part}.weight"
                assert sd[name_out] is source.tensors[name_in]
                assert params[name_out].data_ptr() == source.tensors[name_in].data_ptr()
            name_in, name_out = f"model.layers.{layer_in}.self_attn.o_proj.weight", f"model.layers.{out_layer}.self_attn.o_proj.weight"
            if scaled:  # scale 0: computed into the model's own buffer
                assert params[name_out].data_ptr() != source.tensors[name_in].data_ptr()
                assert not params[name_out].data.any()
                scaled_layers += 1
            else:
                assert params[name_out].data_ptr() == source.tensors[name_in].data_ptr()
            out_layer += 1
    assert scaled_layers == PASSTHROUGH[seed_name]
    assert params["model.embed_tokens.weight"].data_ptr() == source.tensors["model.embed_tokens.weight"].data_ptr()


PHIGMENT_LIKE = """
slices:
  - sources:
      - model: liminerity/phive
        layer_range: [0, 32]
      - model: mobiuslabsgmbh/aanaphi2-v0.1
        layer_range: [0, 32]
merge_method: slerp
base_model: liminerity/phive
parameters:
  t:
    - filter: self_attn
      value: {attn}
    - filter: mlp
      value: {mlp}
    - value: {rest}
dtype: float16
"""


def candidate(i: int) -> list:
    g = torch.Generator().manual_seed(i)
    attn, mlp = torch.rand(5, generator=g).tolist(), torch.rand(5, generator=g).tolist()
    return loads(PHIGMENT_LIKE.format(attn=[round(x, 3) for x in attn], mlp=[round(x, 3) for x in mlp], rest=round(float(torch.rand(1, generator=g)), 3)))


def test_candidates_reuse_one_model_and_its_buffers(materializer):
    first = materializer.materialize(candidate(0))
    ptrs = {n: p.data_ptr() for n, p in first.named_parameters()}
    values = {n: p.detach().clone() for n, p in first.named_parameters()}
    second = materializer.materialize(candidate(1))
    assert second is first
    assert {n: p.data_ptr() for n, p in second.named_parameters()} == ptrs
    changed = [n for n, p in second.named_parameters() if not torch.equal(p, values[n])]
    assert len(changed) > 400  # a different candidate, written over the same buffers
    _, sd = materializer.state_dict(candidate(1))
    for n, p in second.named_parameters():
        assert torch.equal(tensor_bits(p.data), tensor_bits(sd[n])), n


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_memory_stays_flat_over_many_candidates(materializer):
    for i in range(5):  # warm-up: caches and scratch buffers reach their size
        materializer.materialize(candidate(i))
    gc.collect()
    before = _rss_mib()
    one_candidate = sum(p.numel() * p.element_size() for p in materializer.materialize(candidate(0)).parameters()) / 2**20
    for i in range(60):
        materializer.materialize(candidate(100 + i))
    gc.collect()
    grown = _rss_mib() - before
    # A copy per candidate would be 60 x one_candidate; allow allocator noise of a few.
    assert grown < 4 * one_candidate + 8, (grown, one_candidate)


def test_moe_seed_materializes_the_mixtral_it_builds(standin_zoo):
    text = (SEEDS / "swallow-moe-4x7b.yml").read_text()
    stages = loads(text)
    mat = Materializer(standin_zoo.paths(stages[0].referenced_models()))
    config, sd = mat.state_dict(stages, seed=3)
    model = mat.materialize(stages, seed=3)
    assert isinstance(model, transformers.MixtralForCausalLM)
    for n, p in model.named_parameters():
        assert torch.equal(tensor_bits(p.data), tensor_bits(sd[n])), n
