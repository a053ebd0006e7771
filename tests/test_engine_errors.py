"""Bad recipes and bad models: one-line UserError naming the field and the fix, raised
before any tensor is read (no source model gets loaded)."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file
from standins import make_standin

from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.recipe import loads


@pytest.fixture(scope="module")
def models(standin_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    wide = make_standin(root / "wide", "llama", 4, seed=5, hidden=128)
    pickled = root / "pickled"  # an old-style checkpoint: config.json + pytorch_model.bin
    pickled.mkdir()
    shutil.copy(standin_zoo.path("toy/base") / "config.json", pickled)
    torch.save(load_file(standin_zoo.path("toy/base") / "model.safetensors"), pickled / "pytorch_model.bin")
    other_vocab = root / "other-vocab"  # toy/math's weights with one more token in its tokenizer
    shutil.copytree(standin_zoo.path("toy/math"), other_vocab)
    tok = transformers.AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_vocab)
    return {
        "other-vocab": other_vocab,
        "base": standin_zoo.path("toy/base"),
        "math": standin_zoo.path("toy/math"),
        "phi": standin_zoo.path("toy/phi-a"),
        "wide": wide,
        "pickled": pickled,
        "missing": root / "does-not-exist",
    }


SLERP = """
models:
  - model: base
  - model: math
merge_method: slerp
base_model: base
parameters: {t: 0.5}
"""

CASES = [
    ("unknown-method", SLERP.replace("merge_method: slerp", "merge_method: slurp"), r"^merge_method: unknown method 'slurp'; use one of .*linear.*slerp"),
    ("unknown-parameter", SLERP.replace("{t: 0.5}", "{t: 0.5, weight: 1.0}"), r"^parameters\.weight: slerp has no parameter 'weight'; use t$"),
    (
        "unknown-model-parameter",
        SLERP.replace("  - model: math", "  - model: math\n    parameters: {densty: 0.5}").replace("slerp", "ties").replace("{t: 0.5}", "{}"),
        r"^models\[1\]\.parameters\.densty: ties has no parameter 'densty'; use .*density",
    ),
    ("t-per-model", SLERP.replace("  - model: math", "  - model: math\n    parameters: {t: 0.3}"), r"^models\[1\]\.parameters\.t: t applies to the whole tensor"),
    ("base-missing", SLERP.replace("base_model: base\n", ""), r"^base_model: slerp needs a base model; add `base_model:`"),
    ("base-missing-ties", "models:\n  - model: math\n    parameters: {weight: 1}\nmerge_method: ties\n", r"^base_model: ties needs a base model"),
    ("t-above-1", SLERP.replace("{t: 0.5}", "{t: [0, 1.5]}"), r"^parameters\.t: 1\.5 is outside \[0, 1\]"),
    (
        "t-below-0-in-filter",
        SLERP.replace("{t: 0.5}", "\n  t:\n    - filter: mlp\n      value: -0.2\n    - value: 0.5"),
        r"^parameters\.t: -0\.2 is outside \[0, 1\]",
    ),
    ("t-not-a-number", SLERP.replace("{t: 0.5}", "{t: half}"), r"^parameters\.t: 'half' is not a valid number"),
    (
        "layer-range-outside",
        "slices:\n  - sources:\n    - model: base\n      layer_range: [2, 6]\nmerge_method: passthrough\n",
        r"^slices\[0\]\.sources\[0\]\.layer_range: \[2, 6\] is outside base, which has 4 layers; use a range within \[0, 4\]$",
    ),
    ("shapes-do-not-fit", SLERP.replace("model: math", "model: wide"), r"models do not fit together: model\.embed_tokens\.weight has shapes .*same size$"),
    ("architectures-differ", SLERP.replace("model: math", "model: phi"), r"phi is PhiForCausalLM but base is LlamaForCausalLM; merge models of one architecture$"),
    ("path-missing", SLERP.replace("model: math", "model: missing"), r"^model missing: mapped to .*does-not-exist, which does not exist; fix the path in --model-map$"),
    ("not-mapped", SLERP.replace("model: math", "model: org/not-here"), r"^model org/not-here: neither mapped nor a local folder.*--model-map org/not-here="),
    ("pickle-checkpoint", SLERP.replace("model: math", "model: pickled"), r"^model pickled: .*pytorch_model\.bin is a pickle checkpoint.*convert it to safetensors"),
    ("too-many-for-slerp", SLERP.replace("  - model: math", "  - model: math\n  - model: wide"), r"^models: slerp takes exactly 2 model\(s\) per slice, got 3"),
    ("missing-weight", "models:\n  - model: base\n  - model: math\nmerge_method: linear\n", r"^parameters\.weight: required for base .*add `weight:`"),
    (
        "tokenizer-token-beyond-vocab-size",
        SLERP.replace("model: math", "model: other-vocab") + "tokenizer_source: other-vocab\n",
        r"^recipe\.tokenizer_source: other-vocab's tokenizer numbers '<extra>' 96, beyond its vocab_size 96",
    ),
    ("bad-dtype", SLERP + "dtype: float8\n", r"^dtype: 'float8' is not a dtype mergekit knows"),
    ("base-not-a-source", "slices:\n  - sources:\n    - model: math\n      layer_range: [0, 4]\n    - model: wide\n      layer_range: [0, 4]\nmerge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\n", r"^slices\[0\]: base_model base is not among the sources"),
]


@pytest.mark.parametrize("text,pattern", [(t, p) for _, t, p in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_tensor_work(text, pattern, models):
    mat = Materializer({k: v for k, v in models.items()})
    with pytest.raises(UserError, match=pattern) as err:
        mat.state_dict(loads(text))
    assert "\n" not in str(err.value)
    assert not mat._sources, "a source was loaded before the recipe was found wrong"


def test_pickle_checkpoint_loads_when_allowed(models):
    mat = Materializer(models, allow_pickle=True)
    _, sd = mat.state_dict(loads(SLERP.replace("model: math", "model: pickled").replace("{t: 0.5}", "{t: 0.0}")))
    assert sd["model.norm.weight"].dtype == mat.source("base").tensors["model.norm.weight"].dtype
