"""The search driver: Optuna ask-and-tell over a pool of Ray workers.

The driver is the only writer of the study. It asks a trial, lets the space turn
it into a recipe, and hands the recipe to a free worker; workers only build and
score. Dispatch is asynchronous (ray.wait on whatever is in flight): a worker
that frees up gets the next piece of work at once, with no generation barrier.

A trial with fidelity stages makes one round trip per stage: the worker returns
the stage's score with the candidate still resident; the driver reports it,
asks the pruner, and either tells the same worker to go on (`advance`) or
finishes the trial as PRUNED. A study with several objectives cannot prune
(Optuna), so each objective is scored once, at its last fidelity.

Faults: a worker that dies is replaced and its trial retried once, then recorded
FAIL with the reason; an exception while building or scoring fails only that
trial. Ctrl-C or a killed driver leaves trials RUNNING in the study; --resume
marks them FAIL ("interrupted") and enqueues their parameters again, so each
re-runs, and the budget counts the trials that finished.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search import export, records
from search import recipe as recipes
from search.errors import UserError
from search.progress import Counts, Progress
from search.paired_pruner import PairedPruner
from search.pruners import build_pruner
from search.runspec import RunSpec
from search.samplers import build_sampler
from search.storage import default_url, has_study, mask, open_storage
from search.worker import OFFLINE_ENV, Worker

MAX_ATTEMPTS = 2  # a trial whose worker dies is run once more, then failed
MAX_SUGGEST_FAILURES_IN_A_ROW = 20  # the space raises on every trial: a bug, not bad luck

log = logging.getLogger("mergesearch")


# ---- the plan of stages ----------------------------------------------------


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


# ---- bookkeeping -------------------------------------------------------------


@dataclass
class TrialRun:
    trial: optuna.Trial
    recipe_yaml: str
    stage: int = 0  # index of the stage in flight
    stages: list[dict] = field(default_factory=list)  # {"step": ..., "scores": {name: value}}
    reported: set = field(default_factory=set)
    attempts: int = 0
    workers: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {"materialize_s": [], "score_s": [], "busy_s": 0.0})

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass
class Slot:
    """One worker position; its actor is replaced when it dies."""

    index: int
    handle: Any = None
    generation: int = 0
    retired: bool = False
    info: dict = field(default_factory=dict)
    busy_s: float = 0.0
    calls: int = 0
    trials: int = 0
    free_since: float | None = None  # driver clock; to measure idle gaps
    idle_gaps: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"w{self.index}" + (f".{self.generation}" if self.generation else "")


@dataclass
class RunResult:
    run_dir: Path
    study_name: str
    storage: str  # masked
    counts: dict[str, int]
    best: dict | None
    utilization: dict


# ---- Ray -----------------------------------------------------------------------


def connect_ray(address: str | None) -> bool:
    """Join `address`, or start a local Ray (no dashboard); True if this call started it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local" always starts a fresh instance: a bare init() would join any Ray
            # another program on this machine happens to run.
            ray.init(address="local", include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--ray-address {address}" if address else "a local Ray instance"
        raise UserError(f"cannot start or join {where}: {str(e).splitlines()[0]}") from None
    return True


def _worker_resources(workers: int) -> tuple[dict, int]:
    """Actor options (one GPU each where there are GPUs) and torch threads per worker."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if gpus >= 1:
        if workers > gpus:
            raise UserError(f"workers: {workers} workers but Ray sees {int(gpus)} GPUs; pass --workers {int(gpus)}")
        return {"num_gpus": 1, "num_cpus": min(1.0, cpus / workers)}, max(1, int(cpus // workers))
    return {"num_cpus": min(1.0, cpus / workers)}, max(1, int(cpus // workers))


def _death_reason(e: Exception) -> str:
    text = str(e)
    if "creation task" in text:  # the actor's __init__ raised: its last line is the exception
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return "worker failed to start: " + lines[-1][:300]
    for marker in ("Worker exit detail:", "error_message:", "The actor died"):
        i = text.find(marker)
        if i >= 0:
            return "worker died: " + text[i:].splitlines()[0][:300]
    return "worker died: " + (text.strip().splitlines() or [type(e).__name__])[0][:300]


# ---- the driver ------------------------------------------------------------------


class Driver:
    def __init__(
        self,
        spec: RunSpec,
        *,
        resume: bool = False,
        ray_address: str | None = None,
        quiet: bool = False,
    ):
        self.spec, self.resume, self.ray_address, self.quiet = spec, resume, ray_address, quiet
        self.run_dir = spec.run_dir
        self.trials_path = self.run_dir / "trials.jsonl"

    # ---- set-up: everything is validated before the run folder, the study or Ray exist

    def prepare(self) -> None:
        from objectives import build_objectives
        from spaces import build_space
        from spaces.model_info import read_model_infos

        spec = self.spec
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(
                f"{self.run_dir}: a file is in the way of the run folder; move it or choose another `name:`"
            )
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what matters
        self.space = build_space(spec.space, read_model_infos(spec.models))
        objectives = build_objectives(spec.objectives, spec.base_dir)
        self.objective_names = [o.name for o in objectives]
        self.directions = [o.direction for o in objectives]
        fidelities = [list(o.fidelities) if o.fidelities else None for o in objectives]
        self.multi = len(objectives) > 1
        # objectives without a held-out split would only repeat the search score: nothing to re-score then
        self.has_heldout = any(getattr(o, "has_heldout", True) for o in objectives)
        prune = not self.multi and spec.pruner != "none"
        self.stages = plan_stages(fidelities, prune)
        self.pruner = build_pruner(spec.pruner if prune else "none", fidelities[0] if prune else None)
        self.send_examples = isinstance(self.pruner, PairedPruner)
        if self.send_examples:
            if not hasattr(objectives[0], "example_aggregations"):
                raise UserError(f"pruner: paired compares trials example by example, which only the lmeval "
                                f"objective reports ({objectives[0].name} is {objectives[0].kind}); use "
                                "successive_halving")
            objectives[0].example_aggregations()  # a metric it cannot compare fails here, before any trial
        self.sampler = build_sampler(spec.sampler_name, spec.seed, len(objectives), spec.sampler_options)
        self.enqueued_params = []
        for path in spec.enqueue:
            stages = recipes.load(path)
            try:
                self.enqueued_params.append(self.space.params(stages if len(stages) > 1 else stages[0]))
            except UserError as e:
                raise UserError(f"enqueue: {path} is not a point of this space: {e}") from None
        self.storage_url = spec.storage or default_url(self.run_dir)
        self.storage_shown = mask(self.storage_url)
        if spec.storage is None and not (self.run_dir / "study.db").exists():
            self.storage = None  # no study yet; the database is created once the run folder may be
        else:
            self.storage = open_storage(self.storage_url)
        exists = self.storage is not None and has_study(self.storage, spec.name)
        if exists and not self.resume:
            raise UserError(
                f"{self.run_dir}: a study named {spec.name!r} already exists in {self.storage_shown}; "
                "pass --resume to continue it, or choose another `name:`"
            )
        if self.resume and not exists:
            raise UserError(
                f"--resume: no study named {spec.name!r} in {self.storage_shown}; run without --resume to start one"
            )

    def open_study(self) -> None:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.storage is None:
            self.storage = open_storage(self.storage_url)
        if self.resume:
            self.study = optuna.load_study(
                study_name=spec.name, storage=self.storage, sampler=self.sampler, pruner=self.pruner
            )
            before = self.study.user_attrs.get("identity")
            if before is not None and before != _jsonable(spec.identity()):
                changed = [k for k in spec.identity() if before.get(k) != _jsonable(spec.identity())[k]]
                raise UserError(
                    f"--resume: the spec's {', '.join(changed)} changed since the study started; "
                    "restore them or start a new run under another `name:`"
                )
            if list(self.study.directions) != [_direction(d) for d in self.directions]:
                raise UserError("--resume: the objectives' directions changed since the study started; restore them")
            self.recover_interrupted()
        else:
            self.study = optuna.create_study(
                study_name=spec.name,
                storage=self.storage,
                sampler=self.sampler,
                pruner=self.pruner,
                directions=self.directions,
            )
            self.study.set_user_attr("identity", _jsonable(spec.identity()))
            self.study.set_user_attr("objectives", self.objective_names)
            for params in self.enqueued_params:
                self.study.enqueue_trial(params, user_attrs={"enqueued": True})
        meta = {
            "name": spec.name,
            "spec": str(spec.spec_path) if spec.spec_path else None,
            "storage": self.storage_shown,
            "objectives": self.objective_names,
            "directions": self.directions,
            "seed": spec.seed,
            "model_paths": spec.models,
            "stages": [s.step for s in self.stages],
        }
        records.write_atomic(self.run_dir / "run.json", _json(meta))
        self.rewrite_trials()

    def recover_interrupted(self) -> None:
        """Trials a killed driver left RUNNING: mark them FAIL ("interrupted") and enqueue their params again."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study._storage.set_trial_user_attr(t._trial_id, records.REASON_ATTR, records.INTERRUPTED)
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            # an enqueued trial caught before its space asked for anything has its params only as fixed_params;
            # one not sampled at all has none, and its re-run is a fresh sample
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            self.study.enqueue_trial(params, user_attrs={"retry_of": t.number})

    # ---- the pool

    def start_workers(self) -> None:
        import ray

        self.started_ray = connect_ray(self.ray_address)
        self.actor_options, self.threads = _worker_resources(self.spec.workers)
        pythonpath = os.pathsep.join(
            p for p in [str(self.spec.base_dir), os.getcwd(), os.environ.get("PYTHONPATH", "")] if p
        )
        self.actor_options["runtime_env"] = {"env_vars": {**OFFLINE_ENV, "PYTHONPATH": pythonpath}}
        self.remote_worker = ray.remote(Worker)
        self.slots = [Slot(i) for i in range(self.spec.workers)]
        for slot in self.slots:
            self._spawn(slot)
        # wait until every worker has built its objectives, so the clock measures trials, not start-up
        infos = {}
        for slot in self.slots:
            infos[slot.index] = slot.handle.info.remote()
        for slot in self.slots:
            try:
                slot.info = ray.get(infos[slot.index])
            except ray.exceptions.RayActorError as e:
                raise UserError(f"worker {slot.name}: {_death_reason(e)}") from None

    def _spawn(self, slot: Slot) -> None:
        spec = self.spec
        slot.handle = self.remote_worker.options(max_restarts=0, **self.actor_options).remote(
            slot.name, spec.models, spec.objectives, str(spec.base_dir), spec.seed, spec.allow_pickle, self.threads,
            self.send_examples,
        )

    def _replace(self, slot: Slot) -> None:
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        slot.generation += 1
        self._spawn(slot)

    def stop_workers(self) -> None:
        import ray

        for slot in getattr(self, "slots", []):
            if slot.handle is not None:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:
                    pass
        if getattr(self, "started_ray", False):
            ray.shutdown()

    # ---- budget

    def finished_count(self) -> int:
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=done) if not records.is_interrupted(t))

    def may_start_trial(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.spec.trials is not None and self.finished + self.active >= self.spec.trials:
            return False
        return True

    # ---- the loop

    def run_search(self) -> None:
        self.deadline = time.monotonic() + self.spec.timeout if self.spec.timeout else None
        self.finished = self.finished_count()
        self.active = 0  # trials asked and not yet told (in flight, prepared, waiting for a retry or a commit)
        self.retry: collections.deque[TrialRun] = collections.deque()
        self.prepared: TrialRun | None = None
        self.deferred: list[tuple[TrialRun, TrialState, dict]] = []
        self.in_flight: dict[Any, tuple[Slot, TrialRun, str]] = {}
        self.suggest_failures = 0
        free = collections.deque(self.slots)
        self.loop_start = time.monotonic()
        for slot in self.slots:
            slot.free_since = self.loop_start
        with _graceful_ctrl_c() as stop:
            self._loop(free, stop)
        self.loop_end = time.monotonic()

    def _loop(self, free: collections.deque, stop: "_StopFlag") -> None:
        import ray

        while True:
            if stop.requested:  # Ctrl-C, acted on here, never in the middle of a write to the study
                raise KeyboardInterrupt
            # 1. every free worker gets work at once
            while free:
                run = self._next_run()
                if run is None:
                    break
                self._dispatch(free.popleft(), run, "begin")
            # 2. then the storage writes of what just finished, while the workers compute
            self._commit_deferred()
            # 3. and the next trial sampled ahead, so the next worker to free up need not wait for the sampler
            if self.in_flight and self.prepared is None and self.may_start_trial():
                self.prepared = self._new_trial()
            if not self.in_flight:
                if all(s.retired for s in self.slots):
                    raise UserError(f"no worker left: {self.last_death}")
                break  # nothing running and nothing left to start
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                slot, run, kind = self.in_flight.pop(ref)
                now = time.monotonic()
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._worker_died(slot, run, e)
                except ray.exceptions.RayError as e:  # the call itself raised: fail the trial, keep the worker
                    reason = _death_reason(e).replace("worker died", "worker error")
                    self._defer(run, TrialState.FAIL, reason=reason, worker=slot)
                else:
                    slot.busy_s += result["busy_s"]
                    slot.calls += 1
                    if self._stage_done(slot, run, result):
                        continue  # the same worker goes on with the next stage
                slot.free_since = now
                if not slot.retired:
                    free.append(slot)

    def _next_run(self) -> TrialRun | None:
        """Work for a free worker: a retry, the trial sampled ahead, or a new one; None when the budget is spent."""
        if self.retry:
            return self.retry.popleft()
        if self.prepared is not None:
            run, self.prepared = self.prepared, None
            return run
        while self.may_start_trial():
            run = self._new_trial()
            if run is not None:
                return run  # else: pruned by a constraint or failed to suggest; ask again
        return None

    def _new_trial(self) -> TrialRun | None:
        trial = self.study.ask()
        self.active += 1
        try:
            recipe = self.space.suggest(trial)
            yaml_text = recipes.dump_stages(recipes.as_stages(recipe))
        except optuna.TrialPruned as e:  # a constraint rejected it: never built
            self.suggest_failures = 0
            self._finish(TrialRun(trial, ""), TrialState.PRUNED, reason=str(e) or "rejected by a constraint")
            return None
        except Exception as e:
            self.suggest_failures += 1
            reason = f"space failed to suggest: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._finish(TrialRun(trial, ""), TrialState.FAIL, reason=reason)
            if self.suggest_failures >= MAX_SUGGEST_FAILURES_IN_A_ROW:
                raise UserError(f"space: {self.suggest_failures} trials in a row failed to suggest; last: {reason}")
            return None
        self.suggest_failures = 0
        return TrialRun(trial, yaml_text)

    def _dispatch(self, slot: Slot, run: TrialRun, kind: str) -> None:
        now = time.monotonic()
        if slot.free_since is not None:
            slot.idle_gaps.append(now - slot.free_since)
            slot.free_since = None
        if kind == "begin":
            run.attempts += 1
            run.stage = 0
            run.workers.append(slot.name)
            run.timings.setdefault("dispatched", time.time())
            ref = slot.handle.begin.remote(run.number, run.recipe_yaml, self.stages[0].jobs)
        else:
            last = run.stage == len(self.stages) - 1
            ref = slot.handle.advance.remote(run.number, self.stages[run.stage].jobs, last)
        self.in_flight[ref] = (slot, run, kind)

    def _stage_done(self, slot: Slot, run: TrialRun, result: dict) -> bool:
        """Handle one stage's result; True if the same worker was sent on to the next stage."""
        t = run.timings
        t["busy_s"] += result["busy_s"]
        if "materialize_s" in result:
            t["materialize_s"].append(result["materialize_s"])
        if not result["ok"]:
            self._defer(run, TrialState.FAIL, reason=result["error"], worker=slot)
            return False
        t["score_s"].append(result["score_s"])
        stage = self.stages[run.stage]
        scores = {self.objective_names[i]: v for (i, _), v in zip(stage.jobs, result["scores"])}
        run.stages.append({"step": stage.step, "scores": scores})
        bad = [n for n, v in scores.items() if not math.isfinite(v)]
        if bad:
            self._defer(run, TrialState.FAIL, reason=f"objective {bad[0]} returned {scores[bad[0]]}", worker=slot)
            return False
        if result.get("examples") is not None:
            self.pruner.record(run.number, result["examples"])
        if run.stage == len(self.stages) - 1:
            values = self._final_values(run)
            self._defer(run, TrialState.COMPLETE, values=values, worker=slot)
            return False
        if stage.step is not None and stage.step not in run.reported:
            run.trial.report(result["scores"][0], stage.step)
            run.reported.add(stage.step)
        if run.trial.should_prune():
            slot.handle.release.remote()
            self._defer(run, TrialState.PRUNED, reason=f"pruned after stage {stage.step}", worker=slot)
            return False
        run.stage += 1
        self._dispatch(slot, run, "advance")
        return True

    def _final_values(self, run: TrialRun) -> list[float]:
        latest: dict[str, float] = {}
        for s in run.stages:
            latest.update(s["scores"])
        return [latest[n] for n in self.objective_names]

    def _worker_died(self, slot: Slot, run: TrialRun, e: Exception) -> None:
        reason = _death_reason(e)
        self.last_death = reason
        if reason.startswith("worker failed to start"):
            # a replacement that cannot start will not start next time either: stop using the slot
            slot.retired, slot.handle = True, None
        else:
            self._replace(slot)
        run.timings.setdefault("deaths", []).append(reason)
        if run.attempts < MAX_ATTEMPTS:
            run.stages.clear()  # a retry starts from the first stage; reported steps stay reported
            self.retry.append(run)
        else:
            self._defer(run, TrialState.FAIL, reason=f"{reason} (after {run.attempts} attempts)", worker=slot)

    def _defer(self, run: TrialRun, state: TrialState, **kwargs) -> None:
        self.deferred.append((run, state, kwargs))

    def _commit_deferred(self) -> None:
        while self.deferred:
            run, state, kwargs = self.deferred.pop(0)
            self._finish(run, state, **kwargs)

    def _finish(self, run: TrialRun, state: TrialState, *, values=None, reason=None, worker: Slot | None = None):
        self.active -= 1
        self.finished += 1
        if worker is not None:
            worker.trials += 1
        run.timings["finished"] = time.time()
        record = {
            "recipe": run.recipe_yaml or None,
            "stages": run.stages,
            "worker": run.workers[-1] if run.workers else None,
            "workers": run.workers,
            "node": worker.info.get("node") if worker else None,
            "attempts": run.attempts,
            "timings": run.timings,
        }
        run.trial.set_user_attr(records.RECORD_ATTR, record)
        if reason:
            run.trial.set_user_attr(records.REASON_ATTR, reason)
        if state == TrialState.COMPLETE:
            frozen = self.study.tell(run.trial, values if self.multi else values[0])
        else:
            frozen = self.study.tell(run.trial, state=state)
        records.append_trial(self.trials_path, records.trial_record(frozen))
        self._progress(frozen, reason)

    # ---- progress

    def _counts(self) -> Counts:
        c = Counts(running=self.active if hasattr(self, "active") else 0)
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.COMPLETE:
                c.complete += 1
            elif t.state == TrialState.PRUNED:
                c.pruned += 1
            elif t.state == TrialState.FAIL and not records.is_interrupted(t):
                c.failed += 1
        best = self._best_trials()
        if best:
            c.best, c.best_trial = list(best[0].values), best[0].number
        return c

    def _best_trials(self) -> list[optuna.trial.FrozenTrial]:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return []
        if self.multi:
            return self.study.best_trials
        return [self.study.best_trial]

    def _progress(self, frozen: optuna.trial.FrozenTrial, reason: str | None) -> None:
        if self.progress is None:
            return
        counts = self._counts()
        counts.finished_this_session = getattr(self, "finished_this_session", 0) + 1
        self.finished_this_session = counts.finished_this_session
        what = f"trial {frozen.number} {frozen.state.name.lower()}"
        if frozen.values:
            what += " " + ", ".join(f"{v:.4g}" for v in frozen.values)
        if reason and frozen.state != TrialState.COMPLETE:
            what += f" ({reason})"
        self.progress.update(counts, what)

    # ---- held-out re-scoring

    def heldout_candidates(self) -> list[optuna.trial.FrozenTrial]:
        k = self.spec.heldout_top_k
        if k == 0 or not self.has_heldout:
            return []
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if self.multi:
            pool = sorted(self.study.best_trials, key=lambda t: t.number)
        else:
            sign = -1 if self.directions[0] == "maximize" else 1
            pool = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
        return pool[:k]

    def run_heldout(self) -> None:
        import ray

        done: dict[str, Any] = dict(self.study.user_attrs.get(records.HELDOUT_ATTR, {}))
        todo = collections.deque(t for t in self.heldout_candidates() if str(t.number) not in done)
        free = collections.deque(s for s in self.slots if not s.retired)
        in_flight: dict[Any, tuple[Slot, optuna.trial.FrozenTrial, int]] = {}
        indices = list(range(len(self.objective_names)))
        attempts: dict[int, int] = collections.Counter()
        while todo or in_flight:
            while todo and free:
                slot, t = free.popleft(), todo.popleft()
                attempts[t.number] += 1
                recipe_yaml = t.user_attrs[records.RECORD_ATTR]["recipe"]
                in_flight[slot.handle.heldout.remote(t.number, recipe_yaml, indices)] = (slot, t, 0)
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, t, _ = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._replace(slot)
                if attempts[t.number] < MAX_ATTEMPTS:
                    todo.append(t)
                else:
                    self.progress.message(f"held-out score of trial {t.number} failed: {_death_reason(e)}")
            else:
                slot.busy_s += result["busy_s"]
                if result["ok"]:
                    done[str(t.number)] = result["scores"]
                    self.study.set_user_attr(records.HELDOUT_ATTR, done)
                else:
                    self.progress.message(f"held-out score of trial {t.number} failed: {result['error']}")
            if not slot.retired:
                free.append(slot)

    # ---- outputs

    def rewrite_trials(self) -> None:
        heldout = self.study.user_attrs.get(records.HELDOUT_ATTR, {})
        recs = [records.trial_record(t, heldout) for t in self.study.get_trials(deepcopy=False)]
        records.write_trials(self.trials_path, recs)

    def utilization(self) -> dict:
        wall = max(1e-9, self.loop_end - self.loop_start)
        per = {
            s.name.split(".")[0]: {
                "busy_s": round(s.busy_s, 4),
                "trials": s.trials,
                "calls": s.calls,
                "utilization": round(s.busy_s / wall, 4),
                "max_idle_gap_s": round(max(s.idle_gaps[1:], default=0.0), 4),
                "node": s.info.get("node"),
            }
            for s in self.slots
        }
        total = sum(s.busy_s for s in self.slots)
        return {"wall_s": round(wall, 4), "workers": per, "utilization": round(total / (wall * len(self.slots)), 4)}

    def run(self) -> RunResult:
        self.progress = None
        self.prepare()
        self.open_study()
        self.progress = Progress(self.spec.name, self.spec.trials, self.spec.timeout, quiet=self.quiet)
        try:
            where = f"Ray at {self.ray_address}" if self.ray_address else "local Ray"
            self.progress.message(f"{self.spec.name}: starting {self.spec.workers} worker(s) on {where}; "
                                  f"study in {self.storage_shown}")
            self.start_workers()
            with self.progress:
                self.progress.update(self._counts(), f"resumed {self.study.study_name}" if self.resume else "started")
                try:
                    self.run_search()
                except KeyboardInterrupt:
                    self.interrupt()
                    raise
            util = self.utilization()
            if self.heldout_candidates():
                self.progress.message(f"re-scoring the top {len(self.heldout_candidates())} on the held-out split")
            self.run_heldout()
        finally:
            self.stop_workers()
        self.rewrite_trials()
        meta = records.read_json(self.run_dir / "run.json")
        meta["utilization"] = util
        records.write_atomic(self.run_dir / "run.json", _json(meta))
        written = export.write_run_outputs(self.run_dir)
        counts = self._counts()
        result = RunResult(
            run_dir=self.run_dir,
            study_name=self.spec.name,
            storage=self.storage_shown,
            counts={"complete": counts.complete, "pruned": counts.pruned, "failed": counts.failed},
            best=written.get("best"),
            utilization=util,
        )
        if not self.quiet:
            export.print_summary(self.run_dir, console=self.progress.console)
        return result

    def interrupt(self) -> None:
        """Ctrl-C: finished trials are told; every trial still RUNNING (in flight, sampled ahead, or
        caught half-handled by the interrupt) is marked interrupted and enqueued again for --resume."""
        _end_open_transactions(self.study)
        self._commit_deferred()
        self.in_flight.clear()
        self.recover_interrupted()
        self.rewrite_trials()
        # printed even with --quiet: the user needs it to continue
        print(f"interrupted; continue with: mergesearch run {self.spec.spec_path} --resume", file=sys.stderr)


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _graceful_ctrl_c():
    """The first Ctrl-C sets a flag the loop checks between steps; a second one interrupts at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals can only be handled in the main thread
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _end_open_transactions(study: optuna.Study) -> None:
    """A Ctrl-C that landed inside a database read leaves its transaction open, and SQLite then
    refuses every write ("database is locked"): roll it back before writing again."""
    backend = getattr(study._storage, "_backend", study._storage)
    scoped = getattr(backend, "scoped_session", None)
    if scoped is not None:
        try:
            scoped.remove()
        except Exception:
            pass


def run(spec: RunSpec, *, resume: bool = False, ray_address: str | None = None, quiet: bool = False) -> RunResult:
    return Driver(spec, resume=resume, ray_address=ray_address, quiet=quiet).run()


def _direction(d: str) -> optuna.study.StudyDirection:
    return optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x, default=str))


def _json(x: Any) -> str:
    import json

    return json.dumps(x, indent=2, default=str) + "\n"
