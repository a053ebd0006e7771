"""Optuna pruners by name, fitted to the objective's fidelity stages.

A trial reports its score after each stage with `step` = the stage's fidelity
(e.g. 16, 64, 256 examples), so resource-based pruners read the steps as
resources: the first stage is the minimum, the last the maximum, and the ratio
between stages is the reduction factor.
"""

from __future__ import annotations

import optuna

from search.engine.errors import UserError
from search.study.paired_pruner import PairedPruner


def _reduction_factor(fidelities: list[int]) -> int:
    if len(fidelities) < 2:
        return 3
    return max(2, round(fidelities[1] / fidelities[0]))


def build_pruner(name: str, fidelities: list[int] | None = None) -> optuna.pruners.BasePruner:
    p = optuna.pruners
    if name == "none" or not fidelities or len(fidelities) < 2:
        return p.NopPruner()  # a single stage leaves nothing to stop early
    if name == "median":
        return p.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "paired":
        return PairedPruner()
    if name == "successive_halving":
        return p.SuccessiveHalvingPruner(min_resource=fidelities[0], reduction_factor=_reduction_factor(fidelities))
    if name == "hyperband":
        return p.HyperbandPruner(
            min_resource=fidelities[0], max_resource=fidelities[-1], reduction_factor=_reduction_factor(fidelities)
        )
    raise UserError(f"pruner: unknown pruner {name!r}; use paired, successive_halving, hyperband, median or none")
