"""Sources that do not fit: the mode a worker picks from sizes, and streamed candidates with the resident bits.

"streamed" is forced with a small memory limit. On the CPU it reads the mapped files
in place (with read-ahead); `stage_sources=True` also copies each job's inputs through
the two staging slots a GPU worker streams through (search/engine/streaming.py), so
that ring runs here without a GPU.
"""

from __future__ import annotations

import pytest
from conftest import assert_same_tensors
from safetensors.torch import load_file

from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.memory_estimate import ALLOCATOR_SLACK, MemoryNeed
from search.engine.memory_plan import (
    LIMIT_ENV,
    RESIDENT,
    SHARED_MMAP,
    STREAMED,
    choose_sources_mode,
    forced_mode,
    parse_bytes,
    plan_memory,
)
from search.engine.recipe import loads

GIB = 1 << 30

def need(sources: int, candidate: int, evaluation: int = 0, runtime: int = 0, cache: int = 0, window: int = 0) -> MemoryNeed:
    return MemoryNeed(runtime=runtime, sources=sources, candidate=candidate, temporaries=0, evaluation=evaluation,
                      cache_useful=cache, window=window)


# (source bytes, candidate bytes, evaluation bytes, available bytes, device) -> mode
MODE_TABLE = [
    (56 * GIB, 14 * GIB, 3 * GIB, 139 * GIB, "cuda", RESIDENT),  # four 7B bf16 sources on an H200
    (56 * GIB, 14 * GIB, 3 * GIB, 44 * GIB, "cuda", STREAMED),  # ... on a 48 GB GPU
    (56 * GIB, 14 * GIB, 3 * GIB, 73 * GIB + ALLOCATOR_SLACK, "cuda", RESIDENT),  # exactly fits
    (56 * GIB, 14 * GIB, 3 * GIB, 73 * GIB + ALLOCATOR_SLACK - 1, "cuda", STREAMED),  # one byte short
    (4 * GIB, 1 * GIB, 1 * GIB, 20 * GIB, "cpu", SHARED_MMAP),
    (40 * GIB, 10 * GIB, 2 * GIB, 20 * GIB, "cpu", STREAMED),
    (0, 0, 0, ALLOCATOR_SLACK, "cpu", SHARED_MMAP),
]


@pytest.mark.parametrize("sources,candidate,evaluation,available,device,mode", MODE_TABLE)
def test_mode_from_sizes(sources, candidate, evaluation, available, device, mode):
    assert choose_sources_mode(need(sources, candidate, evaluation), available, device) == mode


def test_plan_from_a_limit_and_from_the_environment(monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    assert plan_memory(need(GIB, GIB), "cpu", limit=1).mode == STREAMED
    assert plan_memory(need(GIB, GIB), "cpu", limit=1 << 50).mode == SHARED_MMAP
    assert plan_memory(need(GIB, GIB), "cuda:0", limit=1 << 50).mode == RESIDENT
    monkeypatch.setenv(LIMIT_ENV, "2G")
    plan = plan_memory(need(GIB, GIB), "cpu")
    assert (plan.mode, plan.available_bytes, plan.limit_from) == (STREAMED, 2 * GIB, LIMIT_ENV)
    assert "streamed" in plan.describe() and "2.00 GiB available" in plan.describe()
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(UserError, match=LIMIT_ENV):
        plan_memory(need(GIB, GIB), "cpu")


def test_the_cache_gets_half_of_what_is_left_at_most_what_it_can_use():
    """Caches are sized from the memory left, not fixed: what the other parts leave, halved, capped by use."""
    plan = plan_memory(need(GIB, GIB, cache=8 * GIB), "cpu", limit=10 * GIB)
    assert plan.cache_bytes == (10 * GIB - plan.need.required) // 2
    assert plan.total_bytes == plan.need.required + plan.cache_bytes <= 10 * GIB
    assert plan_memory(need(GIB, GIB, cache=GIB // 4), "cpu", limit=10 * GIB).cache_bytes == GIB // 4
    streamed = plan_memory(need(8 * GIB, GIB, cache=8 * GIB, window=GIB // 8), "cpu", limit=4 * GIB)
    assert streamed.mode == STREAMED and streamed.need.sources == GIB // 8  # the jobs in flight, not the sources
    assert streamed.cache_bytes == (4 * GIB - streamed.need.required) // 2


@pytest.mark.parametrize("text,value", [("123", 123), ("512M", 512 << 20), ("8G", 8 << 30), ("1.5t", 3 << 39),
                                        ("4GiB", 4 << 30), (" 2 KB ", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_forced_mode():
    assert forced_mode("resident", "cpu") == SHARED_MMAP
    assert forced_mode("resident", "cuda:1") == RESIDENT
    assert forced_mode("streamed", "cpu") == STREAMED
    with pytest.raises(UserError, match="resident or streamed"):
        forced_mode("swap", "cpu")


SLERP = """
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
      value: [0.2, 1]
    - value: [0.1, 0.9]
"""

TIES = """
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
"""

PASSTHROUGH = """
slices:
  - sources:
    - model: toy/base
      layer_range: [0, 2]
  - sources:
    - model: toy/math
      layer_range: [1, 3]
      parameters: {scale: [0.5, 1.5]}
  - sources:
    - model: toy/code
      layer_range: [3, 4]
merge_method: passthrough
dtype: bfloat16
"""

MULTI_STAGE = """
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
"""

RECIPES = {"slerp": SLERP, "ties": TIES, "passthrough": PASSTHROUGH, "multi-stage": MULTI_STAGE}
TOYS = ["toy/base", "toy/math", "toy/code", "toy/chat"]

# how each materializer keeps its sources: (mode it must report, Materializer keywords)
MODES = {
    "resident": (SHARED_MMAP, dict(memory_limit=1 << 50)),
    "streamed": (STREAMED, dict(memory_limit=1)),
    "streamed-staged": (STREAMED, dict(memory_limit=1, stage_sources=True)),
}


@pytest.fixture(scope="module")
def materializers(standin_zoo, one_torch_thread):
    paths = standin_zoo.paths(TOYS)
    made = {name: Materializer(paths, **kwargs) for name, (_, kwargs) in MODES.items()}
    for name, (mode, _) in MODES.items():
        assert made[name].memory_plan().mode == mode, name
    return made


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_streamed_state_dict_has_the_resident_bits(recipe, materializers):
    stages = loads(RECIPES[recipe])
    _, expected = materializers["resident"].state_dict(stages, seed=0)
    for mode in ("streamed", "streamed-staged"):
        _, got = materializers[mode].state_dict(stages, seed=0)
        assert_same_tensors(got, expected, f"{recipe} {mode}")


def test_streamed_live_models_have_the_resident_bits_candidate_after_candidate(materializers):
    """Candidates in a row on one resident live model: a parameter aliased to a source by one
    candidate and computed by the next is rebound, never written through; staged inputs are
    copied out before their slot is refilled."""
    texts = [SLERP, SLERP.replace("value: 0\n", "value: 0.4\n"), TIES, SLERP, PASSTHROUGH]
    for k, text in enumerate(texts):
        stages = loads(text)
        expected = {n: p.detach().clone() for n, p in materializers["resident"].materialize(stages).named_parameters()}
        for mode in ("streamed", "streamed-staged"):
            got = {n: p.detach() for n, p in materializers[mode].materialize(stages).named_parameters()}
            assert_same_tensors(got, expected, f"candidate {k} {mode}")


def test_candidates_never_write_into_sources(materializers, standin_zoo):
    """After every candidate above, each mapped source still holds its file's bytes."""
    mat = materializers["resident"]
    for text in (SLERP, TIES, SLERP.replace("value: 0\n", "value: 0.6\n"), PASSTHROUGH, SLERP):
        mat.materialize(loads(text))
    for name in ("toy/base", "toy/math", "toy/code"):
        source = mat.source(name)
        assert source.mapped
        on_disk = load_file(standin_zoo.path(name) / "model.safetensors")
        assert_same_tensors(source.tensors, on_disk, name)


def test_memory_limit_from_the_environment_streams(standin_zoo, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1M")
    mat = Materializer(standin_zoo.paths(["toy/base", "toy/math"]))
    plan = mat.memory_plan()
    assert plan.mode == STREAMED and plan.available_bytes == 1 << 20
    assert plan.source_bytes > 0 and plan.candidate_bytes > 0
    monkeypatch.delenv(LIMIT_ENV)
    assert Materializer(standin_zoo.paths(["toy/base"]), sources="streamed").memory_plan().mode == STREAMED


def test_streamed_sources_stay_on_the_host_views_of_their_files(materializers):
    source = materializers["streamed"].source("toy/base")
    assert source.mapped and all(t.device.type == "cpu" for t in source.tensors.values())
    assert not source.converted  # streamed: no converted copy of the sources is kept
