"""Which tokenizer each stage's output has, and the vocabularies of stages that set one; kept per worker.

A stage without a tokenizer setting keeps the tokenizer of its base model (its first model without one),
following an intermediate stage back to where its tokenizer came from. A stage with `tokenizer_source` or
`tokenizer:` gets the vocabulary vocabulary.py builds; it is built once per source set and setting, and so
are the re-indexed embeddings of each source set (vocabulary_rows.py), so a candidate pays nothing for them
after the first. Stages without a setting cost nothing here.

A stage's `chat_template:` (chat_template.py) is set on a copy of its tokenizer, made once per tokenizer and
template: the built one for a stage with a tokenizer setting, else the donor's read again from its files
(mergekit then reads the donor's tokenizer, it does not copy its files). A later stage sees it as mergekit-multi's
next run would, in the folder the stage was written to: its `auto` counts it, a vocabulary reads it, and a
stage without a setting keeps it.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable

from search.engine import chat_template as chat_templates
from search.engine.methods import StatCache
from search.engine.recipe import MergeRecipe, Recipe
from search.engine.tokenizer_config import TokenizerSetting, stage_setting
from search.engine.vocabulary import ModelVocabulary, Vocabulary, build_vocabulary
from search.engine.vocabulary_rows import RowPlan, apply_rows, plan_rows

if TYPE_CHECKING:
    import torch
    import transformers

    from search.engine.plan import Job, StagePlan


def donor(stage: Recipe) -> str:
    """The model whose tokenizer a stage without a tokenizer setting keeps: its base, else its first model."""
    return stage.base_model or stage.referenced_models()[0]


class StageTokenizers:
    """Tokenizers and vocabularies for a Materializer. folder(name): the folder of a source model (its
    base model's, for a model with an adapter); vocab_size(name): its config's vocab_size; cache: the
    Materializer's statistics cache, which keeps re-indexed embeddings within the memory its plan accounts for."""

    def __init__(self, folder: Callable[[str], Path], vocab_size: Callable[[str], int | None], cache: StatCache):
        self.folder = folder
        self.vocab_size = vocab_size
        self._shared: dict[str, "transformers.PreTrainedTokenizerBase | None"] = {}  # folder -> tokenizer
        self._vocabularies: dict[Hashable, Vocabulary] = {}
        self._templated: dict[Hashable, "transformers.PreTrainedTokenizerBase | None"] = {}  # chat_template origins
        self._row_plans: dict[Hashable, RowPlan] = {}
        # re-indexed embeddings per source set (a search may pick many sets of models)
        self._reindexed = cache

    # ---- where a stage's tokenizer comes from ------------------------------------

    def origin(self, name: str, stages: dict[str, Recipe], _seen: frozenset = frozenset()) -> Hashable:
        """What the tokenizer of model or stage `name` is: ("folder", a source's folder), ("vocabulary", key)
        built by a stage's tokenizer setting, or ("chat_template", origin, template, reread) with a stage's
        chat template set on it."""
        if name in stages and name not in _seen:
            return self.stage_origin(stages[name], stages, "recipe", _seen | {name})
        return ("folder", str(self.folder(name)))

    def stage_origin(self, stage: Recipe, stages: dict[str, Recipe], where: str = "recipe",
                     _seen: frozenset = frozenset()) -> Hashable:
        """The origin of a stage's output tokenizer; `stages`: the earlier stages by name. UserError (naming
        `where`) for a chat template mergekit cannot set."""
        setting = stage_setting(stage)
        inner = ("vocabulary", self._key(stage, setting, stages)) if setting else self.origin(donor(stage), stages, _seen)
        asked = getattr(stage, "chat_template", None)  # a mergekit-moe stage has none
        if not asked:
            return inner  # the tokenizer is kept as it is (mergekit copies the donor's files)
        template = chat_templates.resolve(
            asked, lambda: [(n, self.template(self.origin(n, stages, _seen))) for n in chat_templates.auto_models(stage)],
            where,
        )
        reread = setting is None  # mergekit reads the donor's tokenizer from its folder and saves it again
        if template is None and not reread:
            return inner
        return ("chat_template", inner, template, reread)

    def template(self, origin: Hashable) -> object:
        """The chat_template of the tokenizer of `origin` (None when it has none, or no tokenizer)."""
        if origin[0] == "chat_template":
            _, inner, template, _ = origin
            return self.template(inner) if template is None else template
        tokenizer = self.tokenizer(origin)
        return None if tokenizer is None else tokenizer.chat_template

    def tokenizer(self, origin: Hashable) -> "transformers.PreTrainedTokenizerBase | None":
        """The tokenizer of `origin`, one object per origin (shared: do not modify it)."""
        kind = origin[0]
        if kind == "folder":
            return self.shared(origin[1])
        if kind == "vocabulary":
            return self._vocabularies[origin[1]].tokenizer
        if origin not in self._templated:
            _, inner, template, reread = origin
            tokenizer = self.fresh(inner) if reread else copy.deepcopy(self.tokenizer(inner))
            if tokenizer is not None and template is not None:
                tokenizer.chat_template = template
            self._templated[origin] = tokenizer
        return self._templated[origin]

    def output_tokenizer(self, stages: list[Recipe]) -> "transformers.PreTrainedTokenizerBase | None":
        """The tokenizer of the last stage's output (the shared object: do not modify it)."""
        named = {s.name: s for s in stages if s.name}
        return self.tokenizer(self.stage_origin(stages[-1], named))

    def shared(self, folder: str) -> "transformers.PreTrainedTokenizerBase | None":
        if folder not in self._shared:
            self._shared[folder] = load_tokenizer(folder)
        return self._shared[folder]

    # ---- a stage's vocabulary -----------------------------------------------------

    def vocabulary(self, stage: MergeRecipe, stages: dict[str, Recipe], stage_vocab_size: Callable[[str], int | None],
                   where: str) -> Vocabulary | None:
        """The output vocabulary of a stage with a tokenizer setting (None without one). `stages`: the earlier
        stages by name; stage_vocab_size(name): an earlier stage's output vocab_size."""
        setting = stage_setting(stage)
        if setting is None:
            return None
        key = self._key(stage, setting, stages)
        if key not in self._vocabularies:
            names = stage.referenced_models()
            base_name = stage.base_model or names[0]

            def model(name: str) -> ModelVocabulary:
                size = stage_vocab_size(name) if name in stages else self.vocab_size(name)
                return ModelVocabulary(name, self.fresh(self.origin(name, stages)), size)

            others = [model(n) for n in names if n != base_name]
            self._vocabularies[key] = build_vocabulary(
                setting, model(base_name), others, lambda n: self.fresh(self.origin(n, stages)), where
            )
        return self._vocabularies[key]

    def _key(self, stage: MergeRecipe, setting: TokenizerSetting, stages: dict[str, Recipe]) -> Hashable:
        names = stage.referenced_models()
        models = tuple((n, self.origin(n, stages)) for n in names)
        source = setting.source if setting.source in ("base", "union") else self.origin(setting.source, stages)
        return (setting.tokens, setting.pad_to_multiple_of, source, stage.base_model or names[0], models)

    def fresh(self, origin: Hashable) -> "transformers.PreTrainedTokenizerBase | None":
        """A tokenizer of its own (building a vocabulary modifies it), read from files as mergekit reads them:
        a source's from its folder, an intermediate stage's as mergekit-multi wrote it."""
        kind = origin[0]
        if kind == "folder":
            return load_tokenizer(origin[1])
        tokenizer = self.tokenizer(origin)
        if tokenizer is None:
            return None
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            return load_tokenizer(folder)

    # ---- re-indexed embeddings -----------------------------------------------------

    def row_plan(self, plan: "StagePlan", job: "Job", input_rows: list[int], where: str) -> RowPlan:
        """Where each output row of the job's inputs comes from; UserError where mergekit would fail."""
        vocab: Vocabulary = plan.vocabulary
        key = (id(vocab), tuple(job.models), job.base_model, tuple(input_rows))
        if key not in self._row_plans:
            self._row_plans[key] = plan_rows(
                vocab.tokens, vocab.size, [vocab.rows[m] for m in job.models], job.models, job.base_model,
                dict(vocab.setting.tokens), vocab.own, input_rows, f"{where}.{vocab.setting.field}",
            )
        return self._row_plans[key]

    def reindexed(self, plan: "StagePlan", job: "Job", tensors: list["torch.Tensor"], keys: list
                  ) -> tuple[list["torch.Tensor"], list]:
        """The job's inputs on the stage's output vocabulary, and their cache keys (None for inputs that
        change per candidate). Inputs whose rows all stay where they are come back as they are."""
        axis = job.vocabulary_axis
        row_plan = self.row_plan(plan, job, [t.shape[axis] for t in tensors], "recipe")
        if row_plan.identity:
            return tensors, keys
        keys = [None if k is None else (*k, "vocabulary", id(plan.vocabulary)) for k in keys]
        if any(k is None for k in keys):
            return apply_rows(row_plan, tensors, axis), keys
        return self._reindexed.get(("reindexed", id(row_plan), tuple(keys)), lambda: apply_rows(row_plan, tensors, axis)), keys


def load_tokenizer(folder: str | Path) -> "transformers.PreTrainedTokenizerBase | None":
    """A model folder's tokenizer as mergekit loads it; None when the folder has none (mergekit then
    takes the base model's vocabulary for it)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        return None
