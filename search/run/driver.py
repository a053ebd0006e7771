"""The search driver: one run from spec to winners.

    setup = prepare_run(spec)        search/run/run_setup.py   every input checked, model headers too; nothing written yet
    pool.start()                     search/workers/worker_pool.py workers holding the models (local processes or Ray actors)
    study = open_study(setup)        search/run/run_setup.py   the Optuna study, run.json (resumed: before the workers)
    score_baselines(...)             search/run/baselines.py   the hand-written merges, all before the search, outside the budget
    TrialLoop(...).run()             search/run/trial_loop.py  ask, build and score on a free worker, tell
    run_heldout(...)                 search/run/heldout.py     the top trials on the split the search never saw
    export.write_run_outputs(...)    search/results/export.py      best.yaml (or pareto/), trials.jsonl, summary
    write_report(...)                search/results/report.py      report/: plots and report.html

Ctrl-C or a killed driver leaves trials RUNNING in the study; --resume marks them
FAIL ("interrupted") and enqueues their parameters again, so each re-runs, and the
budget counts the trials that finished. A --resume with nothing left to run writes
the outputs without starting a worker. A run whose every trial failed says why in
RunResult.failure (the command exits 1).
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.results import export, summary, winner

from search.study import records
from search.run.baselines import baseline_records, score_baselines
from search.run.heldout import heldout_candidates, run_heldout
from search.run.interrupts import end_open_transactions
from search.run.progress import Progress
from search.results.report import write_report
from search.engine.errors import UserError
from search.run.run_setup import RunSetup, learn_from_workers, open_study, prepare_run, recover_interrupted, to_json
from search.spec.runspec import RunSpec
from search.study.storage import load_rdb_code
from search.study.trial_counts import study_counts
from search.run.trial_loop import TrialLoop
from search.results.verdict import winner_vs_baselines
from search.workers.worker_pool import WorkerCrashLoop, WorkerPool


@dataclass
class RunResult:
    run_dir: Path
    study_name: str
    storage: str  # masked
    counts: dict[str, int]
    best: dict | None
    utilization: dict
    failure: str | None = None  # every trial failed: how many and the most common reason


def run(spec: RunSpec, *, resume: bool = False, ray_address: str | None = None, quiet: bool = False) -> RunResult:
    # every input is checked (0.1 s) before any worker starts: a bad one is one line, and nothing was started for it
    setup = prepare_run(spec, resume)
    progress = Progress(spec.name, spec.trials, spec.timeout, quiet=quiet)
    # the workers come before a new study, so a cluster that does not answer (or an objective only a worker
    # can check) leaves nothing behind; a resumed study is opened first, as a --resume with nothing left to
    # run writes the outputs without workers
    study = open_study(setup, resume) if resume else None
    util = None
    if study is None or work_left(study, setup):
        study, util = search(setup, study, ray_address, progress)
    return finish(setup, study, util, progress, quiet)


def work_left(study: optuna.Study, setup: RunSetup) -> bool:
    """Trials within the budget, baselines or held-out re-scores not done yet: work for the workers."""
    spec, counts = setup.spec, study_counts(study, setup.multi)
    if spec.trials is None or counts.complete + counts.pruned + counts.failed < spec.trials:
        return True  # a time budget starts again on each resume
    if any(b.name not in study.user_attrs.get(records.BASELINES_ATTR, {}) for b in setup.baselines):
        return True
    done = study.user_attrs.get(records.HELDOUT_ATTR, {})
    candidates = heldout_candidates(study, spec.heldout_top_k, setup.has_heldout, setup.directions)
    return any(str(t.number) not in done for t in candidates)


def search(setup: RunSetup, study: optuna.Study | None, ray_address: str | None, progress: Progress):
    """Start the workers, open the study (unless resumed), score the baselines, run the trial loop and the
    held-out re-scores; (study, utilization)."""
    spec = setup.spec
    pool = WorkerPool(spec, ray_address, setup.send_examples)
    try:
        progress.message(f"{spec.name}: starting {spec.workers} worker(s) on {pool.where}; "
                         f"study in {setup.storage_shown}")
        # one line per worker: its node, device and sources mode; the study's code loaded while they start
        pool.start(progress.message, meanwhile=lambda: load_rdb_code(setup.storage_url))
        learn_from_workers(setup, pool.slots[0].info)
        resume = study is not None
        if study is None:
            study = open_study(setup, resume=False)
        rewrite_trials(study, spec.run_dir)
        # the workers' busy time is measured over one span, from the first call they get to the last answer
        span_start = time.monotonic()
        # every baseline before the first trial: those that are points of the space join the study, which the
        # sampler must see from its first proposal on; all of them are what the search has to beat
        baselines_pending(study, setup, pool, progress)
        loop = TrialLoop(setup, study, pool, progress)
        with progress:
            progress.update(study_counts(study, setup.multi), f"resumed {study.study_name}" if resume else "started")
            try:
                loop.run()
            except KeyboardInterrupt:
                interrupt(loop)
                raise
            except WorkerCrashLoop as e:
                interrupt(loop, announce=False)
                raise UserError(f"{e}; fix the cause, then continue with: mergesearch run {spec.spec_path} --resume"
                                ) from None
        candidates = heldout_candidates(study, spec.heldout_top_k, setup.has_heldout, setup.directions)
        if candidates:
            progress.message(f"re-scoring the top {len(candidates)} on the held-out split")
        run_heldout(study, candidates, pool, len(setup.objective_names), progress.message, spec.trial_timeout)
        util = pool.utilization(time.monotonic() - span_start)
    finally:
        pool.stop()
    return study, util


def baselines_pending(study: optuna.Study, setup: RunSetup, pool: WorkerPool, progress: Progress) -> None:
    """Score the baselines not scored yet (an earlier session may have), saying in one line how many."""
    scored = study.user_attrs.get(records.BASELINES_ATTR, {})
    todo = [b.name for b in setup.baselines if b.name not in scored]
    if todo:
        progress.message(baselines_line(todo, len(setup.baselines)))
        score_baselines(study, setup, pool, progress.message)


def baselines_line(todo: list[str], total: int) -> str:
    """'scoring 6 baselines before the search: base alone, ...' (those left of them, on a resume)."""
    count = f"{len(todo)} baseline{'s' if len(todo) != 1 else ''}" + (f" (of {total})" if len(todo) != total else "")
    return f"scoring {count} before the search: {', '.join(todo)}"


def finish(setup: RunSetup, study: optuna.Study, util: dict | None, progress: Progress, quiet: bool) -> RunResult:
    """trials.jsonl, run.json, best.yaml (or pareto/), the report and the summary, from the study."""
    spec = setup.spec
    recs = rewrite_trials(study, spec.run_dir)
    baselines = study.user_attrs.get(records.BASELINES_ATTR, {})
    meta = records.read_json(spec.run_dir / "run.json")
    if util is not None:  # else no worker ran this time: the last session's figures stay
        meta["utilization"] = util
    meta["baselines"] = {n: {k: b[k] for k in ("trial", "values", "heldout")} for n, b in baselines.items()}
    meta["verdict"] = winner_vs_baselines(recs, setup.directions, baselines,
                                          study.user_attrs.get(records.HELDOUT_EXAMPLES_ATTR, {}))
    counts = study_counts(study, setup.multi)
    name_the_winner(study, setup, recs, meta, counts)
    records.write_atomic(spec.run_dir / "run.json", to_json(meta))
    written = export.write_run_outputs(spec.run_dir)
    write_report(spec.run_dir)  # plots and report.html in <run>/report/, before the summary lists them
    if not quiet:
        summary.render(spec.run_dir, console=summary.stdout_console())  # on stdout; the progress went to stderr
    return RunResult(
        run_dir=spec.run_dir,
        study_name=spec.name,
        storage=setup.storage_shown,
        counts={"complete": counts.complete, "pruned": counts.pruned, "failed": counts.failed},
        best=written.get("best"),
        utilization=meta.get("utilization", {}),
        failure=every_trial_failed(study, counts),
    )


def name_the_winner(study: optuna.Study, setup: RunSetup, recs: list[dict], meta: dict, counts) -> None:
    """The winner (best held-out among the top by search score: what export writes) and the best
    search score are two names, kept apart in run.json and on the study, where the dashboard shows them."""
    meta["best_search_score"] = {"trial": counts.best_trial, "values": counts.best}
    best = winner.winner(recs, setup.directions)
    meta["winner"] = best["trial"] if best else None
    for key in ("winner", "best_search_score"):
        study.set_user_attr(key, meta[key])


def every_trial_failed(study: optuna.Study, counts) -> str | None:
    """When no trial completed or was pruned and some failed: how many, and the most common reason."""
    if counts.complete or counts.pruned or not counts.failed:
        return None
    reasons = collections.Counter(
        t.user_attrs.get(records.REASON_ATTR) or "no reason recorded"
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if not records.is_interrupted(t) and records.is_search_trial(t)
    )
    reason, n = reasons.most_common(1)[0]
    return f"every trial failed ({counts.failed}); the most common reason ({n} of them): {reason}"


def interrupt(loop: TrialLoop, announce: bool = True) -> None:
    """Ctrl-C (or a run stopped by its workers): finished trials are told; every trial still RUNNING
    (in flight, sampled ahead, or caught half-handled by the interrupt) is marked interrupted and
    enqueued again for --resume."""
    end_open_transactions(loop.study)
    loop.commit_deferred(all_of_them=True)
    loop.in_flight.clear()
    recover_interrupted(loop.study)
    rewrite_trials(loop.study, loop.spec.run_dir)
    if announce:  # printed even with --quiet: the user needs it to continue
        print(f"interrupted; continue with: mergesearch run {loop.spec.spec_path} --resume", file=sys.stderr)


def rewrite_trials(study, run_dir: Path) -> list[dict]:
    """trials.jsonl written whole from the study, the source of truth; its records."""
    heldout = study.user_attrs.get(records.HELDOUT_ATTR, {})
    recs = [records.trial_record(t, heldout) for t in study.get_trials(deepcopy=False)] + baseline_records(study)
    records.write_trials(run_dir / "trials.jsonl", recs)
    return recs
