"""The recipes a run has scored, so that none is built twice.

A trial whose recipe equals one scored already (a baseline, or an earlier trial,
complete or pruned) takes that trial's outcome instead of being built: it is a
duplicate, marked `duplicate_of`, and does not count toward the budget. A duplicate
of a trial still running waits for its outcome. A failure is not taken over (it may
not repeat): the first trial waiting on a failed one is built after all, and the
others wait on it. A sampler that proposes nothing but old recipes for
MAX_IN_A_ROW trials has run out of new points.
"""

from __future__ import annotations

import collections
from typing import Any

import optuna
from optuna.trial import TrialState

from search.study import records

MAX_IN_A_ROW = 100  # the sampler proposes only recipes already scored: the space is spent
REUSABLE = (TrialState.COMPLETE, TrialState.PRUNED)  # outcomes a duplicate takes (a failure may not repeat)

# a trial's outcome: its state, what it is told with (values, reason), and its stages' scores
Outcome = tuple[TrialState, dict, list]


class ScoredRecipes:
    def __init__(self, study: optuna.Study):
        self.first_with: dict[str, int] = {}  # recipe -> the first trial with it
        self.outcomes: dict[int, Outcome] = {}
        self.waiting: dict[int, list[Any]] = collections.defaultdict(list)  # trial -> runs waiting for it
        self.in_a_row = 0
        for t in study.get_trials(deepcopy=False, states=REUSABLE):  # baselines and earlier sessions
            rec = t.user_attrs.get(records.RECORD_ATTR, {})
            if rec.get("recipe") and rec["recipe"] not in self.first_with and records.DUPLICATE_ATTR not in t.user_attrs:
                self.first_with[rec["recipe"]] = t.number
                told = {"values": list(t.values)} if t.state == TrialState.COMPLETE else {}
                self.outcomes[t.number] = (t.state, {**told, "reason": t.user_attrs.get(records.REASON_ATTR)},
                                           rec.get("stages", []))

    @property
    def spent(self) -> bool:
        return self.in_a_row >= MAX_IN_A_ROW

    def check(self, run) -> Outcome | None:
        """A new trial: None when its recipe is new (it is built); else it is marked a duplicate, and gets
        its original's outcome now, or None while it waits for one (`settled` hands it over later)."""
        original = self.first_with.setdefault(run.recipe_yaml, run.number)
        if original == run.number:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        run.duplicate_of = original
        if original in self.outcomes:
            return self.outcomes[original]
        self.waiting[original].append(run)
        return None

    def settled(self, run, state: TrialState, told: dict) -> tuple[list, list]:
        """A built trial's outcome: (duplicates that take it now, duplicates to build after all)."""
        waiting = self.waiting.pop(run.number, [])
        if state in REUSABLE:
            self.outcomes[run.number] = (state, told, run.stages)
            return waiting, []
        self.first_with.pop(run.recipe_yaml, None)
        in_a_row, rebuild = self.in_a_row, []
        for duplicate in waiting:
            duplicate.duplicate_of = None
            if self.check(duplicate) is None and duplicate.duplicate_of is None:
                rebuild.append(duplicate)
        self.in_a_row = in_a_row  # these were proposed before: they do not count again
        return [], rebuild
