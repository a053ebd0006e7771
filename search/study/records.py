"""Trial records: one JSON line per trial in trials.jsonl, and the run's run.json.

The study is the source of truth: every record is rebuilt from a trial's user
attributes, so trials.jsonl can always be written again from the study (after a
killed driver, its last line may be cut; --resume rewrites it whole).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import optuna

RECORD_ATTR = "record"  # per-trial user attr: recipe, stages, timings, worker, attempts
REASON_ATTR = "reason"  # per-trial user attr: why a trial failed or was pruned
INTERRUPTED = "interrupted"
HELDOUT_ATTR = "heldout"  # study user attr: {trial number: [held-out score per objective]}
# study user attr: {trial number: per-example held-out results of the first objective}, for the paired margin
HELDOUT_EXAMPLES_ATTR = "heldout_examples"
DUPLICATE_ATTR = "duplicate_of"  # per-trial user attr: the trial whose result this one took (same recipe)
BASELINE_ATTR = "baseline"  # per-trial user attr: the name of the baseline this trial is (search/run/baselines.py)
BASELINES_ATTR = "baselines"  # study user attr: {baseline name: its scores, recipe and trial number if any}


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(values: list[float] | None) -> list[float | None] | None:
    if values is None:
        return None
    return [v if math.isfinite(v) else None for v in values]


def is_interrupted(t: optuna.trial.FrozenTrial) -> bool:
    return t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get(REASON_ATTR) == INTERRUPTED


def is_baseline(t: optuna.trial.FrozenTrial) -> bool:
    return BASELINE_ATTR in t.user_attrs


def is_search_trial(t: optuna.trial.FrozenTrial) -> bool:
    """A trial the search proposed and built: not a baseline, not a duplicate taking another's result."""
    return not is_baseline(t) and DUPLICATE_ATTR not in t.user_attrs


def trial_record(t: optuna.trial.FrozenTrial, heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = t.user_attrs.get(RECORD_ATTR, {})
    return {
        "trial": t.number,
        "baseline": t.user_attrs.get(BASELINE_ATTR),
        "duplicate_of": t.user_attrs.get(DUPLICATE_ATTR),
        "state": t.state.name,
        "values": _finite(t.values),
        "heldout": (heldout or {}).get(str(t.number)),
        "params": t.params,
        **_work(rec),
        "reason": t.user_attrs.get(REASON_ATTR),
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
    }


def baseline_record(name: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The line of a baseline that is no trial of the study (BASELINES_ATTR's entry), with a trial's fields."""
    timings = rec.get("timings", {})
    return {
        "trial": None,
        "baseline": name,
        "duplicate_of": None,
        "state": "COMPLETE",
        "values": _finite(rec.get("values")),
        "heldout": rec.get("heldout"),
        "params": {},
        **_work(rec),
        "reason": None,
        "started": _iso(timings.get("dispatched")),
        "finished": _iso(timings.get("finished")),
    }


def _work(rec: dict[str, Any]) -> dict[str, Any]:
    """What the workers did for a trial or a baseline (search/run/work.py), from its record."""
    return {
        "recipe": rec.get("recipe"),
        "stages": rec.get("stages", []),
        "worker": rec.get("worker"),
        "workers": rec.get("workers", []),  # one per attempt, when a dead worker's trial was retried
        "node": rec.get("node"),
        "sources": rec.get("sources"),  # how the worker kept the source models: resident, shared-mmap or streamed
        "sources_plan": rec.get("sources_plan"),  # the worker's memory plan, when this recipe raised it
        "attempts": rec.get("attempts", 0),
        "timings": rec.get("timings", {}),
    }


def _iso(timestamp: float | None) -> str | None:
    """A wall-clock time as trial_record writes the study's (local time, ISO 8601)."""
    return datetime.fromtimestamp(timestamp).isoformat() if timestamp is not None else None


def to_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=False) + "\n"


def write_trials(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(to_line(r) for r in records))


def append_trial(path: Path, record: dict[str, Any]) -> None:
    # One write of one whole line; the file is rewritten whole (atomically) at the end of a run.
    with open(path, "a") as f:
        f.write(to_line(record))


def read_trials(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed driver; the study still has the trial
    # a later line for the same trial (a rewrite) wins
    return list({(r.get("trial"), r.get("baseline")): r for r in out}.values())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
