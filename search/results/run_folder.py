"""A run folder read back: run.json and trials.jsonl, checked enough that everything in search/results
can read them as written. Nothing here reads the study: a finished run can be read anywhere, without
its storage's password."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search.engine.errors import UserError
from search.study import records

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")  # Optuna's, as trials.jsonl writes them


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run.json and trials.jsonl, checked enough that everything below can read them as written."""
    run_dir = Path(run_dir)
    meta_path, trials_path = run_dir / "run.json", run_dir / "trials.jsonl"
    if not meta_path.is_file() or not trials_path.is_file():
        raise UserError(
            f"{run_dir}: not a run folder (no run.json / trials.jsonl); give the folder `mergesearch run` wrote"
        )
    restore = "restore the file `mergesearch run` wrote (a --resume of the run writes it again)"
    try:
        meta = records.read_json(meta_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({getattr(e, 'msg', 'not UTF-8')}); {restore}") from None
    directions = meta.get("directions") if isinstance(meta, dict) else None
    if not (isinstance(directions, list) and directions and all(d in ("maximize", "minimize") for d in directions)):
        raise UserError(f"{meta_path}: no `directions` (maximize or minimize per objective); {restore}")
    try:
        recs = records.read_trials(trials_path)
    except (AttributeError, KeyError, TypeError, UnicodeDecodeError):  # a line that is JSON but not a record
        raise UserError(f"{trials_path}: a line is not a trial record; {restore}") from None
    for r in recs:
        if not (isinstance(r.get("trial"), int) or isinstance(r.get("baseline"), str)):
            raise UserError(f"{trials_path}: a line has no `trial` number; {restore}")
        if r.get("state") not in STATES:
            which = f"trial {r['trial']}" if r.get("trial") is not None else f"baseline {r['baseline']}"
            raise UserError(f"{trials_path}: {which} has no valid `state` ({', '.join(STATES)}); {restore}")
    return meta, recs
