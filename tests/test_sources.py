"""Source models: safetensors (single file or sharded with an index), read once and kept."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tensor_bits

from search.engine.materialize import Materializer
from search.engine.recipe import loads
from search.engine.sources import load_source, read_tensor_infos


def test_sharded_checkpoint_reads_like_a_single_file(standin_zoo, tmp_path):
    single = standin_zoo.path("toy/base")
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2

    a, b = load_source("single", single), load_source("sharded", sharded)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert b.tensors[name].dtype == a.tensors[name].dtype
        assert (tensor_bits(a.tensors[name]) == tensor_bits(b.tensors[name])).all(), name
    infos = read_tensor_infos("sharded", sharded)
    assert {k: (v.shape, v.dtype) for k, v in infos.items()} == {k: (tuple(t.shape), t.dtype) for k, t in a.tensors.items()}

    recipe = loads("models:\n  - model: single\n  - model: sharded\nmerge_method: slerp\nbase_model: single\nparameters: {t: 0.0}\n")
    mat = Materializer({"single": single, "sharded": sharded})
    _, sd = mat.state_dict(recipe)
    assert sd["model.norm.weight"] is mat.source("single").tensors["model.norm.weight"]


def test_sources_load_once(standin_zoo):
    mat = Materializer({"m": standin_zoo.path("toy/math")})
    assert mat.source("m") is mat.source("m")


@pytest.mark.parametrize("source,target", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_convert_into_gives_the_bits_of_to(source, target):
    """The conversion a recipe's `dtype:` runs gives torch's own bits: rounding, overflow to inf,
    subnormals, -0 and NaN, over more than one piece."""
    from search.engine.sources import CONVERT_PIECE, convert_into

    n = 2 * CONVERT_PIECE + 3
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, n)).to(source)
    x[:5] = torch.tensor([float("nan"), float("inf"), -0.0, 70000.0, -1e-6])
    expected = x.to(target)
    got = convert_into(torch.empty(n, dtype=target), x)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
