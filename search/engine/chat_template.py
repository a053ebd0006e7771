"""A stage's `chat_template:`, resolved to the template text mergekit 0.1.5 saves with the merge.

Why: the chat template lives in the tokenizer files. A merge saved without the template its recipe asks for
looks complete and is silently wrong once published, and an objective that applies the chat template would
score a candidate as no user will run it. So the engine sets what mergekit sets (its `_set_chat_template`):

- unset or empty: nothing; the tokenizer keeps its own template (and mergekit copies the donor's files);
- `auto`: the template most of the stage's models carry (mergekit's referenced models: the base, `models:`,
  the sources of `slices:`; one dict of templates counts as its "default"), stripped; nothing when none
  carries one. mergekit counts the models in a set's order, so when templates tie for most common its pick
  is left to chance: that is refused here (name the template instead);
- a short name (under 256 characters, one line, no `{`) of a template mergekit ships
  (`mergekit/_data/chat_templates/<name>.jinja`: alpaca, chatml, exaone, llama3, mistral): that file's
  text, read from the installed mergekit's data (its code is not imported);
- anything else is the Jinja template itself; shorter than 20 characters or without `{`, mergekit fails
  ("Invalid chat template") after merging: refused here when the recipe is read.

With a template set mergekit never copies the tokenizer files verbatim: it saves the tokenizer its tokenizer
setting built, or reads the donor's (its base model's, else its first model's) from its folder, with the
template set (stage_tokenizers.py follows that through the stages of a multi-stage file). mergekit-moe's
config has no such key and would ignore it; recipe.py refuses it there.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from search.engine.errors import UserError, short

AUTO = "auto"


@lru_cache(maxsize=None)
def shipped_templates() -> dict[str, str]:
    """{name: template} of the templates mergekit ships, read from its installed data files."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mergekit is not installed; install mergesearch's dependencies (pip install -e .)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"
    # read as mergekit reads it (importlib.resources: utf-8, universal newlines)
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja")) if p.is_file()}


def _names_a_file(setting: str) -> bool:
    return len(setting) < 256 and "\n" not in setting and "{" not in setting and setting in shipped_templates()


def problem(setting: str | None) -> str | None:
    """Why mergekit would fail on this setting ("Invalid chat template"), as a message; None when it is usable."""
    if not setting or setting == AUTO or _names_a_file(setting) or (len(setting) >= 20 and "{" in setting):
        return None
    names = ", ".join(shipped_templates())
    return (
        f"{short(setting)} is neither auto, a template mergekit ships ({names}) nor a Jinja template "
        "(20 characters or more, with `{`); use one of those names or write out the template"
    )


def template_text(template) -> str | None:
    """A tokenizer's `chat_template` as mergekit's auto counts it: a dict of templates -> its "default"."""
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def auto_models(stage) -> list[str]:
    """The models whose templates `auto` counts: mergekit's `referenced_models()` (a slice's own base_model
    is not among them)."""
    names = [stage.base_model] if stage.base_model else []
    names += [m.model for m in stage.models or []]
    names += [src.model for s in stage.slices or [] for src in s.sources]
    return list(dict.fromkeys(names))


def plurality(templates: Iterable[tuple[str, object]], where: str) -> str | None:
    """`auto`: the most common template among (model, its tokenizer's chat_template), stripped; None when
    no model has one. UserError when several tie (mergekit's pick would be left to chance)."""
    by_template: dict[str, list[str]] = {}
    for model, template in templates:
        text = template_text(template)
        if text:
            by_template.setdefault(text.strip(), []).append(model)
    if not by_template:
        return None
    counts = Counter({t: len(models) for t, models in by_template.items()}).most_common()
    tied = [t for t, n in counts if n == counts[0][1]]
    if len(tied) > 1:
        who = "; ".join(", ".join(by_template[t]) for t in tied)
        raise UserError(
            f"{where}.chat_template: auto: the models carry different chat templates equally often ({who}); "
            "mergekit would pick one by chance - name the template (e.g. chatml) or write it out"
        )
    return counts[0][0]


def resolve(setting: str | None, templates: Callable[[], Iterable[tuple[str, object]]], where: str) -> str | None:
    """The template a stage's `chat_template:` sets, or None where the tokenizer keeps its own.
    templates(): (model, its tokenizer's chat_template) for each of auto_models(stage), asked only for auto."""
    if not setting:
        return None
    if setting == AUTO:
        return plurality(templates(), where)
    if _names_a_file(setting):
        return shipped_templates()[setting]
    message = problem(setting)
    if message is not None:
        raise UserError(f"{where}.chat_template: {message}")
    return setting
