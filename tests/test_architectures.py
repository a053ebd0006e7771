"""Every architecture mergesearch builds, planned from mergekit 0.1.5's own definitions, against mergekit itself.

Each architecture has a tiny stand-in (tests/arch_standins.py: 2 layers, a base and two
fine-tunes) and three recipes: a slerp with t-curves per filter, a TIES over both fine-tunes,
and a passthrough stack of 3 layers cut from two models. mergekit-yaml runs all of them in
one process; the engine's tensors must equal mergekit's in names, shapes, dtypes and bytes.
The slerp's live model must also give the logits of mergekit's folder loaded by transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from arch_standins import ARCH_CONFIGS
from conftest import ARCH_TYPES, STANDINS, assert_same_tensors

from search.engine.architecture_docs import architectures_markdown, fixed_depth
from search.engine.architectures import config_value
from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.mergekit_definitions import architecture_of, definitions, refusal
from search.engine.recipe import loads


def slerp(t: str) -> str:
    return f"""
models:
  - model: arch/{t}/base
  - model: arch/{t}/ft1
merge_method: slerp
base_model: arch/{t}/base
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.9]
    - filter: mlp
      value: [0.8, 0.1]
    - value: 0.35
"""


def ties(t: str) -> str:
    return f"""
models:
  - model: arch/{t}/ft1
    parameters: {{weight: 0.6, density: 0.5}}
  - model: arch/{t}/ft2
    parameters: {{weight: 0.5, density: 0.7}}
merge_method: ties
base_model: arch/{t}/base
dtype: float32
out_dtype: bfloat16
"""


def passthrough(t: str) -> str:
    """3 layers from two models; 2 (layer 1 of each) where the config lists something per layer
    (`layer_types`), whose depth mergekit cannot change (test_depth_change_refused_as_mergekit_fails)."""
    arch = next(d.arch for d in definitions() if d.model_type == t and refusal(d) is None)
    first = [1, 2] if fixed_depth(arch) else [0, 2]
    return f"""
slices:
  - sources:
      - model: arch/{t}/base
        layer_range: {first}
  - sources:
      - model: arch/{t}/ft1
        layer_range: [1, 2]
merge_method: passthrough
"""


RECIPES = {"slerp": slerp, "ties": ties, "passthrough": passthrough}
CASES = [(t, kind) for t in ARCH_TYPES for kind in RECIPES]


def deeper_stack(t: str) -> str:
    """3 layers of a model whose config lists `layer_types` (mergekit cannot write that config)."""
    return passthrough(t).replace("layer_range: [1, 2]", "layer_range: [0, 2]", 1)


LAYER_TYPES = ["qwen3", "gemma2"]


@pytest.fixture(scope="module", autouse=True)
def _prefetch(mergekit_oracle):
    jobs = [RECIPES[kind](t) for t, kind in CASES] + [deeper_stack(t) for t in LAYER_TYPES]
    mergekit_oracle.prefetch([(text, None) for text in jobs])


@pytest.fixture(scope="module")
def materializer(standin_zoo, one_torch_thread):
    return Materializer(standin_zoo.paths([n for n in STANDINS if n.startswith("arch/")]))


def test_docs_list_what_the_definitions_give():
    """docs/architectures.md is the generator's output: regenerate it with
    `python -m search.engine.architecture_docs > docs/architectures.md`."""
    page = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
    assert page.read_text() == architectures_markdown()


def test_every_buildable_definition_has_a_standin():
    """A definition mergesearch accepts is one these tests build: a new one needs a stand-in config."""
    buildable = {d.model_type for d in definitions() if refusal(d) is None}
    assert buildable == set(ARCH_TYPES)


@pytest.mark.parametrize("arch_type,kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_equals_mergekit(arch_type, kind, materializer, mergekit_oracle):
    text = RECIPES[kind](arch_type)
    config, ours = materializer.state_dict(loads(text))
    their_config, theirs = mergekit_oracle.build(text)
    assert_same_tensors(ours, theirs, f"{arch_type} {kind}")
    key = architecture_of(config).num_layers_key
    assert config_value(config, key) == config_value(their_config, key)
    for field in ("architectures", "model_type", "dtype"):
        assert config.get(field) == their_config.get(field), field


@pytest.mark.parametrize("arch_type", ARCH_TYPES)
def test_live_model_gives_mergekits_logits(arch_type, materializer, mergekit_oracle):
    """The candidate a worker scores is the model mergekit's folder loads as, to the bit."""
    text = slerp(arch_type)
    ours = materializer.materialize(loads(text))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(mergekit_oracle.folder(text)).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 20, 30]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize(
    "architectures,model_type,why",
    [
        (["BaichuanForCausalLM"], "baichuan", "need remote code"),
        (["LlamaForSequenceClassification"], "llama", "not a causal language model"),
        (["Qwen2VLForConditionalGeneration"], "qwen2_vl", "multi-module"),
        (["Glm4MoeForCausalLM"], "glm4_moe", "plans it in Python code"),
        (["GPTNeoXForCausalLM"], "gpt_neox", "does not save"),
        (["PhiForCausalLM"], "phi-msft", "no model_type phi-msft"),
        (["NoSuchModelForCausalLM"], "nosuch", "has no definition"),
    ],
)
def test_refused_in_one_line_naming_what_is_supported(architectures, model_type, why):
    with pytest.raises(UserError) as e:
        architecture_of({"architectures": architectures, "model_type": model_type}, "model m")
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"model m: architecture {architectures[0]} is not supported")
    assert why in line and "Qwen3ForCausalLM" in line and "Gemma2ForCausalLM" in line


@pytest.mark.parametrize("arch_type", LAYER_TYPES)
def test_depth_change_refused_as_mergekit_fails(arch_type, materializer, mergekit_oracle):
    """A config with `layer_types` cannot be re-counted by mergekit 0.1.5 (transformers 5 refuses
    the config it writes): the engine refuses the stack in one line instead of building a model
    whose recipe mergekit cannot rebuild."""
    text = deeper_stack(arch_type)
    assert "layer_types" in mergekit_oracle.failure(text)
    with pytest.raises(UserError) as e:
        materializer.plan(loads(text))
    line = str(e.value)
    assert "\n" not in line and "cannot write a" in line and "stack to 2 layers" in line


@pytest.mark.parametrize(
    "model_type,switch,missing",
    [("cohere", {"use_qk_norm": False}, "self_attn.q_norm.weight"), ("falcon", {"new_decoder_architecture": False}, "ln_attn")],
)
def test_a_checkpoint_without_what_the_definition_requires_is_one_line(model_type, switch, missing, tmp_path):
    """Command-R (no q/k norms) and Falcon-7B (no ln_attn) do not fit mergekit's definitions, which
    require those tensors (mergekit fails on them too: docs/architectures.md notes it)."""
    config = transformers.CONFIG_MAPPING[model_type](**{**ARCH_CONFIGS[model_type], **switch})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    recipe = "slices:\n  - sources: [{model: m, layer_range: [0, 2]}]\nmerge_method: passthrough\n"
    with pytest.raises(UserError, match=rf"model m has no tensor \S*{missing}\S*; it does not fit a {model_type} merge") as e:
        Materializer({"m": tmp_path / "m"}).plan(loads(recipe))
    assert "\n" not in str(e.value)
