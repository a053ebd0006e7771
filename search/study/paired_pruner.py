"""The paired pruner: stop a trial when it scores significantly worse than the best trial
on the same examples.

Rank-based pruners (successive halving) keep the best 1/r of the trials at a stage, by
the stage's score alone. On a small first stage that score ranks close candidates
poorly (BENCHMARKS.md, "Search: stage scores": over the best 30 of 200 random merges of
the demo's space, the 16-example score has a Spearman correlation of 0.62 with the held-out
score, the 128-example score 0.99), so good candidates
are cut by chance and the search can settle in a worse region.

Every trial is scored on the same examples, so a trial can be compared with the best
completed trial example by example, which cancels most of the noise: the difference of
the two scores at this stage, over its standard error, is a z statistic. The trial is
stopped when it is worse by more than `z` standard errors (1.64: one-sided 5%). A
clearly worse candidate stops after the first stage; one close to the best goes on to the
next stage, where more examples decide.

The difference and its standard error are search/study/paired_stats.py's.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from search.study.paired_stats import ExampleValues, paired_difference

DEFAULT_Z = 1.64


def paired_z(current: ExampleValues, best: ExampleValues, direction: str) -> float:
    """How many standard errors `current` scores worse than `best` on the examples both scored
    (positive: worse; `direction` says which way is better)."""
    diff, se, _ = paired_difference(current, best)
    if se == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff if direction == "minimize" else -diff)
    z = diff / se
    return z if direction == "minimize" else -z


class PairedPruner(optuna.pruners.BasePruner):
    """Optuna pruner over per-example values the driver records for each trial's latest stage."""

    def __init__(self, z: float = DEFAULT_Z):
        self.z = z
        self._examples: dict[int, ExampleValues] = {}  # trial number -> its latest stage's examples

    def record(self, number: int, examples: ExampleValues) -> None:
        self._examples[number] = examples

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        current = self._examples.get(trial.number)
        # the best completed trial whose examples this process saw: after a resume, the best so far
        # since then, until the study's own best is beaten
        seen = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number in self._examples]
        if current is None or not seen:
            return False
        direction = study.direction.name.lower()
        best = (min if direction == "minimize" else max)(seen, key=lambda t: t.value)
        if paired_z(current, self._examples[best.number], direction) > self.z:
            del self._examples[trial.number]  # only completed trials are compared with later
            return True
        return False
