"""Search spaces: define-by-run maps from an Optuna trial to a mergekit recipe (pure Python, no torch).

    space = build_space(run_spec["space"], read_model_infos({"base": "zoo/base", ...}))
    recipe = space.suggest(trial)            # a Recipe, or a list of stages for kind: compose
    study.enqueue_trial(space.params(known)) # a known recipe as a point of the space

Kinds: slerp, weights, layout, expansion, moe, compose (see each module's docstring
for its spec). Every space also takes max_layers / max_params (spaces/constraints.py):
a candidate that breaks one raises optuna.TrialPruned before anything is built.
"""

from __future__ import annotations

from search.engine.errors import UserError, short

from .base import Space
from .compose import ComposeSpace
from .expansion import ExpansionSpace
from .layout import LayoutSpace
from .model_info import ModelInfo, read_model_infos
from .moe import MoESpace
from .slerp import SlerpSpace
from .weights import WeightsSpace

SPACES: dict[str, type[Space]] = {
    cls.kind: cls for cls in (SlerpSpace, WeightsSpace, LayoutSpace, ExpansionSpace, MoESpace, ComposeSpace)
}


def build_space(spec: dict, models: dict[str, ModelInfo], where: str = "space") -> Space:
    """The space a run spec's `space:` mapping describes, over the run's models (alias -> ModelInfo)."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with a kind: ({', '.join(SPACES)})")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SPACES:
        raise UserError(f"{where}.kind: {short(kind)} is not a space; use one of {', '.join(SPACES)}")
    return SPACES[kind](spec, models, where)


__all__ = ["SPACES", "ModelInfo", "Space", "build_space", "read_model_infos"]
