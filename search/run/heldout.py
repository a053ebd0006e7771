"""Held-out re-scoring: the top trials by search score, scored again on the split the search never saw.

A small search split ranks close candidates with noise, so the run's winner is the
best on held-out among the top `heldout_top_k` by search score. The scores are kept
on the study (a user attribute), so a resumed run does not score a trial twice.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from search.study import records
from search.workers.worker_faults import WorkerDied
from search.workers.worker_pool import Slot, WorkerPool

MAX_ATTEMPTS = 2  # a re-score whose worker dies is tried once more


def heldout_candidates(study: optuna.Study, top_k: int, has_heldout: bool, directions: list[str]) -> list:
    """The trials to re-score: the top k by search score (the Pareto front's first k with several objectives)."""
    if top_k == 0 or not has_heldout:
        return []
    # baselines are re-scored with the search scores already (search/run/baselines.py); a duplicate's recipe
    # is its original's
    if len(directions) > 1:
        pool = sorted((t for t in study.best_trials if records.is_search_trial(t)), key=lambda t: t.number)
    else:
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if records.is_search_trial(t)]
        sign = -1 if directions[0] == "maximize" else 1
        pool = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
    return pool[:top_k]


def run_heldout(study: optuna.Study, candidates: list, pool: WorkerPool, n_objectives: int, say,
                timeout: float | None = None) -> None:
    """Score `candidates` on the held-out split over the pool's free workers; `say` reports a failure.
    A re-score still running after `timeout` seconds is given up and its worker replaced."""
    done: dict[str, Any] = dict(study.user_attrs.get(records.HELDOUT_ATTR, {}))
    examples: dict[str, Any] = dict(study.user_attrs.get(records.HELDOUT_EXAMPLES_ATTR, {}))
    todo = collections.deque(t for t in candidates if str(t.number) not in done)
    free = collections.deque(pool.live())
    in_flight: dict[Any, tuple[Slot, optuna.trial.FrozenTrial, float]] = {}
    indices = list(range(n_objectives))
    attempts: dict[int, int] = collections.Counter()
    while todo or in_flight:
        while todo and free:
            slot, t = free.popleft(), todo.popleft()
            attempts[t.number] += 1
            recipe_yaml = t.user_attrs[records.RECORD_ATTR]["recipe"]
            in_flight[pool.call(slot, "heldout", t.number, recipe_yaml, indices)] = (slot, t, time.monotonic())
        if not in_flight:
            break
        ready = pool.wait(list(in_flight), timeout=None if timeout is None else 0.5)
        if not ready:
            now = time.monotonic()
            for ref, (slot, t, started) in list(in_flight.items()):
                if now - started >= timeout:
                    del in_flight[ref]
                    pool.replace(slot)
                    say(f"held-out score of trial {t.number} failed: timed out after {timeout:g} s")
                    free.append(slot)
            continue
        slot, t, _ = in_flight.pop(ready[0])
        try:
            result = pool.get(ready[0])
        except WorkerDied as e:
            pool.replace(slot)
            if attempts[t.number] < MAX_ATTEMPTS:
                todo.append(t)
            else:
                say(f"held-out score of trial {t.number} failed: {e.reason}")
        else:
            slot.busy_s += result["busy_s"]
            if result["ok"]:
                done[str(t.number)] = result["scores"]
                study.set_user_attr(records.HELDOUT_ATTR, done)
                if result.get("examples") is not None:  # for the winner's paired margin over the baselines
                    examples[str(t.number)] = result["examples"]
                    study.set_user_attr(records.HELDOUT_EXAMPLES_ATTR, examples)
            else:
                say(f"held-out score of trial {t.number} failed: {result['error']}")
        if not slot.retired:
            free.append(slot)
