"""A study as a sampler or a pruner reads it: the real study, its trials passed through a function.

The staged TPE reads pruned trials as finished at an estimated score
(search/study/staged_tpe.py); the trial loop shows its pruner only the trials told before
the trial at hand was asked, so pruning does not depend on which worker was faster
(search/run/trial_loop.py). Both wrap the study in a view rather than copy it.

Optuna 5's samplers read trials by the study's private `_get_trials`, its pruners by
`get_trials`; a view answers both, and everything else from the study itself. Should
Optuna read trials another way, the view would pass the study through unchanged, and
the tests of both users fail (tests/test_runspec.py, tests/test_reproducible.py).
"""

from __future__ import annotations

from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial


class StudyView:
    """Made for one proposal or one pruning check, during which the study does not change (the driver is
    its one writer, and is busy proposing): the trials are read and transformed once, though a sampler
    reads them more than once per proposal."""

    def __init__(self, study: optuna.Study, transform: Callable[[list[FrozenTrial]], list[FrozenTrial]]):
        self._study, self._transform = study, transform
        self._trials: list[FrozenTrial] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        if self._trials is None:
            self._trials = self._transform(self._study._get_trials(deepcopy=False))
        return [t for t in self._trials if states is None or t.state in states]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)
