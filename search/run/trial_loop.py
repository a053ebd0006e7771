"""The ask/tell loop: Optuna asks a trial, the space makes it a recipe, a free worker builds and scores it.

The loop is the only writer of the study. Dispatch is asynchronous (the pool waits on
whatever is in flight): a worker that frees up gets the next piece of work at
once, with no generation barrier. A trial with stages makes one round trip per
stage (search/run/stages.py); after each but the last the pruner may stop it.

Faults: a worker that dies is replaced and its trial retried once, then recorded
FAIL with the reason (a slot whose actors keep dying stops the run, see
search/workers/worker_pool.py); an exception while building or scoring fails only that
trial; a trial still on its worker after the spec's `trial_timeout` is recorded
FAIL ("timed out after N s") and its worker killed and replaced. Once the time
budget is spent no trial starts: a retry or a trial sampled ahead is left,
interrupted and enqueued again, for --resume, so the run ends at most
`trial_timeout` late.

Reproducible: trials are asked and told on the schedule of search/run/schedule.py, and the
pruner judges a trial on what that schedule lets it see (search/study/study_view.py), so a
spec, a seed and a worker count give the same trials whichever worker is faster.
Otherwise a trial's end is written to the study while the workers compute (deferred
to the next turn of the loop), so the storage write is off the critical path.

No wasted work: a trial whose recipe was scored already takes that result instead of
being built (search/run/scored_recipes.py); a space that keeps proposing only old recipes
has run out of new points, and the run ends saying so.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.study import records
from search.engine import recipe as recipes
from search.engine.errors import UserError
from search.run.interrupts import StopFlag, graceful_ctrl_c
from search.run.progress import Progress
from search.run.run_setup import RunSetup, requeue
from search.run.schedule import Schedule
from search.run.scored_recipes import ScoredRecipes
from search.run.work import Work
from search.study.study_view import StudyView
from search.study.trial_counts import TrialCounts
from search.workers.worker_faults import CallFailed, WorkerDied
from search.workers.worker_pool import Slot, WorkerCrashLoop, WorkerPool

MAX_ATTEMPTS = 2  # a trial whose worker dies is run once more, then failed
MAX_SUGGEST_FAILURES_IN_A_ROW = 20  # the space raises on every trial: a bug, not bad luck


@dataclass
class TrialRun(Work):
    trial: optuna.Trial
    recipe_yaml: str
    seq: int = 0  # the order this session asked it in: what the reproducible schedule counts
    duplicate_of: int | None = None
    stage: int = 0  # index of the stage in flight
    stages: list[dict] = field(default_factory=list)  # {"step": ..., "scores": {name: value}}
    reported: set = field(default_factory=set)

    @property
    def number(self) -> int:
        return self.trial.number

    def record(self, worker: Slot | None) -> dict:
        """What trials.jsonl keeps of it beyond the study's own fields (the RECORD_ATTR user attribute)."""
        return {"recipe": self.recipe_yaml or None, "stages": self.stages, **super().record(worker)}


class TrialLoop:
    def __init__(self, setup: RunSetup, study: optuna.Study, pool: WorkerPool, progress: Progress):
        self.setup, self.study, self.pool, self.progress = setup, study, pool, progress
        self.spec, self.stages = setup.spec, setup.stages
        self.trials_path: Path = setup.spec.run_dir / "trials.jsonl"
        self.active = 0  # trials asked and not yet told (in flight, prepared, waiting for a retry or a commit)
        # counted once here, then one told trial at a time (search/study/trial_counts.py)
        self.counts = TrialCounts.of(study.get_trials(deepcopy=False), list(study.directions))
        self.finished = self.counts.done
        self.finished_this_session = 0
        self.retry: collections.deque[TrialRun] = collections.deque()
        self.prepared: TrialRun | None = None
        self.deferred: list[tuple[TrialRun, TrialState, dict]] = []
        self.in_flight: dict[Any, tuple[Slot, TrialRun, str]] = {}
        self.suggest_failures = 0
        self.loop_start = self.loop_end = time.monotonic()
        # the reproducible schedule (module docstring)
        self.schedule = Schedule(lag=self.spec.workers)  # search/run/schedule.py
        self.scored = ScoredRecipes(study)  # no recipe built twice (search/run/scored_recipes.py)

    # ---- budget

    def may_start_trial(self) -> bool:
        if self.scored.spent:
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.spec.trials is not None and self.finished + self.active >= self.spec.trials:
            return False
        return True

    def may_ask(self) -> bool:
        """The next trial (seq s) may be asked once every trial asked before s - K has its outcome."""
        return self.may_start_trial() and self.schedule.may_ask()

    # ---- the loop

    def run(self) -> None:
        self.deadline = time.monotonic() + self.spec.timeout if self.spec.timeout else None
        free = collections.deque(self.pool.slots)
        self.loop_start = time.monotonic()
        for slot in self.pool.slots:
            slot.free_since = self.loop_start
        with graceful_ctrl_c() as stop:
            self._loop(free, stop)
        self.loop_end = time.monotonic()

    def _loop(self, free: collections.deque, stop: StopFlag) -> None:
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
            self.commit_deferred()
            # 3. and the next trial sampled ahead, so the next worker to free up need not wait for the sampler
            if self.in_flight and self.prepared is None and self.may_ask():
                self.prepared = self._new_trial()
            if not self.in_flight:
                if not self.pool.live():
                    # stopped as a crash loop is: finished trials told, the rest left for --resume
                    raise WorkerCrashLoop(f"no worker left: {self.pool.last_death}")
                self.commit_deferred(all_of_them=True)
                break  # nothing running and nothing left to start
            ready = self.pool.wait(list(self.in_flight), timeout=0.5)
            for ref in ready:
                slot, run, _ = self.in_flight.pop(ref)
                now = time.monotonic()
                if self._handle_result(slot, run, ref):
                    continue  # the same worker goes on with the next stage
                slot.free_since = now
                if not slot.retired:
                    free.append(slot)
            self._stop_hung(free)

    def _handle_result(self, slot: Slot, run: TrialRun, ref) -> bool:
        """One finished call; True if its worker was sent on to the next stage of the same trial."""
        try:
            result = self.pool.get(ref)
        except WorkerDied as e:
            self._worker_died(slot, run, e)
        except CallFailed as e:  # the call itself raised: fail the trial, keep the worker
            slot.deaths_in_a_row = 0
            self._defer(run, TrialState.FAIL, reason=e.reason, worker=slot)
        else:
            slot.busy_s += result["busy_s"]
            slot.calls += 1
            slot.deaths_in_a_row = 0
            return self._stage_done(slot, run, result)
        return False

    def _stop_hung(self, free: collections.deque) -> None:
        """Trials on their worker longer than trial_timeout: FAIL, and the worker killed and replaced."""
        limit = self.spec.trial_timeout
        now = time.monotonic()
        for ref, (slot, run, _) in list(self.in_flight.items()):
            if limit is None or now - run.started < limit:
                continue
            del self.in_flight[ref]
            self.pool.replace(slot)  # the only way to stop a call a worker is running
            self._defer(run, TrialState.FAIL, reason=f"timed out after {limit:g} s", worker=slot)
            slot.free_since = now
            if not slot.retired:  # retired: no node left had room for its replacement
                free.append(slot)

    def _next_run(self) -> TrialRun | None:
        """Work for a free worker: a retry, the trial sampled ahead, or a new one; None when the budget is spent."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._leave_for_resume()
            return None
        if self.retry:
            return self.retry.popleft()
        if self.prepared is not None:
            run, self.prepared = self.prepared, None
            return run
        while self.may_ask():
            run = self._new_trial()
            if run is not None:
                return run  # else: pruned by a constraint, failed to suggest, or a duplicate; ask again
        return None

    def _leave_for_resume(self) -> None:
        """Time is up: trials asked but not on a worker (retries, the one sampled ahead) are marked
        interrupted and enqueued again, as a Ctrl-C would leave them, instead of starting late."""
        waiting = [*self.retry, *([self.prepared] if self.prepared else [])]
        self.retry.clear()
        self.prepared = None
        for run in waiting:
            self.active -= 1
            self.schedule.settled(run.seq)
            requeue(self.study, self.study._storage.get_trial(run.trial._trial_id))

    def _new_trial(self) -> TrialRun | None:
        self.commit_deferred()  # every trial asked before seq - K is told before the sampler looks
        trial = self.study.ask()
        seq = self.schedule.ask(trial.number)
        try:
            recipe = self.setup.space.suggest(trial)
            yaml_text = recipes.dump_stages(recipes.as_stages(recipe))
        except optuna.TrialPruned as e:  # a constraint rejected it: never built
            self.active += 1
            self.suggest_failures = 0
            self._finish(TrialRun(trial, "", seq), TrialState.PRUNED, reason=str(e) or "rejected by a constraint")
            return None
        except Exception as e:
            self.active += 1
            self.suggest_failures += 1
            reason = f"space failed to suggest: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._finish(TrialRun(trial, "", seq), TrialState.FAIL, reason=reason)
            if self.suggest_failures >= MAX_SUGGEST_FAILURES_IN_A_ROW:
                raise UserError(f"space: {self.suggest_failures} trials in a row failed to suggest; last: {reason}")
            return None
        self.suggest_failures = 0
        run = TrialRun(trial, yaml_text, seq)
        self.schedule.started(seq)
        outcome = self.scored.check(run)
        if run.duplicate_of is None:
            self.active += 1
            return run
        if outcome is not None:
            self._take(run, outcome)
        if self.scored.spent:
            self.progress.message(f"the space has run out of new points: the last {self.scored.in_a_row} trials "
                                  f"repeated recipes already scored ({len(self.scored.first_with)} distinct); "
                                  "the run ends here")
        return None  # a duplicate is never built: ask again

    def _take(self, run: TrialRun, outcome) -> None:
        state, told, stages = outcome
        run.stages = [dict(s) for s in stages]
        self._defer(run, state, **told)

    def _dispatch(self, slot: Slot, run: TrialRun, kind: str) -> None:
        now = time.monotonic()
        if slot.free_since is not None:
            slot.idle_gaps.append(now - slot.free_since)
            slot.free_since = None
        if kind == "begin":
            run.attempt(slot.name)
            run.stage = 0
            ref = self.pool.call(slot, "begin", run.number, run.recipe_yaml, self.stages[0].jobs)
        else:
            last = run.stage == len(self.stages) - 1
            ref = self.pool.call(slot, "advance", run.number, self.stages[run.stage].jobs, last)
        self.in_flight[ref] = (slot, run, kind)

    def _stage_done(self, slot: Slot, run: TrialRun, result: dict) -> bool:
        """Handle one stage's result; True if the same worker was sent on to the next stage."""
        run.took(result)
        if not result["ok"]:
            self._defer(run, TrialState.FAIL, reason=result["error"], worker=slot)
            return False
        stage = self.stages[run.stage]
        scores = {self.setup.objective_names[i]: v for (i, _), v in zip(stage.jobs, result["scores"])}
        run.stages.append({"step": stage.step, "scores": scores})
        bad = [n for n, v in scores.items() if not math.isfinite(v)]
        if bad:
            self._defer(run, TrialState.FAIL, reason=f"objective {bad[0]} returned {scores[bad[0]]}", worker=slot)
            return False
        if result.get("examples") is not None:
            self.setup.pruner.record(run.number, result["examples"])
        if run.stage == len(self.stages) - 1:
            self._defer(run, TrialState.COMPLETE, values=self._final_values(run), worker=slot)
            return False
        if stage.step is not None and stage.step not in run.reported:
            run.trial.report(result["scores"][0], stage.step)
            run.reported.add(stage.step)
        if self._should_prune(run):
            self.pool.call(slot, "release")
            self._defer(run, TrialState.PRUNED, reason=f"pruned after stage {stage.step}", worker=slot)
            return False
        run.stage += 1
        self._dispatch(slot, run, "advance")
        return True

    def _should_prune(self, run: TrialRun) -> bool:
        """The pruner's call on the trials told before this one was asked (those asked before seq - K),
        so it does not depend on which worker was faster. Enqueued recipes are never pruned."""
        if "enqueued" in run.trial.user_attrs:
            return False
        frozen = self.study._storage.get_trial(run.trial._trial_id)
        view = StudyView(self.study, self.schedule.told_before(run.number, run.seq))
        return self.setup.pruner.prune(view, frozen)

    def _final_values(self, run: TrialRun) -> list[float]:
        latest: dict[str, float] = {}
        for s in run.stages:
            latest.update(s["scores"])
        return [latest[n] for n in self.setup.objective_names]

    def _worker_died(self, slot: Slot, run: TrialRun, e: WorkerDied) -> None:
        reason = self.pool.worker_died(slot, e)
        run.timings.setdefault("deaths", []).append(reason)
        if slot.retired:
            self.progress.message(f"worker {slot.name}: {reason}; {slot.retired_why}")
        if run.attempts < MAX_ATTEMPTS:
            run.stages.clear()  # a retry starts from the first stage; reported steps stay reported
            self.retry.append(run)
        else:
            self._defer(run, TrialState.FAIL, reason=f"{reason} (after {run.attempts} attempts)", worker=slot)

    # ---- telling the study

    def _defer(self, run: TrialRun, state: TrialState, **kwargs) -> None:
        """The trial's outcome is known; it is told once the schedule allows (commit_deferred)."""
        self.deferred.append((run, state, kwargs))
        self.schedule.settled(run.seq)
        if run.duplicate_of is not None:
            return
        copies, rebuild = self.scored.settled(run, state, {k: v for k, v in kwargs.items() if k != "worker"})
        for duplicate in copies:
            self._take(duplicate, self.scored.outcomes[run.number])
        for duplicate in rebuild:  # its original failed: built after all
            self.active += 1
            self.retry.append(duplicate)

    def commit_deferred(self, all_of_them: bool = False) -> None:
        """Tell the trials whose outcome is known and whose seq is below asked - K (every one once no more
        trials will be asked): a later trial's result is held back until the sampler may see it."""
        last_ask = all_of_them or not self.may_start_trial()
        keep = []
        for run, state, kwargs in self.deferred:
            if last_ask or self.schedule.may_tell(run.seq):
                self._finish(run, state, **kwargs)
            else:
                keep.append((run, state, kwargs))
        self.deferred = keep

    def _finish(self, run: TrialRun, state: TrialState, *, values=None, reason=None, worker: Slot | None = None):
        if run.duplicate_of is None:
            self.active -= 1
            self.finished += 1
        if worker is not None:
            worker.trials += 1
        run.finished()
        run.trial.set_user_attr(records.RECORD_ATTR, run.record(worker))
        if reason:
            run.trial.set_user_attr(records.REASON_ATTR, reason)
        if run.duplicate_of is not None:
            run.trial.set_user_attr(records.DUPLICATE_ATTR, run.duplicate_of)
            # the steps the original reported (all but a complete trial's last), so samplers and pruners read it alike
            for s in run.stages[:-1] if state == TrialState.COMPLETE else run.stages:
                if s["step"] is not None:
                    run.trial.report(s["scores"][self.setup.objective_names[0]], s["step"])
        if state == TrialState.COMPLETE:
            frozen = self.study.tell(run.trial, values if self.setup.multi else values[0])
        else:
            frozen = self.study.tell(run.trial, state=state)
        records.append_trial(self.trials_path, records.trial_record(frozen))
        self.finished_this_session += 1
        self.counts.add(frozen)
        counts = self.counts.counts(running=self.active)
        counts.finished_this_session = self.finished_this_session
        self.progress.trial_finished(counts, frozen, reason)
