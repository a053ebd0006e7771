"""Merges of models whose vocabularies differ (`tokenizer_source`, `tokenizer:`), against mergekit-yaml 0.1.5.

Stand-ins (tests/vocab_standins.py) differ from their base by chat markers added to a fine-tune, by the order
of the same tokens, by regular tokens the base lacks, by spare embedding rows and by a BPE
tokenizer with a token beyond its embeddings; with untied and tied heads,
and a Phi whose head has a bias indexed by token. For each recipe:
- Materializer.state_dict gives mergekit's tensors to the byte and its config's vocab_size;
- `mergesearch merge` (merge_command.build) writes mergekit's tensors, config.json and tokenizer files;
- the tokenizer a worker scores a candidate with is the one the merge is saved with, and the live model has
  a row for each of its tokens.

mergekit collects the models in a set and reads vocabularies in hash order, so a union is left to chance
when two models bring different added tokens, or one brings several regular tokens (search/engine/
vocabulary.py): the recipes here avoid those cases, where its output is determined.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import MergekitOracle, ModelFolders, assert_same_tensors, read_tensors
from standins import make_standin
from vocab_standins import CHAT_MARKERS, make_tied, make_vocab_variant

from search.engine import merge_command
from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.recipe import loads

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

RECIPES = {
    "union-linear": """
models:
  - model: vocab/base
    parameters: {weight: 0.4}
  - model: vocab/chat
    parameters: {weight: 0.6}
merge_method: linear
base_model: vocab/base
tokenizer_source: union
""",
    "base-slerp": """
models:
  - model: vocab/base
  - model: vocab/chat
merge_method: slerp
base_model: vocab/base
parameters: {t: [0.2, 0.7]}
tokenizer_source: base
""",
    "model-source-ties": """
models:
  - model: vocab/chat
    parameters: {weight: 0.7, density: 0.6}
  - model: vocab/shuffled
    parameters: {weight: 0.5, density: 0.8}
merge_method: ties
base_model: vocab/base
tokenizer_source: vocab/chat
dtype: float32
""",
    "tokens-and-padding-task-arithmetic": """
models:
  - model: vocab/chat
    parameters: {weight: 0.8}
  - model: vocab/shuffled
    parameters: {weight: 0.3}
merge_method: task_arithmetic
base_model: vocab/base
tokenizer:
  source: union
  tokens:
    <|im_start|>:
      source: vocab/chat
      force: true
    <|im_end|>:
      source: {kind: zero}
    <tool>:
      source: {kind: model_token, model: vocab/base, token: "#"}
    a:
      source: vocab/base
      force: true
  pad_to_multiple_of: 16
""",
    "shuffled-slerp-union": """
models:
  - model: vocab/shuffled
  - model: vocab/base
merge_method: slerp
base_model: vocab/shuffled
parameters: {t: 0.35}
tokenizer_source: union
""",
    "averaged-tokens-task-arithmetic": """
models:
  - model: vocab/chat
    parameters: {weight: 0.5}
  - model: vocab/chat2
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: vocab/base
tokenizer_source: union
dtype: bfloat16
""",
    "extra-tokens-spare-rows-ties": """
models:
  - model: vocab/extra
    parameters: {weight: 1.0, density: 0.5}
  - model: vocab/chat
    parameters: {weight: 0.5, density: 0.5}
merge_method: ties
base_model: vocab/base
tokenizer:
  source: union
  pad_to_multiple_of: 8
""",
    "bpe-base-stripped-slerp": """
models:
  - model: vocab/bpe
  - model: vocab/chat
merge_method: slerp
base_model: vocab/bpe
parameters: {t: 0.4}
tokenizer_source: base
""",
    "bpe-base-stripped-union-linear": """
models:
  - model: vocab/bpe
    parameters: {weight: 0.3}
  - model: vocab/chat
    parameters: {weight: 0.7}
merge_method: linear
base_model: vocab/bpe
tokenizer_source: union
""",
    "tied-union-slerp": """
models:
  - model: vocab/tied-base
  - model: vocab/tied-chat
merge_method: slerp
base_model: vocab/tied-base
parameters: {t: 0.6}
tokenizer_source: union
""",
    "tied-with-untied-linear": """
models:
  - model: vocab/tied-chat
    parameters: {weight: 0.5}
  - model: vocab/base
    parameters: {weight: 0.5}
merge_method: linear
base_model: vocab/base
tokenizer_source: union
""",
    "phi-head-bias-union": """
models:
  - model: vocab/phi
  - model: vocab/phi-chat
merge_method: slerp
base_model: vocab/phi
parameters: {t: 0.5}
tokenizer_source: union
out_dtype: float16
""",
    "multi-stage-union-then-slerp": """
name: chatty
models:
  - model: vocab/base
    parameters: {weight: 0.5}
  - model: vocab/chat
    parameters: {weight: 0.5}
merge_method: linear
base_model: vocab/base
tokenizer_source: union
---
models:
  - model: chatty
  - model: vocab/chat2
merge_method: slerp
base_model: chatty
parameters: {t: 0.3}
tokenizer_source: base
""",
}


# the same two stages, the second without a tokenizer setting: it keeps the first's built tokenizer
RECIPES["multi-stage-union-then-plain"] = RECIPES["multi-stage-union-then-slerp"].replace("\ntokenizer_source: base\n", "\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_standin(root / "base", "llama", 2, seed=301)
    phi = make_standin(root / "phi", "phi", 2, seed=302)
    chat = make_vocab_variant(root / "chat", base, 311, added=CHAT_MARKERS)
    return {
        "vocab/base": base,
        "vocab/chat": chat,
        "vocab/chat2": make_vocab_variant(root / "chat2", base, 312, added=CHAT_MARKERS),
        "vocab/shuffled": make_vocab_variant(root / "shuffled", base, 313, shuffle=True),
        "vocab/extra": make_vocab_variant(root / "extra", base, 314, extra_chars=["€"], spare_rows=3),
        # a BPE tokenizer with a token beyond the embeddings, which mergekit strips from a base's
        "vocab/bpe": make_vocab_variant(root / "bpe", base, 315, bpe=True, unused=["<extra>"]),
        "vocab/tied-base": make_tied(root / "tied-base", base),
        "vocab/tied-chat": make_tied(root / "tied-chat", chat),
        "vocab/phi": phi,
        "vocab/phi-chat": make_vocab_variant(root / "phi-chat", phi, 321, added=CHAT_MARKERS),
    }


@pytest.fixture(scope="module")
def oracle(folders, tmp_path_factory) -> MergekitOracle:
    mk = MergekitOracle(tmp_path_factory.mktemp("vocab-mergekit"), ModelFolders(folders))
    mk.prefetch([(text, None) for text in RECIPES.values()])
    return mk


@pytest.fixture(scope="module")
def materializer(folders) -> Materializer:
    return Materializer(folders)


def assert_same_files(ours: Path, theirs: Path, names) -> None:
    assert (theirs / "tokenizer.json").exists(), "mergekit wrote no tokenizer; every stand-in has one"
    for name in names:
        if (theirs / name).exists():
            assert (ours / name).exists(), f"{name} missing from our output"
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), f"{name} differs from mergekit's"
        else:
            assert not (ours / name).exists(), f"we wrote {name}, mergekit does not"


@pytest.mark.parametrize("case", list(RECIPES))
def test_state_dict_equals_mergekit(case, materializer, oracle, one_torch_thread):
    config, ours = materializer.state_dict(loads(RECIPES[case]))
    their_config, theirs = oracle.build(RECIPES[case])
    assert_same_tensors(ours, theirs, case)
    assert config["vocab_size"] == their_config["vocab_size"]


@pytest.mark.parametrize("case", list(RECIPES))
def test_merge_command_writes_mergekit_folder(case, folders, oracle, tmp_path):
    text = RECIPES[case]
    out = tmp_path / "out"
    merge_command.build(loads(text), text, out, {k: str(v) for k, v in folders.items()})
    theirs = oracle.folder(text)
    assert_same_tensors(read_tensors(out), read_tensors(theirs), case)
    ours_config, their_config = (json.loads((f / "config.json").read_text()) for f in (out, theirs))
    for cfg in (ours_config, their_config):
        cfg.pop("transformers_version", None)
    assert ours_config == their_config
    assert_same_files(out, theirs, TOKENIZER_FILES)


@pytest.mark.parametrize("case", ["union-linear", "tokens-and-padding-task-arithmetic", "multi-stage-union-then-slerp"])
def test_candidate_is_scored_with_the_merge_tokenizer(case, materializer, oracle):
    import transformers

    stages = loads(RECIPES[case])
    model = materializer.materialize(stages)
    tokenizer = materializer.tokenizer(stages)
    saved = transformers.AutoTokenizer.from_pretrained(oracle.folder(RECIPES[case]))
    assert tokenizer.get_vocab() == saved.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == json.loads((oracle.folder(RECIPES[case]) / "config.json").read_text())["vocab_size"]
    ids = tokenizer("<|im_start|>hi<|im_end|>", return_tensors="pt")["input_ids"]
    assert ids.tolist() == saved("<|im_start|>hi<|im_end|>", return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()
    assert materializer.tokenizer(stages) is tokenizer, "one tokenizer object per setting, for the objectives' caches"


def test_same_vocabulary_costs_nothing(folders):
    """With one vocabulary everywhere, a tokenizer setting leaves the embeddings as they are: still aliased."""
    mat = Materializer(folders)
    recipe = loads(RECIPES["base-slerp"].replace("vocab/chat", "vocab/chat2").replace("[0.2, 0.7]", "0.0")
                   .replace("tokenizer_source: base", "tokenizer_source: vocab/base"))
    _, tensors = mat.state_dict(recipe)
    assert tensors["model.embed_tokens.weight"] is mat.source("vocab/base").tensors["model.embed_tokens.weight"]


BAD = [
    (
        "no-setting",
        RECIPES["union-linear"].replace("tokenizer_source: union\n", ""),
        r"^recipe: models do not fit together: model\.embed_tokens\.weight has shapes .*; the vocabularies differ: add `tokenizer_source: union`",
    ),
    (
        "token-source-not-merged",
        RECIPES["tokens-and-padding-task-arithmetic"].replace("source: vocab/base\n      force", "source: vocab/extra\n      force"),
        r"^recipe\.tokenizer\.tokens\.a\.source: vocab/extra is not among the merged models",
    ),
    (
        "token-source-lacks-token",
        RECIPES["tokens-and-padding-task-arithmetic"].replace("source: vocab/chat\n      force: true", "source: vocab/shuffled\n      force: true"),
        r"^recipe\.tokenizer\.tokens\.<\|im_start\|>\.source: vocab/shuffled has no token '<\|im_start\|>'",
    ),
    (
        "token-text-unknown",
        RECIPES["tokens-and-padding-task-arithmetic"].replace('token: "#"', 'token: "<nope>"'),
        r"^recipe\.tokenizer\.tokens\.<tool>\.source\.token: vocab/base's tokenizer has no token '<nope>'",
    ),
    (
        "token-needs-a-source",
        RECIPES["tokens-and-padding-task-arithmetic"].replace("source: {kind: zero}", "force: true"),
        r"^recipe\.tokenizer\.tokens\.<\|im_end\|>: some models lack this token, so it needs a `source:`",
    ),
    (
        "fewer-rows-than-tokens",
        RECIPES["union-linear"].replace("vocab/chat", "vocab/short"),
        r"^recipe\.tokenizer_source: vocab/short numbers token '<\|im_end\|>' 97 but its tensor has 97 rows",
    ),
    ("unknown-key", RECIPES["extra-tokens-spare-rows-ties"].replace("pad_to_multiple_of: 8", "pad_to: 8"), r"^recipe: tokenizer\.pad_to: unknown key"),
]


@pytest.fixture(scope="module")
def with_short(folders, tmp_path_factory) -> dict[str, Path]:
    """vocab/chat with one embedding row fewer than its config's vocab_size and its tokenizer say."""
    short = tmp_path_factory.mktemp("short") / "short"
    shutil.copytree(folders["vocab/chat"], short)
    tensors = {k: (v[:97] if v.shape[0] == 98 else v) for k, v in load_file(short / "model.safetensors").items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(short / "model.safetensors"))
    return {**folders, "vocab/short": short}


@pytest.mark.parametrize("text,pattern", [(t, p) for _, t, p in BAD], ids=[b[0] for b in BAD])
def test_bad_tokenizer_settings_are_one_line_before_any_tensor(text, pattern, with_short):
    mat = Materializer(with_short)
    with pytest.raises(UserError, match=pattern) as err:
        mat.state_dict(loads(text))
    assert "\n" not in str(err.value)
    assert not mat._sources, "a source was loaded before the recipe was found wrong"


SCORES = '''
import torch


def next_after_marker(model, tokenizer, fidelity):
    """The logit of <|im_end|> (by the tokenizer's numbering) after the text, read with the tokenizer."""
    ids = tokenizer("<|im_start|>hi", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits[0, -1]
    return {"logit": float(logits[tokenizer.convert_tokens_to_ids("<|im_end|>")]), "tokens": ids.shape[1]}
'''


def test_a_worker_scores_each_candidate_with_its_recipes_tokenizer(folders, oracle, tmp_path):
    """The search path: one worker, candidates of different tokenizer settings, each scored as the merge
    mergekit writes for its recipe scores (its model, its saved tokenizer)."""
    import transformers

    from search.workers.worker import Worker

    (tmp_path / "scores.py").write_text(SCORES)
    objective = {"kind": "custom", "function": "scores.py:next_after_marker", "key": "logit"}
    worker = Worker("w0", {k: str(v) for k, v in folders.items()}, [objective], str(tmp_path))
    # base-slerp keeps the base's vocabulary: the markers are read as characters
    for trial, (case, tokens) in enumerate([("union-linear", 4), ("base-slerp", 15), ("tokens-and-padding-task-arithmetic", 4)]):
        result = worker.begin(trial, RECIPES[case], [(0, None)])
        assert result["ok"], result.get("error")
        folder = oracle.folder(RECIPES[case])
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        expected = worker.objectives[0].function(model, transformers.AutoTokenizer.from_pretrained(folder), None)
        assert result["scores"][0] == pytest.approx(expected["logit"], abs=1e-5), case
        assert worker.objectives[0].last_details["tokens"] == expected["tokens"] == tokens, case


def test_a_run_spec_may_merge_models_whose_vocabularies_differ_when_its_space_sets_a_tokenizer(folders, tmp_path):
    """Checked on the driver before any worker starts: vocabularies that differ need a tokenizer setting."""
    import yaml

    from search.run.run_setup import prepare_run
    from search.spec.runspec import load_spec

    (tmp_path / "scores.py").write_text(SCORES)
    space = {"kind": "slerp", "models": ["base", "chat"], "anchors": 2, "tokenizer_source": "union"}
    data = {"models": {"base": str(folders["vocab/base"]), "chat": str(folders["vocab/chat"])}, "space": space,
            "objectives": [{"kind": "custom", "function": "scores.py:next_after_marker", "key": "logit"}],
            "trials": 2, "baselines": False}
    path = tmp_path / "chatty.yaml"
    path.write_text(yaml.safe_dump(data))
    setup = prepare_run(load_spec(path), resume=False)
    assert setup.space.used_models == ["base", "chat"]
    del space["tokenizer_source"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"^models\.chat: .* has shape \[98, 64\] .*; the vocabularies differ: set `tokenizer_source: union`"):
        prepare_run(load_spec(path), resume=False)
