"""The driver's per-trial work does not grow with the study: structural checks, no timing.

- The counts the progress line shows, kept one told trial at a time (search/study/trial_counts.py),
  equal a recount of the whole study, for one objective and for several, with baselines,
  duplicates, pruned, failed and interrupted trials among them.
- The study's storage (search/study/single_writer_storage.py) reads the study from the database once;
  afterwards each trial costs at most one read of that one trial (its end, read back), however
  many trials the sampler and the loop read; and what it serves from memory equals what a
  fresh read of the database gives.
- SQLite runs in WAL mode (search/study/sqlite_wal.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search.study import records  # noqa: E402
from search.study.storage import open_storage  # noqa: E402
from search.study.trial_counts import TrialCounts, study_counts  # noqa: E402


def recount(study: optuna.Study):
    """The counts and best search trial by their definition, from the whole study (the old per-trial recount)."""
    search = [t for t in study.get_trials(deepcopy=False) if records.is_search_trial(t)]
    complete = [t for t in search if t.state == TrialState.COMPLETE]
    failed = [t for t in search if t.state == TrialState.FAIL and not records.is_interrupted(t)]
    pruned = [t for t in search if t.state == TrialState.PRUNED]
    best = None
    if complete:
        if len(study.directions) > 1:
            front = [t for t in study.best_trials if records.is_search_trial(t)]
            best = min(front or complete, key=lambda t: t.number).number
        else:
            sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
            best = max(complete, key=lambda t: (sign * t.value, -t.number)).number
    return len(complete), len(pruned), len(failed), best


def tell_mixed_trials(study: optuna.Study, n: int, on_told) -> None:
    """n trials of every kind the loop tells, values with ties; `on_told` gets each frozen trial."""
    multi = len(study.directions) > 1
    for i in range(n):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        kind = i % 7
        if kind == 1:
            trial.set_user_attr(records.BASELINE_ATTR, f"b{i}")
        if kind == 2:
            trial.set_user_attr(records.DUPLICATE_ATTR, max(0, i - 2))
        if kind == 3:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        elif kind == 4:
            trial.set_user_attr(records.REASON_ATTR, "boom")
            frozen = study.tell(trial, state=TrialState.FAIL)
        elif kind == 5:
            trial.set_user_attr(records.REASON_ATTR, records.INTERRUPTED)
            frozen = study.tell(trial, state=TrialState.FAIL)
        else:
            v = round(x, 1)  # ties on purpose
            frozen = study.tell(trial, [v, round(1 - x * x, 1)] if multi else v)
        on_told(frozen)


@pytest.mark.parametrize("directions", [["maximize"], ["minimize"], ["maximize", "minimize"], ["minimize", "minimize"]])
def test_counts_kept_incrementally_equal_a_recount(directions):
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=3))
    tally = TrialCounts([d for d in study.directions])
    checked = 0

    def on_told(frozen):
        nonlocal checked
        tally.add(frozen)
        c = tally.counts()
        assert (c.complete, c.pruned, c.failed, c.best_trial) == recount(study)
        checked += 1

    tell_mixed_trials(study, 120, on_told)
    assert checked == 120
    whole = study_counts(study)
    assert (whole.complete, whole.pruned, whole.failed, whole.best_trial) == recount(study)
    assert whole.best == tally.counts().best


def count_backend_reads(storage) -> dict:
    """Wraps the database reads of `storage`'s backend; the counters."""
    backend, counts = storage._backend, {"study": 0, "trial": 0}
    for name, key in (("_get_trials", "study"), ("get_trial", "trial")):
        original = getattr(backend, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        setattr(backend, name, counted)
    return counts


def test_storage_reads_the_database_once_and_serves_what_a_fresh_read_gives(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    with storage._backend.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=0, n_startup_trials=5)
    study = optuna.create_study(study_name="s", storage=storage, sampler=sampler)
    study.enqueue_trial({"x": 0.5, "y": 2})  # a WAITING trial popped by ask
    reads = count_backend_reads(storage)
    in_flight, told = [], 0
    for i in range(60):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.suggest_int("y", 0, 4)
        trial.set_user_attr("record", {"stages": [{"step": 16, "scores": {"a": 1.0}}], "tuple": (1, 2)})
        trial.report(0.1 * i, 16)
        in_flight.append(trial)
        if len(in_flight) > 4:  # several trials unfinished at once, as with several workers
            done = in_flight.pop(0)
            study.tell(done, done.params["x"]) if done.number % 3 else study.tell(done, state=TrialState.PRUNED)
            told += 1
        study.get_trials(deepcopy=False)  # the loop and the sampler read the study all the time
    assert reads["study"] <= 1  # the one read of the whole study
    assert reads["trial"] <= told + 1  # one read back per state change (the enqueued trial's start too)

    fresh = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    cached = study.get_trials(deepcopy=False)
    assert len(fresh) == len(cached) == 60  # the enqueued trial was the first one asked
    for a, b in zip(fresh, cached):
        assert (a.number, a.state, a.values, a.params, a.distributions, a.user_attrs, a.intermediate_values,
                a.datetime_start, a.datetime_complete) == (
                b.number, b.state, b.values, b.params, b.distributions, b.user_attrs, b.intermediate_values,
                b.datetime_start, b.datetime_complete), a.number


def test_a_write_that_raises_is_read_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    backend = storage._backend
    original = backend.set_trial_user_attr

    def write_then_fail(*args, **kwargs):
        original(*args, **kwargs)  # written, but the caller sees an error (as a Ctrl-C after the commit)
        raise KeyboardInterrupt

    backend.set_trial_user_attr = write_then_fail
    with pytest.raises(KeyboardInterrupt):
        trial.set_user_attr("reason", "interrupted")
    backend.set_trial_user_attr = original
    assert study.get_trials(deepcopy=False)[0].user_attrs == {"reason": "interrupted"}
