"""Time to the first result: where the seconds go from `mergesearch run` to the first trial scored.

    .venv/bin/python bench/bench_first_trial.py [--baselines] [--repeat 3] [--against-ray] [--ray-address auto]

Runs the demo's spec (runs/demo.yaml, the toy zoo in runs/zoo must exist: `mergesearch zoo
runs/zoo`) for 2 trials, in a fresh process each time (as a user's `mergesearch run` is),
and times its steps by wrapping them. Without --baselines the spec's baselines are off, which
is what issue 14 measured ("16 s to the first trial, 12.8 s before it is dispatched").

Prints one block per run. The timeline is seconds from the process's start (the interpreter's own
start-up included), the steps are their own durations; steps overlap (the fork server imports while
the driver imports and checks the spec), so durations do not add up to the timeline:

  python start            the interpreter and site-packages, before the driver's first line
  fork server started     local workers: the fork server begins its imports (torch, transformers'
                          model code, lm-eval: search/workers/local_workers.py), before the spec is read
  imports                 the driver's modules (Optuna, SQLAlchemy; not torch, lm-eval or Ray)
  check spec and models   prepare_run: space, model headers, objectives' specs
  load the study's code   Optuna's RDB storage modules, loaded while the workers start
  fork a worker           local workers: waits for the fork server's imports, then forks
  start Ray               Ray workers: connect_ray, once the spec and models are checked
  worker N: ...           inside each worker's __init__: its imports (none when forked), building
                          the objectives (lm-eval's tasks), building the requests, importing the
                          model code
  first trial             its build (materialize) and each stage's scoring, on the worker
  busy CPU                CPU seconds the whole machine spent busy, from the driver's first line to
                          the first trial told (/proc/stat)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: wraps the driver's steps with timers, then runs the spec.
CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
wall0 = time.time()
marks, steps = {"python start": wall0 - float(sys.argv[4])}, {}

def busy_cpu_s():  # CPU seconds every process on the machine has spent busy since boot (Linux)
    try:
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait

cpu0 = busy_cpu_s()

def at(label):
    marks.setdefault(label, time.perf_counter() - t0)

def timed(module, name, label):
    inner = getattr(module, name)
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            steps[label] = steps.get(label, 0.0) + time.perf_counter() - start
            at(label + " done")
    setattr(module, name, wrapper)

# as `mergesearch run` does (search/commands/run_command.py): the fork server (local workers), the spec, the driver
from search.workers.local_workers import runs_locally, start_fork_server
if runs_locally(sys.argv[5] or None):
    start_fork_server()
    at("fork server started (local workers)")
from search.spec.runspec import load_spec
spec = load_spec(sys.argv[1], {"trials": 2, "name": sys.argv[2], "baselines": sys.argv[3] == "on"})
at("spec read")
from search.run import baselines, driver, trial_loop
from search.workers import local_workers, ray_workers, worker_pool
at("imports done")
steps["imports"] = marks["imports done"]
timed(driver, "prepare_run", "check spec and models")
timed(driver, "load_rdb_code", "load the study's code")
timed(ray_workers, "connect_ray", "start Ray")
timed(local_workers.LocalWorkers, "spawn", "fork a worker (waits for the fork server's imports)")
original_start = worker_pool.WorkerPool.start
def start(self, *a, **k):
    original_start(self, *a, **k)
    at("workers ready")
    for slot in self.slots:
        s = dict(slot.info.get("startup_s") or {})
        began = s.pop("began", None)
        if began is not None:
            marks[f"{slot.name} began"] = began - wall0
        steps.update({f"{slot.name}: {k}": v for k, v in s.items()})
worker_pool.WorkerPool.start = start
original_record = baselines._record
def record(*a, **k):
    at("first result (a baseline)")
    return original_record(*a, **k)
baselines._record = record
original_finish = trial_loop.TrialLoop._finish
def finish(self, *a, **k):
    original_finish(self, *a, **k)
    if "first trial told" not in marks and cpu0 is not None:
        steps["busy CPU, all processes, to the first trial"] = busy_cpu_s() - cpu0
    at("first trial told")
trial_loop.TrialLoop._finish = finish
original_run = trial_loop.TrialLoop.run
def loop_run(self):
    at("loop starts")
    original_run(self)
trial_loop.TrialLoop.run = loop_run

driver.run(spec, quiet=True, ray_address=sys.argv[5] or None)
first = next((json.loads(line) for line in (spec.run_dir / "trials.jsonl").read_text().splitlines()
              if json.loads(line).get("trial") is not None and not json.loads(line).get("baseline")), {})
timings = first.get("timings") or {}
for key in ("materialize_s", "score_s"):
    for stage, value in enumerate(timings.get(key) or [], start=1):
        steps[f"first trial: {key.removesuffix('_s')} (stage {stage})"] = value
print(json.dumps({"timeline": marks, "steps": steps}))
"""


def one_run(baselines: bool, ray_address: str | None) -> dict:
    import yaml

    spec = yaml.safe_load((ROOT / "runs" / "demo.yaml").read_text())
    if not baselines:  # the enqueued recipes are baselines (not points of the demo's space): off with them
        spec.pop("enqueue", None)
    name = f"first-trial-{os.getpid()}"
    path = ROOT / "runs" / f".{name}.yaml"  # beside demo.yaml, so its relative paths hold
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.time()
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), name, "on" if baselines else "off",
                               repr(started), ray_address or ""], capture_output=True, text=True, env=env, cwd=ROOT)
    finally:
        path.unlink()
        shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(result: dict) -> str:
    timeline = sorted(result["timeline"].items(), key=lambda kv: kv[1])
    lines = ["  timeline: " + "  ".join(f"{k} {v:.2f}" for k, v in timeline)]
    lines.append("  steps:    " + "  ".join(f"{k} {v:.2f}" for k, v in result["steps"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", action="store_true", help="with the spec's baselines (default: off)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ray-address", help="workers as Ray actors: `local` starts a Ray in each run, an address (e.g. "
                    "auto, after `ray start --head`) joins that one; default: local worker processes")
    ap.add_argument("--against-ray", action="store_true",
                    help="each repeat also runs with a local Ray (--ray-address local), side by side")
    ap.add_argument("--json", type=Path, help="also write every run's timeline and steps here")
    args = ap.parse_args()
    if not (ROOT / "runs" / "zoo" / "zoo.json").is_file():
        raise SystemExit("bench_first_trial: build the zoo first: .venv/bin/mergesearch zoo runs/zoo")
    kinds = [args.ray_address] + (["local"] if args.against_ray else [])
    results: dict[str, list] = {kind or "local processes": [] for kind in kinds}
    for i in range(args.repeat):
        for kind in kinds:
            label = kind and f"Ray ({kind})" or "local processes"
            results.setdefault(label, []).append(one_run(args.baselines, kind))
            print(f"run {i + 1}, {label}:\n{show(results[label][-1])}", flush=True)
    results = {k: v for k, v in results.items() if v}
    for label, runs in results.items():
        first = sorted(r["timeline"]["first trial told"] for r in runs)
        print(f"{label}: first trial told (s): {', '.join(f'{v:.2f}' for v in first)}; quietest {first[0]:.2f}, "
              f"median {first[len(first) // 2]:.2f}")
    if len(results) == 2:
        (_, a), (_, b) = results.items()
        ratio = [x["timeline"]["first trial told"] / y["timeline"]["first trial told"] for x, y in zip(a, b)]
        print(f"local processes / Ray, repeat by repeat: {', '.join(f'{r:.2f}' for r in ratio)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
