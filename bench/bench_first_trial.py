"""Time to the first result: where the seconds go from `mergesearch run` to the first trial scored.

    .venv/bin/python bench/bench_first_trial.py [--baselines] [--repeat 2]

Runs the demo's spec (runs/demo.yaml, the toy zoo in runs/zoo must exist: `mergesearch zoo
runs/zoo`) for 2 trials, in a fresh process each time (as a user's `mergesearch run` is),
and times the steps the driver goes through, by wrapping them: checking the spec and the
models (prepare_run), starting Ray, starting the workers (each loads its models and builds
its objectives; the call returns when every worker has), scoring the baselines, and then
the first trial from ask to told. Without --baselines the spec's baselines are off, which
is what issue 14 measured ("16 s to the first trial, 12.8 s before it is dispatched").

Prints one line per run: the seconds of each step and the total to the first trial told.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: wraps the driver's steps with timers, then runs the spec.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
marks = {}

def timed(module, name, label):
    inner = getattr(module, name)
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            marks[label] = marks.get(label, 0.0) + time.perf_counter() - start
    setattr(module, name, wrapper)

from search import driver, worker_pool, trial_loop
from search.runspec import load_spec
marks["imports"] = time.perf_counter() - t0
timed(driver, "prepare_run", "check spec and models")
timed(worker_pool, "connect_ray", "start Ray")
timed(driver, "score_baselines", "baselines")
original_start = worker_pool.WorkerPool.start
def start(self):
    s = time.perf_counter()
    original_start(self)
    marks["start workers (models, objectives)"] = time.perf_counter() - s - marks.get("start Ray", 0.0)
worker_pool.WorkerPool.start = start
original_finish = trial_loop.TrialLoop._finish
def finish(self, *a, **k):
    original_finish(self, *a, **k)
    marks.setdefault("first trial told, from the start", time.perf_counter() - t0)
trial_loop.TrialLoop._finish = finish
original_run = trial_loop.TrialLoop.run
def loop_run(self):
    marks["loop starts, from the start"] = time.perf_counter() - t0
    original_run(self)
trial_loop.TrialLoop.run = loop_run

spec = load_spec(sys.argv[1], {"trials": 2, "name": sys.argv[2], "baselines": sys.argv[3] == "on"})
driver.run(spec, quiet=True)
print(json.dumps(marks))
"""


def one_run(baselines: bool) -> dict:
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        spec = Path(tmp) / "first.yaml"
        # the enqueued recipes are baselines only (not points of the demo's space): off with the baselines
        enqueue = f"enqueue: [{ROOT / 'runs' / 'ties-4.yml'}, {ROOT / 'runs' / 'average-4.yml'}]" if baselines else ""
        spec.write_text((ROOT / "runs" / "demo.yaml").read_text().replace("zoo/", str(ROOT / "runs" / "zoo") + "/")
                        .replace("enqueue: [ties-4.yml, average-4.yml]", enqueue))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", CHILD, str(spec), "first", "on" if baselines else "off"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", action="store_true", help="with the spec's baselines (default: off)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if not (ROOT / "runs" / "zoo" / "zoo.json").is_file():
        raise SystemExit("bench_first_trial: build the zoo first: .venv/bin/mergesearch zoo runs/zoo")
    for _ in range(args.repeat):
        marks = one_run(args.baselines)
        print("  ".join(f"{k}: {v:.2f} s" for k, v in marks.items()), flush=True)


if __name__ == "__main__":
    main()
