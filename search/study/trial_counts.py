"""A study's counts (complete / pruned / failed search trials) and best search trial, kept up to date
one told trial at a time.

The progress line shows them after every trial; counting them again from the whole study each
time made the driver's time per trial grow with the study (O(n) per trial, O(n^2) per run).
`TrialCounts.add` takes each trial once, as it is told; `study_counts` counts a whole study the
same way (at the start and the end of a run), so the two agree by construction
(tests/test_driver_scale.py checks them against each other).

What counts: search trials (not baselines, not duplicates taking another's result) that
completed, were pruned, or failed; an interrupted trial is not a failure (it runs again).
The best search trial: with one objective the best value (the earliest trial on a tie); with
several, the earliest search trial on the Pareto front of every completed trial (baselines
included, as `study.best_trials` reads it), or the earliest completed search trial when that
front holds only baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.study import records


@dataclass
class Counts:
    """What the progress line shows: a study's counts and best search trial so far."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best: list[float] | None = None
    best_trial: int | None = None
    finished_this_session: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed


def dominates(a: list[float], b: list[float], signs: list[int]) -> bool:
    """a is at least as good as b on every objective and better on one (signs: +1 maximize, -1 minimize)."""
    better = False
    for x, y, s in zip(a, b, signs):
        if s * x < s * y:
            return False
        better = better or s * x > s * y
    return better


class TrialCounts:
    def __init__(self, directions: list[StudyDirection]):
        self.signs = [1 if d == StudyDirection.MAXIMIZE else -1 for d in directions]
        self.complete = self.pruned = self.failed = 0
        self.best: FrozenTrial | None = None  # one objective: the best complete search trial
        self.front: list[FrozenTrial] = []  # several: the Pareto front of every complete trial
        self.first_complete: FrozenTrial | None = None  # several: the earliest complete search trial

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed

    def add(self, t: FrozenTrial) -> None:
        """One trial told (each trial once)."""
        if t.state == TrialState.COMPLETE and len(self.signs) > 1:
            self._add_to_front(t)
        if not records.is_search_trial(t):
            return
        if t.state == TrialState.COMPLETE:
            self.complete += 1
            self._add_complete(t)
        elif t.state == TrialState.PRUNED:
            self.pruned += 1
        elif t.state == TrialState.FAIL and not records.is_interrupted(t):
            self.failed += 1

    def _add_complete(self, t: FrozenTrial) -> None:
        if len(self.signs) > 1:
            if self.first_complete is None or t.number < self.first_complete.number:
                self.first_complete = t
            return
        s, best = self.signs[0], self.best
        if best is None or s * t.values[0] > s * best.values[0] or (
                t.values[0] == best.values[0] and t.number < best.number):
            self.best = t

    def _add_to_front(self, t: FrozenTrial) -> None:
        """The front stays the set of complete trials no other dominates (dominance is transitive, so a trial
        off the front is dominated by one on it, and a new trial need only be compared with the front)."""
        if any(dominates(f.values, t.values, self.signs) for f in self.front):
            return
        self.front = [f for f in self.front if not dominates(t.values, f.values, self.signs)] + [t]

    def best_search_trial(self) -> FrozenTrial | None:
        if len(self.signs) == 1:
            return self.best
        on_front = [f for f in self.front if records.is_search_trial(f)]
        if on_front:
            return min(on_front, key=lambda f: f.number)
        return self.first_complete  # a front of baselines only: the first trial

    def counts(self, running: int = 0) -> Counts:
        c = Counts(complete=self.complete, pruned=self.pruned, failed=self.failed, running=running)
        best = self.best_search_trial()
        if best is not None:
            c.best, c.best_trial = list(best.values), best.number
        return c

    @classmethod
    def of(cls, trials: Iterable[FrozenTrial], directions: list[StudyDirection]) -> "TrialCounts":
        tally = cls(directions)
        for t in sorted(trials, key=lambda t: t.number):
            tally.add(t)
        return tally


def study_counts(study: optuna.Study, multi: bool | None = None, running: int = 0) -> Counts:
    """The counts of a whole study, read once (`multi` is read from the study's directions)."""
    return TrialCounts.of(study.get_trials(deepcopy=False), list(study.directions)).counts(running)
