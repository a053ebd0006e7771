"""The stage protocol: which (objective, fidelity) pairs each worker round trip scores.

A trial with fidelity stages makes one round trip per stage: the worker returns
the stage's score with the candidate still resident; the driver reports it,
asks the pruner, and either tells the same worker to go on or finishes the trial
as PRUNED. A study with several objectives cannot prune (Optuna), so each
objective is scored once, at its last fidelity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    jobs: list[tuple[int, Any]]  # (objective index, fidelity) scored in this round trip
    step: int | None  # reported to Optuna as the step (the fidelity) when the study prunes


def plan_stages(fidelities: list[list[int] | None], prune: bool) -> list[Stage]:
    """Single objective with stages and a pruner: one stage per fidelity, each reported.
    Otherwise one stage, every objective at its last (fullest) fidelity."""
    if len(fidelities) == 1 and prune and fidelities[0] and len(fidelities[0]) > 1:
        return [Stage(jobs=[(0, f)], step=int(f)) for f in fidelities[0]]
    return [Stage(jobs=[(i, f[-1] if f else None) for i, f in enumerate(fidelities)], step=None)]
