"""Search benchmarks: recovery of hidden targets (TPE against random search) and worker utilization.

    .venv/bin/python bench/bench_search.py [--seeds 5] [--write]

Recovery: the objective rewards closeness of a candidate's logits to a hidden target
merge built from a point of the same space (tests/search_fns.py:closeness), on tiny
stand-in models. For the slerp-curve space we report the largest distance between
the best trial's t anchors and the target's; for the slice-layout space whether the
best trial is exactly the target layout, and at which trial it was first found.
One worker, so every run is deterministic for its seed (two workers reorder trials).

Utilization: two workers, trials whose scoring takes a fixed time (sleep 0.25 s on top
of the real build and forward pass); each worker's busy time as the worker measured
it, over the run's span of work: from the workers' first call (the baselines, scored before
the search) to their last answer.

Pruning (`--pruning`): the demo's search (runs/demo.yaml: merges of the toy zoo's four
specialists, scored by its lm-eval objective in stages of 16, 128 and 256 examples per task) with
no pruner (N trials) and with the demo's pruner (the same compute: the trials that finished
within N full evaluations), several seeds each. Afterwards every completed trial is scored on the
held-out split (in this process, outside the search). The target is the demo's best held-out
score: what the run without a pruner exports after --export-at trials (the best held-out of its
top 3), median over the seeds. We count the evaluation compute (examples scored per task, summed
over stages and trials; and the workers' scoring seconds) each run spent until a completed trial
first reached it.

Quality (`--quality`): the search's winner against the run's baselines on the toy zoo, per
sampler (default, CMA-ES, random) and seed; see bench/search_quality.py. --spec picks the
space: runs/demo.yaml (the default) or one of bench/quality/*.yaml (slerp, layout, MoE).

--write replaces the "## Search" section of BENCHMARKS.md (with --pruning: the
"## Search: pruning" section; with --quality: "## Search: quality", or "## Search: quality
of the <kind> space" for a spec other than the demo's); other sections are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from search_fns import PROBE  # noqa: E402
from standins import make_finetune, make_standin  # noqa: E402

from search.study import records  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.engine.materialize import Materializer  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

SLERP_SPACE = {"kind": "slerp", "models": ["fst", "nxt"], "filters": ["self_attn"], "anchors": 2}
SLERP_TARGET = {"t.self_attn.0": 0.2, "t.self_attn.1": 0.7, "t.rest.0": 0.6, "t.rest.1": 0.3}
LAYOUT_SPACE = {"kind": "layout", "mode": "interleave", "models": ["deep", "deep2"], "width": [2, 6], "stride": [1, 6]}
LAYOUT_TARGET = [("deep", (0, 4)), ("deep2", (2, 6)), ("deep", (4, 8))]  # width 4, stride 2


def build_zoo(root: Path) -> dict[str, str]:
    make_standin(root / "base", "llama", 4, seed=0)
    for seed, name in enumerate(("fst", "nxt"), start=1):
        make_finetune(root / name, root / "base", seed=seed, scale=0.05)
    make_standin(root / "deep", "llama", 8, seed=5)
    make_finetune(root / "deep2", root / "deep", seed=6, scale=0.05)
    return {m: str(root / m) for m in ("base", "fst", "nxt", "deep", "deep2")}


def save_target(folder: Path, models: dict, stages) -> Path:
    model = Materializer(models).materialize(stages, seed=0)
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()
    path = folder / "target.pt"
    torch.save(logits, path)
    return path


def write_spec(folder: Path, name: str, models: dict, space: dict, fns: str, **spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fns.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom search_fns import *\n" + textwrap.dedent(fns)
    )
    data = {"models": models, "space": space, "objectives": [{"kind": "custom", "function": "fns.py:score"}],
            "heldout_top_k": 0, **spec}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trials(run_dir: Path) -> list[dict]:
    return sorted(records.read_trials(run_dir / "trials.jsonl"), key=lambda r: r["trial"])


def slerp_error(params: dict) -> float:
    return max(abs(params[k] - v) for k, v in SLERP_TARGET.items())


def recovery_slerp(work: Path, models: dict, target: Path, sampler: str, seed: int, budget: int) -> dict:
    name = f"slerp_{sampler}_{seed}"
    spec = load_spec(write_spec(work, name, models, SLERP_SPACE, f"score = closeness({str(target)!r})\n",
                                trials=budget, workers=1, sampler=sampler, seed=seed))
    result = run(spec, quiet=True)
    recs = trials(spec.run_dir)
    best_so_far, curve = float("-inf"), []
    for r in recs:
        if r["values"] and r["values"][0] > best_so_far:
            best_so_far, best_params = r["values"][0], r["params"]
        curve.append(slerp_error(best_params))
    return {"error": slerp_error(result.best["params"]), "score": result.best["values"][0], "curve": curve}


def layout_of(record: dict) -> list:
    stage = recipes.loads(record["recipe"])[0]
    return [(s.sources[0].model, tuple(s.sources[0].layer_range)) for s in stage.slices]


def recovery_layout(work: Path, models: dict, target: Path, sampler: str, seed: int, budget: int) -> dict:
    name = f"layout_{sampler}_{seed}"
    spec = load_spec(write_spec(work, name, models, LAYOUT_SPACE, f"score = closeness({str(target)!r})\n",
                                trials=budget, workers=1, sampler=sampler, seed=seed))
    run(spec, quiet=True)
    recs = [r for r in trials(spec.run_dir) if r["recipe"]]
    hits = [r["trial"] for r in recs if layout_of(r) == LAYOUT_TARGET]
    best = max(recs, key=lambda r: r["values"][0])
    return {"found": layout_of(best) == LAYOUT_TARGET, "first": hits[0] + 1 if hits else None}


def utilization(work: Path, models: dict, budget: int) -> dict:
    space = {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]}
    spec = load_spec(write_spec(work, "utilization", models, space, "score = sleepy(0.25)\n",
                                trials=budget, workers=2, seed=0))
    t0 = time.monotonic()
    result = run(spec, quiet=True)
    util = dict(result.utilization)
    util["total_s"] = time.monotonic() - t0
    recs = trials(spec.run_dir)
    util["trial_busy_s"] = statistics.median(r["timings"]["busy_s"] for r in recs)
    return util


def flow(data: dict) -> str:
    return yaml.safe_dump(data, default_flow_style=True, width=1000).strip()


def mean(xs) -> float:
    return sum(xs) / len(xs)


def report(seeds: list[int], slerp: dict, layout: dict, util: dict, budgets: dict) -> str:
    lines = [
        "## Search",
        "",
        f"Measured by `bench/bench_search.py` on {platform.machine()}, {os.cpu_count()} cores, CPU only, "
        "tiny stand-in llama models (hidden 64; 4 layers for slerp, 8 for layouts), local Ray, "
        f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/bench_search.py --seeds {len(seeds)} --write` "
        f"(about 15 minutes). Seeds {seeds[0]}..{seeds[-1]}; one worker per recovery run, so each run "
        "is deterministic for its seed.",
        "",
        "### Recovery of a hidden target (objective: -MSE of logits against the target merge's)",
        "",
        f"Slerp curves (`{flow(SLERP_SPACE)}`), 4 anchors, target {SLERP_TARGET}; {budgets['slerp']} trials. "
        "Error = largest |t - t_target| over the anchors of the best trial.",
        "",
        "| sampler | mean error | max error | per seed | runs within 0.1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sampler, rows in slerp.items():
        errors = [r["error"] for r in rows]
        within = sum(e <= 0.1 for e in errors)
        lines.append(f"| {sampler} | {mean(errors):.3f} | {max(errors):.3f} | "
                     f"{', '.join(f'{e:.3f}' for e in errors)} | {within}/{len(errors)} |")
    checkpoints = [c for c in (10, 20, 40, 60, 80, 100, 150, 200) if c <= budgets["slerp"]]
    lines += ["", "Mean error (over seeds) of the best trial so far, by trials done; in brackets, runs within 0.1:", "",
              "| sampler | " + " | ".join(str(c) for c in checkpoints) + " |",
              "| --- |" + " --- |" * len(checkpoints)]
    for sampler, rows in slerp.items():
        cells = []
        for c in checkpoints:
            at = [r["curve"][c - 1] for r in rows]
            cells.append(f"{mean(at):.3f} ({sum(e <= 0.1 for e in at)}/{len(at)})")
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Slice layout (`{flow(LAYOUT_SPACE)}`, 30 (width, stride) points), target width 4 / stride 2 = "
        f"{[(m, list(r)) for m, r in LAYOUT_TARGET]}; {budgets['layout']} trials.",
        "",
        "| sampler | exact layout found | first found at trial (per seed) |",
        "| --- | --- | --- |",
    ]
    for sampler, rows in layout.items():
        lines.append(f"| {sampler} | {sum(r['found'] for r in rows)}/{len(rows)} | "
                     f"{', '.join(str(r['first']) if r['first'] else '-' for r in rows)} |")
    lines += [
        "",
        "### Worker utilization (2 workers, asynchronous dispatch)",
        "",
        f"{util['budget']} trials of the weights space, each scoring for 0.25 s plus the real build and forward pass "
        f"(median busy time per trial {util['trial_busy_s']:.3f} s). Busy = time inside the worker's calls, as the "
        "worker measured it; wall = from the workers' first call (the run's baselines) to their last answer (workers "
        "already started). Idle gap = from a worker's result "
        "reaching the driver to its next call being sent.",
        "",
        "| worker | trials | busy (s) | wall (s) | utilization | largest idle gap (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, w in util["workers"].items():
        lines.append(f"| {name} | {w['trials']} | {w['busy_s']:.2f} | {util['wall_s']:.2f} | "
                     f"{w['utilization']:.1%} | {w['max_idle_gap_s']:.3f} |")
    lines += ["", f"Both workers together: {util['utilization']:.1%} busy over that span; the whole run "
              f"(start-up of Ray workers and held-out phase included) took {util['total_s']:.1f} s.", ""]
    lines += NOTES
    return "\n".join(lines)


NOTES = [
    "Reading these numbers:",
    "",
    "- TPE (the default) beats random search at every budget on both spaces; for a space of continuous "
    "knobs only, such as slerp curves, `sampler: gp` converges far faster still (within 0.01 of every "
    "anchor by 40 trials on every seed).",
    "- The error of random search can grow with more trials: the best *score* so far is not always the "
    "closest *params* (the last anchor of the `rest` curve moves the logits ~20x less than the first).",
    "- What the tests assert (deterministic: one worker, seed 0): `tests/test_driver.py` recovers the slerp "
    "target within 0.05 with `gp` in 30 trials, and the exact interleaved layout with `tpe` in 40 trials; "
    "its sweeps rebuild each space's winner with mergekit, tensor for tensor.",
    "- Utilization: the idle gap is ~0 because the driver samples the next trial while the workers compute "
    "and writes finished trials to the study after dispatching; the remaining few percent is Ray's call "
    "round trip and the driver's handling of each result.",
    "",
]


def write_section(text: str, title: str = "## Search") -> None:
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(f"\n{title}\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[: start + 1] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    records.write_atomic(path, new)


# ---- pruning: evaluation compute to the best held-out score ---------------------------------

# lm-eval metrics of the zoo's tasks (objectives/zoo/tasks.py) and which way is better
METRIC_DIRECTIONS = {"acc": "maximize", "perplexity": "minimize"}


def demo_spec(zoo: Path, metric: str | None = None) -> dict:
    """runs/demo.yaml with its paths made absolute, so the spec can live anywhere; `metric`
    replaces its objective's metric (and direction)."""
    spec = yaml.safe_load((ROOT / "runs" / "demo.yaml").read_text())
    if metric:
        spec["objectives"][0].update(metric=metric, direction=METRIC_DIRECTIONS[metric])
    spec["models"] = {k: str((ROOT / "runs" / v).resolve()) for k, v in spec["models"].items()}
    for o in spec["objectives"]:
        if "include_path" in o:
            o["include_path"] = str((ROOT / "runs" / o["include_path"]).resolve())
    return spec


def examples_scored(record: dict) -> int:
    """Examples per task this trial's stages scored. Stages are incremental (objectives/lmeval.py):
    the stage at fidelity f scores only the examples the earlier stages of the trial have not,
    so a trial that reached the stage at fidelity f scored the first f examples, once each."""
    steps = [s["step"] for s in record["stages"]]
    return FULL_STAGE if any(step is None for step in steps) else max(steps, default=0)


DEMO = yaml.safe_load((ROOT / "runs" / "demo.yaml").read_text())
FIDELITIES = DEMO["objectives"][0]["fidelities"]
FULL_STAGE = FIDELITIES[-1]  # the demo's last fidelity: a run without a pruner scores only this stage


def pruning_runs(work: Path, seeds: list[int], budget: int, factor: int, pruners: list[str], metric: str | None) -> dict:
    """Per seed and pruner, one search of the demo; afterwards every completed trial scored on the
    held-out split. Returns, per run, the trials in the order they finished: cumulative examples and
    scoring seconds, search score and held-out score (None for a pruned trial)."""
    from objectives import build_objectives

    zoo = ROOT / "runs" / "zoo"
    if not (zoo / "zoo.json").is_file():
        raise SystemExit("no toy zoo in runs/zoo: build it first with `mergesearch zoo runs/zoo`")
    # One thread: OpenMP threads that outnumber free cores spin and run ~20x slower (measured here).
    torch.set_num_threads(1)
    base = demo_spec(zoo, metric)
    objective = build_objectives(base["objectives"], work)[0]
    materializer = Materializer(base["models"])
    heldout_cache: dict[str, float] = {}

    def heldout(recipe_text: str) -> float:
        if recipe_text not in heldout_cache:
            stages = recipes.loads(recipe_text)
            model = materializer.materialize(stages, seed=0)
            heldout_cache[recipe_text] = objective.score_heldout(model, materializer.tokenizer(stages))
        return heldout_cache[recipe_text]

    out: dict = {}
    for seed in seeds:
        runs = {}
        for pruner in ["none", *pruners]:
            name = f"demo_{pruner}_{seed}"
            trials_budget = budget if pruner == "none" else factor * budget
            data = {**base, "name": name, "pruner": pruner, "seed": seed, "trials": trials_budget, "heldout_top_k": 0}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            run(load_spec(path), quiet=True)
            recs = trials(work / name)
            steps = []
            examples = seconds = 0.0
            for r in sorted(recs, key=lambda r: r["timings"].get("finished", 0)):
                examples += examples_scored(r)
                seconds += sum(r["timings"].get("score_s", []))
                complete = r["state"] == "COMPLETE"
                steps.append((examples, seconds, r["values"][0] if complete else None,
                               heldout(r["recipe"]) if complete else None))
            runs[pruner] = {"steps": steps, "pruned": sum(r["state"] == "PRUNED" for r in recs)}
            print(f"seed {seed} {pruner}: {runs[pruner]['pruned']} pruned, {examples:.0f} examples, "
                  f"{seconds:.1f} s scoring", flush=True)
        out[seed] = {"runs": runs}
    raw = ROOT / "bench" / "out" / "search_pruning.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    records.write_atomic(raw, json.dumps(out, indent=1))  # every trial's compute and scores, to re-read
    return out


def within(steps: list, examples: float) -> list:
    """The trials of a run that finished within a compute budget of `examples` per task."""
    return [st for st in steps if st[0] <= examples]


def demo_export(steps: list, n_trials: int, sign: int, top_k: int = 3) -> float:
    """The held-out score of what the demo exports after its first `n_trials` trials: of its top
    `top_k` by search score, the best held-out score (as `mergesearch run` picks)."""
    done = [st for st in steps[:n_trials] if st[2] is not None]
    top = sorted(done, key=lambda st: -sign * st[2])[:top_k]
    return sign * max(sign * st[3] for st in top)


def to_target(steps: list, target: float, sign: int) -> dict | None:
    """Trials, examples and seconds a run spent until a completed trial's held-out score first
    reached `target`; None if it never did."""
    i = next((i for i, st in enumerate(steps) if st[3] is not None and sign * st[3] >= sign * target), None)
    return None if i is None else {"trials": i + 1, "examples": steps[i][0], "seconds": steps[i][1]}


def expected_compute(runs: list[dict], target: float, sign: int) -> float:
    """Expected examples to reach `target`, as COCO's expected running time: all the examples the
    runs spent until they reached it (a run that never did: all its examples), over the number of
    runs that reached it. Runs that fail count against the searcher instead of being dropped."""
    spent = reached = 0.0
    for r in runs:
        t = to_target(r["steps"], target, sign)
        spent += r["steps"][-1][0] if t is None else t["examples"]
        reached += t is not None
    return spent / reached if reached else float("inf")


def pruning_report(results: dict, budget: int, factor: int, export_at: int, command: str, metric: str | None) -> str:
    objective = demo_spec(ROOT / "runs" / "zoo", metric)["objectives"][0]
    sign = 1 if objective["direction"] == "maximize" else -1  # better = larger sign * score
    cap = budget * FULL_STAGE  # every run gets the compute of the run without a pruner
    results = {seed: {"runs": {p: {"steps": within(r["steps"], cap)} for p, r in res["runs"].items()}}
               for seed, res in results.items()}
    exports = {seed: demo_export(res["runs"]["none"]["steps"], export_at, sign) for seed, res in results.items()}
    target = statistics.median(exports.values())
    pruners = list(next(iter(results.values()))["runs"])
    fmt = "{:.4f}"
    lines = [
        "## Search: pruning",
        "",
        f"Measured by `bench/bench_search.py --pruning` on {platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"{time.strftime('%Y-%m-%d')} ({command}): the demo's search (runs/demo.yaml on the toy zoo of runs/zoo; "
        f"TPE, 2 workers; lm-eval `{objective['metric']}` averaged over four skills ({objective['direction']}), in "
        f"stages of {', '.join(map(str, FIDELITIES))} examples per task), per seed {budget} trials without a pruner "
        f"and, with one, the same compute: the trials that finished within {budget} × {FULL_STAGE} examples per "
        f"task (of at most {factor * budget}). Every completed trial is then scored on the held-out split.",
        "",
        f"**Target: the demo's best held-out score.** Without a pruner, the demo's search exports after {export_at} "
        f"trials (the compute of the shipped demo's pruned search) the best held-out score of its top 3 by search "
        f"score; that export's held-out score, median over the {len(exports)} seeds, is the target: "
        f"**{fmt.format(target)}** (the seeds' exports: "
        + ", ".join(fmt.format(exports[s]) for s in exports) + "). "
        "Compute = examples scored per task, summed over stages and trials in the order they finished, until a "
        "completed trial's held-out score first reached the target (held-out scoring itself is not counted, for any "
        "run), and the workers' scoring seconds. Stages are incremental: a trial pruned after the stage of f examples "
        f"costs f, a trial let through {FULL_STAGE}, as a trial of the run without a pruner. Every run may go on past "
        "its export, so both reach the same fixed quality and neither is measured against its own best.",
        "",
        "| seed | pruner | stopped early | trials to target | examples to target | seconds to target | vs none (examples) "
        "| total trials | total examples |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, res in results.items():
        none = to_target(res["runs"]["none"]["steps"], target, sign)
        none_total = res["runs"]["none"]["steps"][-1][0]
        for pruner, r in res["runs"].items():
            t, last = to_target(r["steps"], target, sign), r["steps"][-1]
            stopped = sum(st[2] is None for st in r["steps"])  # within the budget: no search score
            total = f"{len(r['steps'])} | {last[0]:.0f}"
            if t is None:  # not reached: at least everything it spent
                lines.append(f"| {seed} | {pruner} | {stopped} | not in {len(r['steps'])} | > {last[0]:.0f} | "
                             f"> {last[1]:.1f} | - | {total} |")
                continue
            if none is not None:
                ratio = f"{t['examples'] / none['examples']:.2f}"
            else:  # the run without a pruner did not reach it: the ratio is at most this
                ratio = f"< {t['examples'] / none_total:.2f}"
            lines.append(f"| {seed} | {pruner} | {stopped} | {t['trials']} | {t['examples']:.0f} | "
                         f"{t['seconds']:.1f} | {ratio} | {total} |")

    def ratio_at(pruner: str, level: float) -> str:
        runs = [res["runs"] for res in results.values()]
        ours = expected_compute([r[pruner] for r in runs], level, sign)
        ref = expected_compute([r["none"] for r in runs], level, sign)
        reached = [to_target(r[pruner]["steps"], level, sign) is not None for r in runs]
        if ref == float("inf"):
            return f"no run without a pruner reached it ({sum(reached)}/{len(reached)} seeds with {pruner})"
        return f"{ours / ref:.2f} ({sum(reached)}/{len(reached)} seeds reached it)"

    lines += [
        "",
        "Expected compute to the target (COCO's expected running time: examples spent until the target, a run "
        "that missed it counting all its examples, over the runs that reached it), relative to no pruner: "
        + "; ".join(f"{p}: **{ratio_at(p, target)}**" for p in pruners if p != "none") + ". The same ratio at each "
        "seed's export instead of their median, from the worst to the best: "
        + "; ".join(f"{p}: " + ", ".join(f"{fmt.format(level)} → {ratio_at(p, level)}"
                                        for level in sorted(exports.values(), key=lambda v: sign * v))
                    for p in pruners if p != "none") + ".",
        "",
    ]
    lines += PRUNING_NOTES
    return "\n".join(lines)


PRUNING_NOTES = [
    "Reading these numbers (issue 4's target: pruning needs at most half the compute): **met in expectation, "
    "0.42, and every seed reached the target**, on seeds 6-11, which played no part in choosing the pruner and "
    "sampler (below). The spread is wide: on five seeds the paired pruner needed 0.23-0.41 of the compute of the "
    "search without a pruner (on seed 10 the search without a pruner never reached the target in its 120 trials, "
    "counted in its expectation with all it spent), on seed 7 four times as much. Against stricter targets the "
    "saving shrinks: at the two best seed exports (1.3425, 1.3381) the ratio is 0.64-0.67. On the six seeds the "
    "choice was made on (target 1.3611, below) the same configuration needed 0.53; pooled over all twelve seeds "
    "(their targets differ by 0.0004), 0.47. Search score and held-out score agree in every run (the best by "
    "search score is the best or nearly the best held-out), so what a pruned search loses is the search's, not "
    "overfitting of the proxy.",
    "",
    "How the demo's pruned search was chosen: on seeds 0-5, then measured above on fresh seeds, so that the "
    "choice is not fitted to the seeds it is reported on. Expected compute to the same target (1.3611, the "
    "median export of seeds 0-5) relative to no pruner (the runs without a pruner of `pruning_fixed_seeds0.json` "
    "and `pruning_fixed_seeds3.json`: 120 trials each), the pruned runs given 240 trials. Only the first row "
    "is a run of this bench; the others are runs of the same searches by a throw-away script (per-trial results "
    "in `bench/out/variants/`, not committed):",
    "",
    "| pruner | TPE reads a pruned trial | compute vs none | seeds that reached the target |",
    "| --- | --- | --- | --- |",
    "| successive_halving | behind every finished trial (Optuna's TPE) | 1.17 | 5/6 |",
    "| successive_halving | every trial at its first stage's score | 0.89 | 5/6 |",
    "| paired | behind every finished trial (Optuna's TPE) | 0.58 | 6/6 |",
    "| paired | every pruned trial at its last stage's score + the mean gap to the final score | 0.52 | 5/6 (seed 4, "
    "given 600 trials: 1.17) |",
    "| **paired** | **trials pruned at the last stage before the full score at their score there + the mean gap "
    "(shipped)** | **0.53** | **6/6** |",
    "",
    "Also tried on seeds 3 and 4, where successive halving failed: a third of the trials sampled at random "
    "(BOHB's mix): both missed (best 1.423 and 1.449); stages 32, 128, 256 (reduction factor 4): 2.22 and 1.58 "
    "times the compute; the paired pruner at 1.0 standard errors instead of 1.64, with Optuna's TPE: seeds 1 and "
    "4 missed. Successive halving's trouble is the first stage (\"## Search: stage scores\"): it keeps the best "
    "1/8 by a score that ranks good merges poorly, so good merges are cut by chance and TPE settles in a worse "
    "region for good. Reading every pruned trial as nearly finished makes TPE sample ever closer to the best so "
    "far (it did on seed 4: 180 of 240 trials stopped after 16 examples, around a merge scoring 1.55).",
    "",
    "Earlier versions of this bench (2026-11-21, same day) measured each seed against its own export, or gave "
    "the pruned run twice the trials instead of the same compute; the fixed target and the equal compute budget "
    "replace both. The shipped demo's search, 120 trials with the paired pruner, costs 8,100-12,900 examples per "
    "task on seeds 0-5, the compute of 32-51 trials without a pruner: hence `--export-at 40`.",
    "",
    "What it took before: incremental stages (`objectives/lmeval.py`; equal to scoring the whole subset from "
    "scratch, `tests/test_incremental_stages.py`), so a trial let through costs 256 examples per task, not "
    "16 + 128 + 256; the answer's perplexity as the score (on exact-match `acc` good merges tie on the first "
    "stage); and not the median pruner, which compares a trial only with *completed* trials, which TPE's "
    "proposals soon beat (it stopped 3-11% of the trials). Two workers make trial order depend on timing, so a "
    "repeat of the same seed differs; raw per-trial numbers: `bench/out/*.json` (not committed).",
    "",
]


# ---- stage ranking: how well each stage's score ranks merges ---------------------------------


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def stage_ranking(n: int, seed: int, top: int = 30) -> str:
    """Score `n` random merges of the demo's space at every stage and on the held-out split; how
    well each stage's score ranks them by held-out score, over all and over the best `top`."""
    import optuna

    from objectives import build_objectives
    from spaces import build_space, read_model_infos

    torch.set_num_threads(2)
    spec = demo_spec(ROOT / "runs" / "zoo")
    objective = build_objectives(spec["objectives"], ROOT / "runs")[0]
    materializer = Materializer(spec["models"])
    space = build_space(spec["space"], read_model_infos(spec["models"]))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows = []
    for _ in range(n):
        trial = study.ask()
        stages = space.suggest(trial)
        model, tokenizer = materializer.materialize(stages, seed=0), materializer.tokenizer(stages)
        objective.new_candidate()
        rows.append([objective.score(model, tokenizer, f) for f in FIDELITIES] + [objective.score_heldout(model, tokenizer)])
        study.tell(trial, rows[-1][-1])
    heldout = [r[-1] for r in rows]
    sign = 1 if objective.direction == "maximize" else -1
    best = sorted(range(n), key=lambda i: -sign * heldout[i])[:top]
    lines = [
        "## Search: stage scores",
        "",
        f"Measured by `bench/bench_search.py --stage-ranking {n} --first-seed {seed} --write` on "
        f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}: {n} random merges of the demo's "
        f"space (runs/demo.yaml, Optuna's RandomSampler, seed {seed}), each scored by the demo's objective at every "
        "stage and on the held-out split. Spearman correlation of each stage's score with the held-out score, over "
        f"all of them and over the {top} best by held-out score (the merges a search ends up comparing):",
        "",
        f"| examples per task | all {n} | best {top} |",
        "| --- | --- | --- |",
    ]
    for i, f in enumerate(FIDELITIES):
        stage = [r[i] for r in rows]
        lines.append(f"| {f} | {spearman(stage, heldout):.3f} | "
                     f"{spearman([stage[j] for j in best], [heldout[j] for j in best]):.3f} |")
    lines += [
        "",
        f"The best held-out score among them: {heldout[best[0]]:.4f}. A small first stage sorts merges into good and "
        "bad but ranks good ones poorly, so a pruner that keeps the best 1/r at that stage cuts good merges by chance; "
        "compared with the best trial example by example (the paired pruner), only significantly worse ones stop.",
        "",
    ]
    return "\n".join(lines)


def quality(args: argparse.Namespace) -> None:
    import ray

    from search_quality import quality_report, quality_runs, section_title

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    trials = args.trials or yaml.safe_load(args.spec.read_text())["trials"]
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) < trials} | {trials})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = quality_runs(args.spec, args.quality_samplers.split(","), seeds, trials, checkpoints)
    ray.shutdown()
    command = (f".venv/bin/python bench/bench_search.py --quality --spec {args.spec.resolve().relative_to(ROOT)} "
               f"--first-seed {args.first_seed} --seeds {args.seeds} --quality-samplers {args.quality_samplers} "
               f"--trials {trials} --checkpoints {args.checkpoints}" + (" --write" if args.write else ""))
    title = section_title(args.spec)
    text = quality_report(results, checkpoints, command, title)
    print(text)
    if args.write:
        write_section(text, title)
        print(f"wrote the {title} section of {ROOT / 'BENCHMARKS.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--slerp-trials", type=int, default=100)
    ap.add_argument("--layout-trials", type=int, default=40)
    ap.add_argument("--samplers", default="tpe,random,gp", help="samplers for the slerp recovery (tpe and random "
                    "always run on both spaces)")
    ap.add_argument("--utilization-trials", type=int, default=40)
    ap.add_argument("--pruning", action="store_true", help="run the pruning benchmark instead (needs runs/zoo)")
    ap.add_argument("--pruning-trials", type=int, default=120, help="trials of the run without a pruner")
    ap.add_argument("--pruned-factor", type=int, default=4, help="runs with a pruner get the compute of the run "
                    "without one, in at most this many times its trials")
    ap.add_argument("--export-at", type=int, default=40, help="the target is the median over seeds of what the "
                    "run without a pruner exports after this many trials")
    ap.add_argument("--pruners", default=DEMO["pruner"], help="pruners compared with none (comma-separated: paired, "
                    "successive_halving, hyperband, median; default: the demo's)")
    ap.add_argument("--metric", choices=sorted(METRIC_DIRECTIONS), help="with --pruning: search on this metric "
                    "instead of runs/demo.yaml's")
    ap.add_argument("--from-json", nargs="+", type=Path, metavar="FILE",
                    help="with --pruning: report the per-trial results of earlier runs (search_pruning.json files, "
                    "their seeds merged) instead of running")
    ap.add_argument("--stage-ranking", type=int, metavar="N", help="instead: how well each stage's score ranks N "
                    "random merges of the demo's space by held-out score (needs runs/zoo)")
    ap.add_argument("--quality", action="store_true", help="instead: the search's winner against the run's "
                    "baselines, per sampler and seed (bench/search_quality.py; needs the toy zoo)")
    ap.add_argument("--spec", type=Path, default=ROOT / "runs" / "demo.yaml", help="with --quality: the run spec")
    ap.add_argument("--quality-samplers", default="tpe,cmaes,random", help="with --quality: samplers compared")
    ap.add_argument("--trials", type=int, help="with --quality: trial budget (default: the spec's)")
    ap.add_argument("--checkpoints", default="15,30,60", help="with --quality: trials spent at which the best "
                    "trial so far is scored on held-out (the budget is always added)")
    ap.add_argument("--write", action="store_true", help="replace the ## Search section of BENCHMARKS.md")
    args = ap.parse_args()

    if args.quality:
        quality(args)
        return

    if args.stage_ranking:
        text = stage_ranking(args.stage_ranking, args.first_seed)
        print(text)
        if args.write:
            write_section(text, "## Search: stage scores")
        return

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if not (args.pruning and args.from_json):  # everything else runs searches
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if args.pruning:
        metric = f" --metric {args.metric}" if args.metric else ""
        if args.from_json:
            results = {seed: res for f in args.from_json for seed, res in json.loads(f.read_text()).items()}
            command = ("the per-trial results of " + ", ".join(f"`{f.name}`" for f in args.from_json) + " merged by "
                       f"`--from-json`; runs of `--pruning --first-seed S --seeds N --pruning-trials "
                       f"{args.pruning_trials} --pruned-factor {args.pruned_factor}{metric}`")
        else:
            with tempfile.TemporaryDirectory(prefix="bench_pruning_") as tmp:
                results = pruning_runs(Path(tmp), seeds, args.pruning_trials, args.pruned_factor,
                                       args.pruners.split(","), args.metric)
            ray.shutdown()
            command = (f"command: `.venv/bin/python bench/bench_search.py --pruning --first-seed {args.first_seed} "
                       f"--seeds {args.seeds} --pruning-trials {args.pruning_trials} --pruned-factor "
                       f"{args.pruned_factor} --export-at {args.export_at}{metric} --write`")
        text = pruning_report(results, args.pruning_trials, args.pruned_factor, args.export_at, command, args.metric)
        print(text)
        if args.write:
            write_section(text, "## Search: pruning")
            print(f"wrote the ## Search: pruning section of {ROOT / 'BENCHMARKS.md'}")
        return

    budgets = {"slerp": args.slerp_trials, "layout": args.layout_trials}
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        work = Path(tmp)
        models = build_zoo(work / "zoo")
        from spaces import build_space, read_model_infos
        from spaces.base import ReplayTrial

        space = build_space(SLERP_SPACE, read_model_infos(models))
        (work / "slerp_target").mkdir()
        slerp_target = save_target(work / "slerp_target", models, space.suggest(ReplayTrial(SLERP_TARGET)))
        layout_recipe = recipes.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m, "layer_range": list(r)}]} for m, r in LAYOUT_TARGET]})
        (work / "layout_target").mkdir()
        layout_target = save_target(work / "layout_target", models, [layout_recipe])

        slerp = {s: [] for s in args.samplers.split(",")}
        layout = {"tpe": [], "random": []}
        for seed in seeds:
            for sampler in slerp:
                slerp[sampler].append(recovery_slerp(work, models, slerp_target, sampler, seed, budgets["slerp"]))
                print(f"seed {seed} {sampler}: slerp error {slerp[sampler][-1]['error']:.3f}", flush=True)
            for sampler in layout:
                layout[sampler].append(recovery_layout(work, models, layout_target, sampler, seed, budgets["layout"]))
                print(f"seed {seed} {sampler}: layout found {layout[sampler][-1]['found']} "
                      f"(first at {layout[sampler][-1]['first']})", flush=True)
        util = utilization(work, models, args.utilization_trials)
        util["budget"] = args.utilization_trials
    ray.shutdown()
    text = report(seeds, slerp, layout, util, budgets)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the ## Search section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
