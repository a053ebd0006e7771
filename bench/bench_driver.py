"""Driver benchmark: where the driver's time per trial goes, and how it holds up as a study grows.

    .venv/bin/python bench/bench_driver.py [--trials 300] [--scale-trials 5000] [--workers 64] [--write]

Utilization (`--trials`): a real run (search/run/driver.py:run) with 2 real workers on local Ray,
the slerp-curve space on tiny stand-in models and a cheap objective (one forward pass of 48
tokens: the build is most of a trial's time), SQLite storage in the run folder. Busy fraction = the workers' own busy time
over the search loop's wall time, for the default sampler (multivariate TPE) and for random.

Scale (`--scale-trials`, `--workers`): the real trial loop (search/run/trial_loop.py, the real
space, sampler, study on SQLite, trials.jsonl and progress) against a pool of stand-in Ray
actors, one per worker, that answer `begin` / `advance` at once with a score hashed from
the recipe. Nothing but the driver and Ray's round trips is measured: trials/s per
500-trial window as the study grows, and per-phase driver seconds per trial (each phase
timed around the calls named in PHASES; "other" is the rest of the loop's wall time).
A staged variant (`--staged SAMPLER`) adds two fidelity stages and the paired pruner.

--write replaces the "## Driver: time per trial and scale" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import optuna  # noqa: E402

from bench_search import SLERP_SPACE, write_section, write_spec  # noqa: E402
from standins import make_finetune, make_standin  # noqa: E402

from search.study import records  # noqa: E402

from search.run import trial_loop
from search.run.driver import run  # noqa: E402
from search.run.progress import Progress  # noqa: E402
from search.run.run_setup import open_study, prepare_run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402
from search.workers.worker_pool import WorkerPool  # noqa: E402

WINDOW = 500
# a cheap objective: one forward pass of 48 tokens on the candidate (the build is most of a trial)
CHEAP = "def score(model, tokenizer, fidelity):\n    return -float((probe_logits(model) ** 2).mean())\n"
STAGED_FIDELITIES = [16, 64]
TITLE = "## Driver: time per trial and scale"


def build_zoo(root: Path) -> dict[str, str]:
    make_standin(root / "base", "llama", 4, seed=0)
    for seed, name in enumerate(("fst", "nxt"), start=1):
        make_finetune(root / name, root / "base", seed=seed, scale=0.05)
    return {m: str(root / m) for m in ("base", "fst", "nxt")}


# ---- phases: wall time spent inside named calls of the driver ---------------------------------

# (phase, object path, attribute): each call of that attribute is timed into the phase. The calls do not
# nest within one another, so the phases add up; "other" is the rest of the loop.
PHASES = [
    ("ask (study.ask)", "optuna.Study", "ask"),
    ("sample (space.suggest: sampler + param writes)", "space", "suggest"),
    ("tell (study.tell + trial attrs)", "optuna.Study", "tell"),
    ("tell (study.tell + trial attrs)", "optuna.Trial", "set_user_attr"),
    ("tell (study.tell + trial attrs)", "optuna.Trial", "report"),
    ("prune (pruner on the schedule's view)", "search.run.trial_loop.TrialLoop", "_should_prune"),
    ("trials.jsonl", "search.study.records", "append_trial"),
    ("progress line (counts + print)", "search.run.trial_loop", "study_counts"),
    ("progress line (counts + print)", "search.run.progress.Progress", "trial_finished"),
    ("Ray (submit, wait, get)", "search.workers.worker_pool.WorkerPool", "wait"),
    ("Ray (submit, wait, get)", "search.workers.worker_pool.WorkerPool", "get"),
    ("Ray (submit, wait, get)", "search.run.trial_loop.TrialLoop", "_dispatch"),
]


class PhaseClock:
    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.undo: list = []

    def wrap(self, owner, attr: str, phase: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return  # a call the driver no longer makes: its phase reads 0
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, original))

    def install(self, space) -> None:
        import importlib

        for phase, path, attr in PHASES:
            if path == "space":
                owner = space
            else:
                module, _, name = path.rpartition(".")
                try:
                    owner = getattr(importlib.import_module(module), name)
                except (ImportError, AttributeError):
                    owner = importlib.import_module(path)
            self.wrap(owner, attr, phase)

    def remove(self) -> None:
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)
        self.undo.clear()


# ---- stand-in workers: answer at once --------------------------------------------------------


class StandinWorker:
    """The worker's calls (search/workers/worker.py) without building or scoring: a score hashed from the recipe."""

    def __init__(self, name: str, send_examples: bool):
        self.name, self.send_examples, self.recipe = name, send_examples, ""

    def info(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "worker": self.name}

    def _answer(self, t0: float, fidelity) -> dict:
        h = int(hashlib.sha1(f"{self.recipe}|{fidelity}".encode()).hexdigest()[:8], 16) / 2**32
        examples = None
        if self.send_examples:  # per-example results of one task, as the lmeval objective sends them
            n = fidelity or 64
            values = {i: float((h * (i + 7) * 9973) % 1.0 < 0.5) for i in range(n)}
            examples = {"task": {"aggregation": "mean", "weight": 1.0, "values": values}}
        return {"ok": True, "busy_s": time.perf_counter() - t0, "scores": [h], "examples": examples,
                "materialize_s": 0.0, "score_s": 0.0}

    def begin(self, trial: int, recipe_yaml: str, jobs) -> dict:
        t0 = time.perf_counter()
        self.recipe = recipe_yaml
        return self._answer(t0, jobs[0][1])

    def advance(self, trial: int, jobs, last: bool = False) -> dict:
        return self._answer(time.perf_counter(), jobs[0][1])

    def release(self) -> None:
        pass


class StandinPool(WorkerPool):
    """The real pool's slots and bookkeeping, with stand-in workers as Ray actors (Ray already running)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.worker_class = StandinWorker

    def worker_args(self, slot) -> tuple:
        return (slot.name, self.send_examples)


def scale_run(work: Path, models: dict, sampler: str, trials: int, workers: int, staged: bool,
              plain_storage: bool = False) -> dict:
    """The trial loop against stand-in workers: finish times of every trial and the phases' seconds.
    `plain_storage`: the study on Optuna's own storage (its cached RDB storage, SQLite's default journal),
    as the driver had it before search/study/single_writer_storage.py and search/study/sqlite_wal.py."""
    objective = {"kind": "custom", "function": "fns.py:score"}
    extra = {}
    if staged:
        objective["fidelities"] = STAGED_FIDELITIES
        extra["pruner"] = "successive_halving"  # replaced by the paired pruner below
    name = f"scale_{sampler}_{workers}{'_staged' if staged else ''}{'_plain' if plain_storage else ''}"
    path = write_spec(work, name, models, SLERP_SPACE, CHEAP, trials=trials, workers=workers, seed=0,
                      sampler=sampler, baselines=False, **extra)
    import yaml

    data = yaml.safe_load(path.read_text())
    data["objectives"] = [objective]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(path)
    setup = prepare_run(spec, resume=False)
    if plain_storage:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        setup.storage = optuna.storages.RDBStorage(setup.storage_url)
    if staged:
        from search.study.paired_pruner import PairedPruner

        setup.pruner, setup.send_examples = PairedPruner(), True
    study = open_study(setup, resume=False)
    pool = StandinPool(spec, None, setup.send_examples)
    pool.start()
    clock = PhaseClock()
    loop = trial_loop.TrialLoop(setup, study, pool, Progress(spec.name, spec.trials, None, quiet=True))
    clock.install(setup.space)
    try:
        loop.run()
    finally:
        clock.remove()
        pool.stop()
    wall = loop.loop_end - loop.loop_start
    finished = sorted(r["timings"]["finished"] for r in records.read_trials(spec.run_dir / "trials.jsonl")
                      if r.get("timings", {}).get("finished"))
    return {"sampler": sampler, "workers": workers, "trials": len(finished), "wall_s": wall, "finished": finished,
            "phases": dict(clock.seconds), "staged": staged, "plain": plain_storage}


def windows(finished: list[float], size: int = WINDOW) -> list[float]:
    """Trials/s in each window of `size` trials, by the time the trials finished."""
    rates, start = [], finished[0] if finished else 0.0
    for i in range(size, len(finished) + 1, size):
        end = finished[i - 1]
        rates.append(size / max(1e-9, end - start))
        start = end
    return rates


def utilization_run(work: Path, models: dict, sampler: str, trials: int, extra_ms: int = 0) -> dict:
    """A real 2-worker run; `extra_ms` of sleep added to the objective (a slower evaluation)."""
    fns = CHEAP if not extra_ms else "import time\n" + CHEAP.replace("    return", f"    time.sleep({extra_ms / 1000})\n    return")
    spec = load_spec(write_spec(work, f"util_{sampler}_{extra_ms}", models, SLERP_SPACE, fns, trials=trials, workers=2, seed=0,
                                sampler=sampler, baselines=False))
    clock = PhaseClock()
    setup_space = {}

    original_prepare = trial_loop.TrialLoop.__init__

    def init(self, setup, *args, **kwargs):  # the space exists once the run is set up
        original_prepare(self, setup, *args, **kwargs)
        clock.install(setup.space)
        setup_space["space"] = setup.space

    trial_loop.TrialLoop.__init__ = init
    try:
        result = run(spec, quiet=True)
    finally:
        trial_loop.TrialLoop.__init__ = original_prepare
        clock.remove()
    util = result.utilization
    busy = sum(w["busy_s"] for w in util["workers"].values())
    return {"sampler": sampler, "extra_ms": extra_ms, "trials": trials, "wall_s": util["wall_s"], "utilization": util["utilization"],
            "busy_per_trial_s": busy / trials, "trials_per_s": trials / util["wall_s"],
            "phases": dict(clock.seconds)}


# ---- report ------------------------------------------------------------------------------------


def phase_table(runs: list[dict], label) -> list[str]:
    names = list(dict.fromkeys(p for p, _, _ in PHASES))
    lines = ["| phase (ms per trial) | " + " | ".join(label(r) for r in runs) + " |",
             "| --- |" + " ---: |" * len(runs)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{1000 * r['phases'].get(name, 0.0) / r['trials']:.2f}"
                                                 for r in runs) + " |")
    lines.append("| other (the loop's own work) | " + " | ".join(
        f"{1000 * (r['wall_s'] - sum(r['phases'].values())) / r['trials']:.2f}" for r in runs) + " |")
    lines.append("| **wall per trial** | " + " | ".join(f"**{1000 * r['wall_s'] / r['trials']:.2f}**" for r in runs)
                 + " |")
    return lines


def report(util: list[dict], scale: list[dict], args) -> str:
    lines = [
        TITLE,
        "",
        f"Measured by `bench/bench_driver.py` on {platform.machine()}, {os.cpu_count()} cores shared with other "
        f"work, CPU only, local Ray, SQLite study in the run folder, {time.strftime('%Y-%m-%d')}. Command: "
        f"`.venv/bin/python bench/bench_driver.py --trials {args.trials} --scale-trials {args.scale_trials} "
        f"--workers {args.workers}{' --staged ' + args.staged if args.staged else ''} --slow-ms {args.slow_ms} "
        f"--plain-trials {args.plain_trials} --write`.",
        "",
        f"### Utilization: 2 real workers, a cheap objective, {args.trials} trials",
        "",
        "The slerp-curve space (4 parameters) on tiny stand-in models; the objective is one forward pass of 48 "
        "tokens, so a trial is mostly its build. "
        "Busy = the workers' own time inside their calls over the search loop's wall time.",
        "",
        "| sampler | objective | trials/s | worker busy per trial (ms) | busy fraction |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for u in util:
        lines.append(f"| {u['sampler']} | {util_label(u)} | {u['trials_per_s']:.1f} | "
                     f"{1000 * u['busy_per_trial_s']:.1f} | {u['utilization']:.2f} |")
    lines += ["", "Driver time per trial in the same runs (a phase that waits on the workers, Ray's, includes "
              "the time the driver had nothing to do):", ""]
    lines += phase_table(util, lambda u: f"{u['sampler']}, {util_label(u)}")
    lines += [
        "",
        f"### Scale: {args.workers} stand-in workers answering at once, {args.scale_trials} trials",
        "",
        f"The slerp-curve space (4 parameters) on the real trial loop; each worker is a Ray actor that answers "
        "`begin` at once, so the rate is the driver's own. Trials/s in each window of "
        f"{WINDOW} finished trials:",
        "",
    ]
    n_windows = max(len(windows(s["finished"])) for s in scale)
    lines += ["| run | " + " | ".join(f"{WINDOW * i}-{WINDOW * (i + 1)}" for i in range(n_windows)) + " | overall |",
              "| --- |" + " ---: |" * (n_windows + 1)]
    for s in scale:
        rates = windows(s["finished"])
        cells = [f"{r:.1f}" for r in rates] + [""] * (n_windows - len(rates))
        lines.append(f"| {scale_label(s)} | " + " | ".join(cells) + f" | {s['trials'] / s['wall_s']:.1f} |")
    lines += ["", "Driver time per trial (averaged over the run):", ""]
    lines += phase_table(scale, scale_label)
    lines += ["", *NOTES, ""]
    return "\n".join(lines)


NOTES = [
    "Where the time went, and what changed (the Optuna-storage row is the driver's storage as it was):",
    "",
    "- SQLite commits: Optuna commits each write alone, about a dozen per trial (the trial, each parameter, "
    "each attribute, its end), and each commit synced the file (8 ms each here). The study's SQLite now runs "
    "in WAL mode with `synchronous=NORMAL` (search/study/sqlite_wal.py): a killed driver still loses no committed write.",
    "- Reads of the study: Optuna's cached RDB storage reads every unfinished trial again on each read of the "
    "study, and `study.ask`, the sampler and the loop read it several times per trial; with 64 workers some "
    "128 trials are unfinished (in flight, or held back by the reproducible schedule). The study has one "
    "writer, so its storage (search/study/single_writer_storage.py) reads the database once and then applies its own "
    "writes to its cache; a trial's end is read back once (tests/test_driver_scale.py counts the reads).",
    "- Counts for the progress line were a recount of the whole study (two reads, O(n)) after every trial; "
    "they are now kept one told trial at a time (search/study/trial_counts.py), checked against a recount in "
    "tests/test_driver_scale.py.",
    "- What is left per trial is Optuna's own work on the writes (an ORM round trip per write: 'sample' is "
    "mostly the four parameter writes with random sampling, 'tell' the record, the state and the read-back) "
    "and, with TPE, the sampler: multivariate TPE with the constant liar costs O(n) per ask in Optuna itself. "
    "The default TPE reads at most 500 finished trials per proposal (search/study/tpe_history.py: its good group "
    "whole, an evenly spaced sample of the others), so past 500 its cost per proposal stops growing but for "
    "the O(n) pass that reads and thins the trials once per proposal (`sampler: {name: tpe, history: null}` "
    "reads every trial, as Optuna's TPE does).",
    "- 2 workers on this 2-core machine: a CPU-bound worker and the driver share the cores, so every "
    "millisecond the driver spends is taken from a worker as well as making it wait; the busy fraction is "
    "reported for a build-and-forward objective and for a slower one.",
]


def util_label(u: dict) -> str:
    return "forward pass" + (f" + {u['extra_ms']} ms sleep" if u["extra_ms"] else "")


def scale_label(s: dict) -> str:
    return (f"{s['sampler']}{', staged + paired pruner' if s['staged'] else ''}"
            f"{', Optuna storage as before' if s['plain'] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=300, help="trials of each 2-worker utilization run")
    ap.add_argument("--scale-trials", type=int, default=5000, help="trials of each stand-in run")
    ap.add_argument("--workers", type=int, default=64, help="stand-in workers")
    ap.add_argument("--samplers", default="tpe,random")
    ap.add_argument("--staged", metavar="SAMPLER", help="also a staged run with the paired pruner and this sampler")
    ap.add_argument("--slow-ms", type=int, default=300, help="utilization also with this much sleep in the objective")
    ap.add_argument("--plain-trials", type=int, default=500, help="trials of a stand-in run on Optuna's own storage "
                    "(as before), random sampler; 0: none")
    ap.add_argument("--skip-utilization", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"replace the {TITLE!r} section of BENCHMARKS.md")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    samplers = args.samplers.split(",")
    util, scale = [], []
    with tempfile.TemporaryDirectory(prefix="bench_driver_") as tmp:
        work = Path(tmp)
        models = build_zoo(work / "zoo")
        for sampler, extra_ms in [(s, ms) for ms in (0, args.slow_ms) for s in samplers] if not args.skip_utilization else []:
            util.append(utilization_run(work, models, sampler, args.trials, extra_ms))
            print(f"utilization {sampler}: {util[-1]['utilization']:.2f} ({util[-1]['trials_per_s']:.1f} trials/s)",
                  flush=True)
        for sampler in samplers:
            scale.append(scale_run(work, models, sampler, args.scale_trials, args.workers, staged=False))
            print(f"scale {sampler}: {[round(r, 1) for r in windows(scale[-1]['finished'])]} trials/s", flush=True)
        if args.staged:
            scale.append(scale_run(work, models, args.staged, args.scale_trials, args.workers, staged=True))
            print(f"scale staged: {[round(r, 1) for r in windows(scale[-1]['finished'])]} trials/s", flush=True)
        if args.plain_trials:
            scale.append(scale_run(work, models, "random", args.plain_trials, args.workers, staged=False,
                                   plain_storage=True))
            print(f"scale on Optuna's storage: {[round(r, 1) for r in windows(scale[-1]['finished'])]} trials/s", flush=True)
    ray.shutdown()
    text = report(util, scale, args)
    print(text)
    if args.write:
        write_section(text, TITLE)
        print(f"wrote the {TITLE} section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
