"""The search driver: one run from spec to winners.

    setup = prepare_run(spec)        search/run_setup.py   every input checked; nothing written yet
    study = open_study(setup)        search/run_setup.py   the Optuna study (or the one resumed), run.json
    pool.start()                     search/worker_pool.py Ray actors holding the source models
    TrialLoop(...).run()             search/trial_loop.py  ask, build and score on a free worker, tell
    run_heldout(...)                 search/heldout.py     the top trials on the split the search never saw
    export.write_run_outputs(...)    search/export.py      best.yaml (or pareto/), trials.jsonl, summary

Ctrl-C or a killed driver leaves trials RUNNING in the study; --resume marks them
FAIL ("interrupted") and enqueues their parameters again, so each re-runs, and the
budget counts the trials that finished.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from search import export, records
from search.heldout import heldout_candidates, run_heldout
from search.interrupts import end_open_transactions
from search.progress import Progress
from search.run_setup import open_study, prepare_run, recover_interrupted, to_json
from search.runspec import RunSpec
from search.trial_loop import TrialLoop, study_counts
from search.worker_pool import WorkerPool


@dataclass
class RunResult:
    run_dir: Path
    study_name: str
    storage: str  # masked
    counts: dict[str, int]
    best: dict | None
    utilization: dict


def run(spec: RunSpec, *, resume: bool = False, ray_address: str | None = None, quiet: bool = False) -> RunResult:
    setup = prepare_run(spec, resume)
    study = open_study(setup, resume)
    rewrite_trials(study, spec.run_dir)
    progress = Progress(spec.name, spec.trials, spec.timeout, quiet=quiet)
    pool = WorkerPool(spec, ray_address, setup.send_examples)
    try:
        where = f"Ray at {ray_address}" if ray_address else "local Ray"
        progress.message(f"{spec.name}: starting {spec.workers} worker(s) on {where}; study in {setup.storage_shown}")
        pool.start()
        loop = TrialLoop(setup, study, pool, progress)
        with progress:
            progress.update(study_counts(study, setup.multi), f"resumed {study.study_name}" if resume else "started")
            try:
                loop.run()
            except KeyboardInterrupt:
                interrupt(loop)
                raise
        util = pool.utilization(loop.loop_end - loop.loop_start)
        candidates = heldout_candidates(study, spec.heldout_top_k, setup.has_heldout, setup.directions)
        if candidates:
            progress.message(f"re-scoring the top {len(candidates)} on the held-out split")
        run_heldout(study, candidates, pool, len(setup.objective_names), progress.message)
    finally:
        pool.stop()
    rewrite_trials(study, spec.run_dir)
    meta = records.read_json(spec.run_dir / "run.json")
    meta["utilization"] = util
    records.write_atomic(spec.run_dir / "run.json", to_json(meta))
    written = export.write_run_outputs(spec.run_dir)
    counts = study_counts(study, setup.multi)
    if not quiet:
        export.print_summary(spec.run_dir, console=progress.console)
    return RunResult(
        run_dir=spec.run_dir,
        study_name=spec.name,
        storage=setup.storage_shown,
        counts={"complete": counts.complete, "pruned": counts.pruned, "failed": counts.failed},
        best=written.get("best"),
        utilization=util,
    )


def interrupt(loop: TrialLoop) -> None:
    """Ctrl-C: finished trials are told; every trial still RUNNING (in flight, sampled ahead, or
    caught half-handled by the interrupt) is marked interrupted and enqueued again for --resume."""
    end_open_transactions(loop.study)
    loop.commit_deferred()
    loop.in_flight.clear()
    recover_interrupted(loop.study)
    rewrite_trials(loop.study, loop.spec.run_dir)
    # printed even with --quiet: the user needs it to continue
    print(f"interrupted; continue with: mergesearch run {loop.spec.spec_path} --resume", file=sys.stderr)


def rewrite_trials(study, run_dir: Path) -> None:
    """trials.jsonl written whole from the study, the source of truth."""
    heldout = study.user_attrs.get(records.HELDOUT_ATTR, {})
    recs = [records.trial_record(t, heldout) for t in study.get_trials(deepcopy=False)]
    records.write_trials(run_dir / "trials.jsonl", recs)
