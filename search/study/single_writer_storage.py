"""Optuna's cached RDB storage for a study with one writer: reads from memory, writes through.

Optuna wraps an RDB storage in `_CachedStorage`, which keeps finished trials in memory
but reads every unfinished trial again from the database on each read of the study,
in case another process changed it. The sampler and `study.ask` read the study several
times per trial, and with K workers some 2K trials are unfinished (in flight, or held
back by the reproducible schedule): at 64 workers those re-reads were most of the
driver's time per trial.

A study has one driver (README, "Running on a cluster": two drivers on one study at
the same time are not supported), and every write to it goes through this object. So
after one read of the study from the database, this storage applies each write to its
cached trial as well as to the database, and reads come from memory. A trial's change
of state is read back from the database once (it sets the start and end times), so the
cache holds exactly what a fresh read would. A write that raises (the database refused,
or Ctrl-C landed in it) leaves the trial's cached copy unknown: it is read again before
the next read of the study. Writes are unchanged: each is committed before it returns.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial


def _as_stored(value: Any) -> Any:
    """The value as the database gives it back (JSON: tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


class SingleWriterStorage(_CachedStorage):
    def __init__(self, backend):
        super().__init__(backend)
        self._loaded: set[int] = set()  # studies read once from the database; since then the cache is whole
        self._unknown: set[int] = set()  # trials whose last write raised: read again before they are trusted
        self.remote_reads = 0  # reads of the study from the database (tests/test_driver_scale.py counts them)

    # ---- reads

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if study_id not in self._loaded:
            self.remote_reads += 1
            super()._read_trials_from_remote_storage(study_id)
            self._loaded.add(study_id)
        for trial_id in list(self._unknown):
            self._reload(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._unknown:
            self._reload(trial_id)
        with self._lock:
            cached = self._cached(trial_id)
        return cached if cached is not None else self._backend.get_trial(trial_id)

    def _cached(self, trial_id: int) -> FrozenTrial | None:
        where = self._trial_id_to_study_id_and_number.get(trial_id)
        if where is None or where[0] not in self._loaded:
            return None
        return self._studies[where[0]].trials.get(where[1])

    def _reload(self, trial_id: int) -> None:
        trial = self._backend.get_trial(trial_id)
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is not None:
                self._studies[where[0]].trials[trial.number] = trial
            self._unknown.discard(trial_id)

    # ---- writes: to the database, then to the cached trial (a copy, so no reader sees one change)

    def _write(self, trial_id: int, write, change) -> Any:
        try:
            result = write()
        except BaseException:
            self._unknown.add(trial_id)
            raise
        with self._lock:
            cached = self._cached(trial_id)
            if cached is not None and trial_id not in self._unknown:
                trial = copy.copy(cached)
                change(trial)
                self._studies[self._trial_id_to_study_id_and_number[trial_id][0]].trials[trial.number] = trial
        return result

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution) -> None:
        def change(t: FrozenTrial) -> None:
            t.params = {**t.params, param_name: distribution.to_external_repr(param_value_internal)}
            t.distributions = {**t.distributions, param_name: distribution}

        self._write(trial_id, lambda: super(SingleWriterStorage, self).set_trial_param(
            trial_id, param_name, param_value_internal, distribution), change)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        def change(t: FrozenTrial) -> None:
            t.intermediate_values = {**t.intermediate_values, step: intermediate_value}

        self._write(trial_id, lambda: self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value),
                    change)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        def change(t: FrozenTrial) -> None:
            t.user_attrs = {**t.user_attrs, key: _as_stored(value)}

        self._write(trial_id, lambda: self._backend.set_trial_user_attr(trial_id, key=key, value=value), change)

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        def change(t: FrozenTrial) -> None:
            t.system_attrs = {**t.system_attrs, key: _as_stored(value)}

        self._write(trial_id, lambda: self._backend.set_trial_system_attr(trial_id, key=key, value=value), change)

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        try:
            changed = self._backend.set_trial_state_values(trial_id, state=state, values=values)
        except BaseException:
            self._unknown.add(trial_id)
            raise
        if changed:
            self._reload(trial_id)  # the database stamps the start or end time
        return changed
