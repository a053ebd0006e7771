"""A recipe's `chat_template:` against mergekit-yaml / mergekit-multi 0.1.5.

Stand-ins: a llama base without a chat template, fine-tunes of it whose tokenizers carry template A (two of
them, one with trailing whitespace: mergekit's `auto` counts stripped templates), template B, or none, and a
variant with chat markers added (template B). For each recipe (a template mergekit ships, auto, a literal
Jinja template; with and without a tokenizer setting; through the stages of a multi-stage file):
- `mergesearch merge` writes mergekit's tokenizer files byte for byte, the expected template among them;
- the tokenizer a candidate is scored with (Materializer.tokenizer) carries the same template, one object per
  recipe, and the shared tokenizers of the sources are left untouched.
What mergekit fails on only after merging (a template too short or without `{`) is a one-line error before
anything is written, and `auto` with templates tied for most common (mergekit's pick is left to a set's hash
order) is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from conftest import MergekitOracle, ModelFolders, assert_same_tensors, read_tensors
from standins import make_finetune, make_standin
from vocab_standins import CHAT_MARKERS, make_vocab_variant

from search.engine import chat_template, merge_command, output
from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.recipe import RecipeError, loads

TEMPLATE_A = "{% for m in messages %}[A] {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<B>{{ m['role'] }}: {{ m['content'] }}</B>{% endfor %}"
# (with `~`, not `+`: mergekit-multi reads every string of a stage as a model name, and fails on two `+`)
LITERAL = "{% for message in messages %}{{ '### ' ~ message['role'] ~ ': ' ~ message['content'] ~ '\\n' }}{% endfor %}\n"
CHATML = chat_template.shipped_templates()["chatml"]
LLAMA3 = chat_template.shipped_templates()["llama3"]

LITERAL_YAML = "chat_template: |\n  " + LITERAL.rstrip("\n") + "\n"

# recipe -> (its text, the chat template of the saved tokenizer; None: none)
CASES = {
    "chatml-linear": ("""
models:
  - model: ct/base
    parameters: {weight: 0.5}
  - model: ct/a1
    parameters: {weight: 0.5}
merge_method: linear
base_model: ct/base
chat_template: chatml
""", CHATML),
    "llama3-replaces-the-donors-task-arithmetic": ("""
models:
  - model: ct/a1
    parameters: {weight: 0.6}
  - model: ct/plain
    parameters: {weight: 0.4}
merge_method: task_arithmetic
base_model: ct/b
chat_template: llama3
""", LLAMA3),
    "auto-plurality-ties": ("""
models:
  - model: ct/a1
    parameters: {weight: 0.5, density: 0.7}
  - model: ct/a2
    parameters: {weight: 0.5, density: 0.7}
  - model: ct/b
    parameters: {weight: 0.3, density: 0.7}
merge_method: ties
base_model: ct/base
chat_template: auto
""", TEMPLATE_A),
    "auto-none-slerp": ("""
models:
  - model: ct/base
  - model: ct/plain
merge_method: slerp
base_model: ct/base
parameters: {t: 0.3}
chat_template: auto
""", None),
    "literal-slerp": ("""
models:
  - model: ct/b
  - model: ct/plain
merge_method: slerp
base_model: ct/b
parameters: {t: 0.6}
""" + LITERAL_YAML, LITERAL),
    "chatml-union": ("""
models:
  - model: ct/base
    parameters: {weight: 0.4}
  - model: ct/chat
    parameters: {weight: 0.6}
merge_method: linear
base_model: ct/base
tokenizer_source: union
chat_template: chatml
""", CHATML),
    "auto-union": ("""
models:
  - model: ct/chat
    parameters: {weight: 0.4}
  - model: ct/b
    parameters: {weight: 0.3}
  - model: ct/a1
    parameters: {weight: 0.3}
merge_method: task_arithmetic
base_model: ct/base
tokenizer_source: union
chat_template: auto
""", TEMPLATE_B),
    "literal-base-source": ("""
models:
  - model: ct/b
  - model: ct/a1
merge_method: slerp
base_model: ct/b
parameters: {t: 0.5}
tokenizer_source: base
""" + LITERAL_YAML, LITERAL),
    "literal-tokenizer-block": ("""
models:
  - model: ct/chat
    parameters: {weight: 0.5}
  - model: ct/a1
    parameters: {weight: 0.5}
merge_method: linear
base_model: ct/a1
tokenizer:
  source: union
  pad_to_multiple_of: 8
""" + LITERAL_YAML, LITERAL),
    # a stage's template, written into its folder, is what the next stage finds there
    "multi-template-then-plain": ("""
name: tuned
models:
  - model: ct/base
    parameters: {weight: 0.5}
  - model: ct/a1
    parameters: {weight: 0.5}
merge_method: linear
base_model: ct/base
chat_template: chatml
---
models:
  - model: tuned
  - model: ct/b
merge_method: slerp
base_model: tuned
parameters: {t: 0.4}
""", CHATML),
    "multi-template-then-union": ("""
name: tuned
models:
  - model: ct/base
  - model: ct/a1
merge_method: slerp
base_model: ct/base
parameters: {t: 0.5}
""" + LITERAL_YAML + """---
models:
  - model: tuned
    parameters: {weight: 0.5}
  - model: ct/chat
    parameters: {weight: 0.5}
merge_method: linear
base_model: tuned
tokenizer_source: union
""", LITERAL),
    "multi-auto-counts-the-intermediate": ("""
name: tuned
models:
  - model: ct/base
  - model: ct/plain
merge_method: slerp
base_model: ct/base
parameters: {t: 0.5}
chat_template: chatml
---
models:
  - model: tuned
  - model: ct/plain
merge_method: slerp
base_model: ct/plain
parameters: {t: 0.5}
chat_template: auto
""", CHATML.strip()),
    "multi-union-then-template": ("""
name: tuned
models:
  - model: ct/base
    parameters: {weight: 0.5}
  - model: ct/chat
    parameters: {weight: 0.5}
merge_method: linear
base_model: ct/base
tokenizer_source: union
---
models:
  - model: tuned
  - model: ct/chat
merge_method: slerp
base_model: tuned
parameters: {t: 0.5}
chat_template: llama3
""", LLAMA3),
    "multi-template-then-another": ("""
name: tuned
models:
  - model: ct/base
  - model: ct/a1
merge_method: slerp
base_model: ct/base
parameters: {t: 0.5}
chat_template: chatml
---
models:
  - model: tuned
  - model: ct/chat
merge_method: slerp
base_model: tuned
parameters: {t: 0.5}
tokenizer_source: base
""" + LITERAL_YAML, LITERAL),
}


def with_template(folder: Path, template: str | None) -> Path:
    """Re-save the folder's tokenizer with `template` as its chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-template")
    base = make_standin(root / "base", "llama", 2, seed=501)
    return {
        "ct/base": base,
        "ct/plain": make_finetune(root / "plain", base, seed=502),
        "ct/a1": with_template(make_finetune(root / "a1", base, seed=503), TEMPLATE_A),
        "ct/a2": with_template(make_finetune(root / "a2", base, seed=504), TEMPLATE_A + "\n\n"),
        "ct/b": with_template(make_finetune(root / "b", base, seed=505), TEMPLATE_B),
        "ct/chat": with_template(make_vocab_variant(root / "chat", base, 506, added=CHAT_MARKERS), TEMPLATE_B),
    }


@pytest.fixture(scope="module")
def oracle(folders, tmp_path_factory) -> MergekitOracle:
    mk = MergekitOracle(tmp_path_factory.mktemp("chat-template-mergekit"), ModelFolders(folders))
    mk.prefetch([(text, None) for text, _ in CASES.values()])
    return mk


def saved_template(folder: Path) -> str | None:
    return transformers.AutoTokenizer.from_pretrained(folder).chat_template


def test_stand_ins_carry_their_templates(folders):
    assert saved_template(folders["ct/base"]) is None and saved_template(folders["ct/plain"]) is None
    assert saved_template(folders["ct/a1"]) == TEMPLATE_A
    assert saved_template(folders["ct/a2"]).strip() == TEMPLATE_A != saved_template(folders["ct/a2"])
    assert saved_template(folders["ct/b"]) == saved_template(folders["ct/chat"]) == TEMPLATE_B


@pytest.mark.parametrize("case", list(CASES))
def test_merge_writes_mergekits_tokenizer_with_the_template(case, folders, oracle, tmp_path, one_torch_thread):
    text, expected = CASES[case]
    out = tmp_path / "out"
    merge_command.build(loads(text), text, out, {k: str(v) for k, v in folders.items()})
    theirs = oracle.folder(text)
    assert saved_template(theirs) == expected, "the stand-ins no longer test what this case is about"
    assert saved_template(out) == expected
    assert (theirs / "tokenizer.json").exists(), "mergekit wrote no tokenizer; every stand-in has one"
    for name in output.TOKENIZER_FILES:
        if (theirs / name).exists():
            assert (ours := out / name).exists(), f"{name} missing from our output"
            assert ours.read_bytes() == (theirs / name).read_bytes(), f"{name} differs from mergekit's"
        else:
            assert not (out / name).exists(), f"we wrote {name}, mergekit does not"
    assert_same_tensors(read_tensors(out), read_tensors(theirs), case)
    ours_config, their_config = (json.loads((f / "config.json").read_text()) for f in (out, theirs))
    for cfg in (ours_config, their_config):
        cfg.pop("transformers_version", None)
    assert ours_config == their_config


@pytest.fixture(scope="module")
def materializer(folders) -> Materializer:
    return Materializer(folders)


@pytest.mark.parametrize("case", list(CASES))
def test_candidate_is_scored_with_the_template(case, materializer, oracle):
    text, expected = CASES[case]
    stages = loads(text)
    tokenizer = materializer.tokenizer(stages)
    saved = transformers.AutoTokenizer.from_pretrained(oracle.folder(text))
    assert tokenizer.chat_template == saved.chat_template == expected
    assert tokenizer.get_vocab() == saved.get_vocab()
    if expected is not None:
        messages = [{"role": "user", "content": "hi"}]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == saved.apply_chat_template(messages, tokenize=False)
    assert materializer.tokenizer(loads(text)) is tokenizer, "one tokenizer object per recipe, for the objectives' caches"
    # the sources' shared tokenizers keep their own templates
    shared = materializer._tokenizers
    assert shared.shared(str(materializer.path("ct/base"))).chat_template is None
    assert shared.shared(str(materializer.path("ct/a1"))).chat_template == TEMPLATE_A


def test_one_template_object_per_template(materializer):
    """Candidates of one recipe shape share a tokenizer; another template is another object."""
    text = CASES["chatml-linear"][0]
    first = materializer.tokenizer(loads(text))
    other = materializer.tokenizer(loads(text.replace("weight: 0.5", "weight: 0.7")))
    assert other is first
    llama3 = materializer.tokenizer(loads(text.replace("chat_template: chatml", "chat_template: llama3")))
    assert llama3 is not first and llama3.chat_template == LLAMA3 and first.chat_template == CHATML
    plain = materializer.tokenizer(loads(text.replace("chat_template: chatml\n", "")))
    assert plain.chat_template is None


INVALID = {
    "no-brace": "chat_template: hello there, be nice to people\n",
    "unknown-name": "chat_template: chatmlx\n",
    "short": "chat_template: '{{ messages }}'\n",
}
UNION = "tokenizer_source: union\n"
PLAIN = """
models:
  - model: ct/base
  - model: ct/a1
merge_method: slerp
base_model: ct/base
parameters: {t: 0.5}
"""


@pytest.mark.parametrize("case", list(INVALID))
def test_mergekit_fails_on_an_invalid_template(case, oracle):
    """With a tokenizer setting mergekit raises after merging (without one it logs and writes no tokenizer)."""
    problem = oracle.failure(PLAIN + UNION + INVALID[case])
    assert problem is not None and "Invalid chat template" in problem


@pytest.mark.parametrize("case", list(INVALID))
@pytest.mark.parametrize("setting", ["", UNION])
def test_invalid_template_is_one_line_and_writes_nothing(case, setting, folders, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(PLAIN + setting + INVALID[case])
    out = tmp_path / "out"
    maps = [a for n in ("ct/base", "ct/a1") for a in ("--model-map", f"{n}={folders[n]}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(Path(sys.executable).parent / "mergesearch"), "merge", str(recipe), str(out), *maps],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat_template" in lines[0] and "Jinja template" in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")), "an output folder was written"


def test_templates_tied_for_most_common_are_refused_before_any_tensor(folders):
    text = """
models:
  - model: ct/a1
    parameters: {weight: 0.5}
  - model: ct/b
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: ct/plain
"""
    mat = Materializer(folders)
    with pytest.raises(UserError, match=r"^recipe\.chat_template: auto: .*ct/a1; ct/b") as err:
        mat.state_dict(loads(text + "chat_template: auto\n"))
    assert "\n" not in str(err.value)
    assert not mat._sources, "a source was loaded before the recipe was found wrong"
    mat.plan(loads(text + "chat_template: chatml\n"))  # a named template is fine


def test_mergekit_moe_has_no_chat_template():
    """mergekit-moe's config ignores the key; a recipe that sets it is refused, saying so."""
    from mergekit.moe.config import MoEMergeConfig

    moe = {"base_model": "ct/base", "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": "ct/a1"}, {"source_model": "ct/b"}]}
    assert not hasattr(MoEMergeConfig.model_validate({**moe, "chat_template": "chatml"}), "chat_template")
    with pytest.raises(RecipeError, match=r"^recipe: chat_template: mergekit-moe has no such key") as err:
        loads(yaml.safe_dump({**moe, "chat_template": "chatml"}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "setting,expected",
    [("", None), (None, None), ("chatml", CHATML), ("x" * 18 + "{}", "x" * 18 + "{}"), ("auto", TEMPLATE_A)],
)
def test_resolve(setting, expected):
    models = [("a", TEMPLATE_A + " "), ("b", {"default": TEMPLATE_A, "tool_use": TEMPLATE_B}), ("c", TEMPLATE_B), ("d", None)]
    assert chat_template.resolve(setting, lambda: models, "recipe") == expected


@pytest.mark.parametrize("setting", ["x" * 17 + "{}", "chatml ", "x" * 300, "a\nb"])
def test_resolve_refuses_what_mergekit_refuses(setting):
    with pytest.raises(UserError, match=r"^recipe\.chat_template: "):
        chat_template.resolve(setting, lambda: [], "recipe")
