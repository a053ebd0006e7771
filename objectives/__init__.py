"""Objectives: what a candidate merge is scored on.

An objective maps (model, tokenizer, fidelity) to one number. It is built once per
worker from its spec (the run spec's `objectives:` list) and called once per trial
and stage, so costly set-up (task building, tokenization) happens in its
constructor or on its first call, never per trial.

    objectives:
      - {kind: lmeval, include_path: zoo/tasks, tasks: [fst_search, nxt_search], fidelities: [16, 64, 256]}
      - {kind: perplexity, path: data/wiki.txt, tokens: 8192}
      - {kind: custom, function: mypkg.scores:accuracy}
      - {kind: cost, measure: params}

Several objectives make a multi-objective study (one Optuna direction each).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from search.engine.errors import UserError

# kind -> "module:class"; imported only when used, so a cost-only search never imports lm-eval.
REGISTRY = {
    "lmeval": "objectives.lmeval:LmEvalObjective",
    "perplexity": "objectives.perplexity:PerplexityObjective",
    "custom": "objectives.custom:CustomObjective",
    "cost": "objectives.cost:CostObjective",
}


class Objective:
    """One score of a candidate. Subclasses set the attributes and implement `score`."""

    kind: ClassVar[str]
    name: str
    direction: str  # "maximize" | "minimize"
    fidelities: list[int] | None  # stage sizes, e.g. [16, 64, 256] examples; None = a single stage
    has_heldout: bool = True  # False: score_heldout only repeats the full search score

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "Objective":
        raise NotImplementedError

    def prepare(self) -> None:
        """Costly set-up that needs no candidate (lm-eval's requests, say): a worker calls it as it starts,
        while the driver is still busy, so the first trial does not pay for it."""

    def new_candidate(self) -> None:
        """Called whenever a new candidate has been built into the model that `score` will see.

        Until the next call, `score` may reuse per-example results from its earlier stages on
        the same candidate (stages are nested), so a stage costs only the examples it adds.
        Callers that never call it get a full score on every call. The model object itself
        says nothing: the engine writes each candidate into the same resident object.
        """

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        """Score on the first `fidelity` examples of the fixed order (None: the whole search set)."""
        raise NotImplementedError

    def score_heldout(self, model, tokenizer) -> float:
        """Score on the held-out split, which the search never sees."""
        raise NotImplementedError

    def eval_batch_tokens(self, device_type: str) -> int | None:
        """Padded tokens of the largest forward pass `score` runs on a model on this device type: a worker's
        memory estimate counts its logits and activations (search/engine/memory_estimate.py). None: not
        known (the estimate then assumes its default); 0: no forward pass at all."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, direction={self.direction!r}, fidelities={self.fidelities})"


def objective_class(kind: Any, where: str) -> type[Objective]:
    if kind not in REGISTRY:
        raise UserError(f"{where}.kind: expected one of {', '.join(REGISTRY)}, got {kind!r}")
    module_name, class_name = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_objectives(specs: list[dict], base_dir: Path) -> list[Objective]:
    """Objectives from the run spec's `objectives:` list; relative paths resolve against `base_dir`."""
    built = [objective_class(spec.get("kind"), where).from_spec(spec, where, Path(base_dir))
             for where, spec in _entries(specs)]
    _check_unique([o.name for o in built])
    return built


@dataclass(frozen=True)
class ObjectiveInfo:
    """What the driver needs of an objective, read from its spec (see describe_objectives)."""

    kind: str
    name: str
    direction: str
    fidelities: list[int] | None
    has_heldout: bool | None  # None: known once a worker has built the objective
    reports_examples: bool  # hands per-example results to the paired pruner (`example_aggregations`)


# kinds whose spec is checked without building the objective: lm-eval takes seconds to import and
# its tasks seconds to build, which the workers do anyway (they report what only the built tasks know)
DESCRIBE = {"lmeval": "objectives.lmeval_spec:describe_lmeval"}


def describe_objectives(specs: list[dict], base_dir: Path) -> list[ObjectiveInfo]:
    """Every objective's spec checked, as build_objectives checks it, and what the driver needs of it;
    the cheap kinds are built to say it, lmeval is read from its spec alone."""
    infos = []
    for where, spec in _entries(specs):
        kind = spec.get("kind")
        if kind in DESCRIBE:
            module_name, function = DESCRIBE[kind].split(":")
            infos.append(getattr(importlib.import_module(module_name), function)(spec, where, Path(base_dir)))
        else:
            o = objective_class(kind, where).from_spec(spec, where, Path(base_dir))
            infos.append(ObjectiveInfo(o.kind, o.name, o.direction, o.fidelities, o.has_heldout,
                                       hasattr(o, "example_aggregations")))
    _check_unique([i.name for i in infos])
    return infos


def _entries(specs: list[dict]) -> list[tuple[str, dict]]:
    if not isinstance(specs, list) or not specs:
        raise UserError("objectives: expected a non-empty list like [{kind: lmeval, tasks: [...]}]")
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise UserError(f"objectives[{i}]: expected a mapping like {{kind: lmeval, ...}}, got {spec!r}")
    return [(f"objectives[{i}]", spec) for i, spec in enumerate(specs)]


def _check_unique(names: list[str]) -> None:
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"objectives[{i}].name: {name!r} is used twice; give each objective its own name")
