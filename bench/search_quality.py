"""Search quality (`bench/bench_search.py --quality`): does the search beat the merges people write by hand?

For each sampler (the default, CMA-ES, random search) and each search seed, one run of a
spec on the toy zoo (default runs/demo.yaml; its paths made absolute). Per run:

- best held-out against trials spent: at each checkpoint c, the complete trial with the
  best search score among the first c search trials (baselines and duplicates do not
  count), scored on the held-out split here, outside the search;
- the run's own winner (what it exports) scored on the test split of each skill the spec
  searches on (its `<skill>_search` tasks), which nothing in the run saw, beside every
  baseline of the run on the same split, with the winner's paired margin over the best of
  them (95% interval).

The baselines (each specialist alone, the space's defaults, the spec's enqueued recipes)
are the reference lines: the same in every run of one spec, so they are scored once.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def absolute_spec(spec_path: Path) -> dict:
    """The spec with its model folders, include paths and enqueued files made absolute, so it can run from anywhere."""
    spec = yaml.safe_load(spec_path.read_text())
    here = spec_path.parent
    spec["models"] = {k: str((here / v).resolve()) for k, v in spec["models"].items()}
    for o in spec["objectives"]:
        if "include_path" in o:
            o["include_path"] = str((here / o["include_path"]).resolve())
    if spec.get("enqueue"):
        spec["enqueue"] = [str((here / e).resolve()) if isinstance(e, str) else e for e in spec["enqueue"]]
    return spec


def spec_skills(spec: dict) -> list[str]:
    """The zoo skills the spec searches on (its first objective's `<skill>_search` tasks): the winner and the
    baselines are judged on those skills' test splits, the skills the run was asked to merge for."""
    tasks = spec["objectives"][0].get("tasks") or []
    return [t.removesuffix("_search") for t in tasks if isinstance(t, str) and t.endswith("_search")]


class Scorer:
    """Held-out and test scores of recipes, each built once in this process (cached by recipe text)."""

    def __init__(self, spec: dict, zoo: Path):
        from objectives import build_objectives
        from objectives.lmeval import LmEvalObjective, TaskEntry
        from objectives.zoo.build import SKILLS
        from objectives.zoo.tasks import task_name
        from search.engine.materialize import Materializer

        self.skills = spec_skills(spec) or SKILLS
        self.search_objective = build_objectives(spec["objectives"], ROOT)[0]
        self.test_objective = LmEvalObjective(
            [TaskEntry(task_name(s, "test"), "acc", 1.0, None) for s in self.skills], include_path=[zoo / "tasks"]
        )
        self.test_names = [task_name(s, "test") for s in self.skills]
        self.engine = Materializer(spec["models"])
        self._heldout: dict[str, float] = {}
        self._test: dict[str, tuple[float, dict]] = {}

    def _build(self, recipe_text: str):
        from search.engine import recipe as recipes

        stages = recipes.loads(recipe_text)
        return self.engine.materialize(stages, seed=0), self.engine.tokenizer(stages)

    def heldout(self, recipe_text: str) -> float:
        if recipe_text not in self._heldout:
            model, tokenizer = self._build(recipe_text)
            self.search_objective.new_candidate()
            self._heldout[recipe_text] = float(self.search_objective.score_heldout(model, tokenizer))
        return self._heldout[recipe_text]

    def test(self, recipe_text: str) -> tuple[float, dict]:
        """Mean test accuracy over the skills, and the per-example results behind it (for the paired margin)."""
        if recipe_text not in self._test:
            model, tokenizer = self._build(recipe_text)
            self.test_objective.new_candidate()
            scores = self.test_objective.task_scores(model, tokenizer)
            mean = sum(scores[t] for t in self.test_names) / len(self.test_names)
            self._test[recipe_text] = (mean, self.test_objective.example_values())
        return self._test[recipe_text]


def search_trials(recs: list[dict]) -> list[dict]:
    """The trials that spend budget, in the order they were asked (trial numbers are reproducible)."""
    return sorted((r for r in recs if not r.get("baseline") and r.get("duplicate_of") is None), key=lambda r: r["trial"])


def best_within(trials: list[dict], n: int, sign: int) -> dict | None:
    done = [r for r in trials[:n] if r["state"] == "COMPLETE"]
    return max(done, key=lambda r: (sign * r["values"][0], -r["trial"])) if done else None


def one_run(work: Path, base: dict, sampler: str, seed: int, trials: int, checkpoints: list[int], scorer: Scorer) -> dict:
    from search.results import run_folder, winner
    from search.run.driver import run
    from search.study.paired_stats import margin
    from search.spec.runspec import load_spec

    name = f"quality_{sampler}_{seed}"
    data = {**base, "name": name, "sampler": sampler, "seed": seed, "trials": trials}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.perf_counter()
    run(load_spec(path), quiet=True)
    wall = time.perf_counter() - started
    meta, recs = run_folder.load_run(work / name)
    direction = meta["directions"][0]
    sign = 1 if direction == "maximize" else -1
    spent = search_trials(recs)
    curve = {}
    for c in checkpoints:
        best = best_within(spent, c, sign)
        curve[c] = scorer.heldout(best["recipe"]) if best else None
    win = winner.winner(recs, meta["directions"])
    baselines = {r["baseline"]: r for r in recs if r.get("baseline")}
    test = {b: scorer.test(r["recipe"])[0] for b, r in baselines.items()}
    win_test, win_examples = scorer.test(win["recipe"])
    best_baseline = max(test, key=test.get)
    paired = margin(win_examples, scorer.test(baselines[best_baseline]["recipe"])[1], "maximize")
    return {
        "sampler": sampler, "seed": seed, "wall_s": wall, "direction": direction, "curve": curve,
        "winner": win["trial"], "winner_heldout": scorer.heldout(win["recipe"]), "winner_test": win_test,
        "baselines_heldout": {b: scorer.heldout(r["recipe"]) for b, r in baselines.items()},
        "baselines_test": test, "best_baseline": best_baseline,
        "margin": paired["difference"], "ci95": paired["ci95"],
        "pruned": sum(r["state"] == "PRUNED" for r in spent), "complete": sum(r["state"] == "COMPLETE" for r in spent),
    }


def quality_runs(spec_path: Path, samplers: list[str], seeds: list[int], trials: int, checkpoints: list[int]) -> list[dict]:
    import tempfile

    import torch

    torch.set_num_threads(1)  # the workers use the cores; this process scores between runs
    base = absolute_spec(spec_path)
    zoo = Path(base["models"][next(iter(base["models"]))]).parent
    if not (zoo / "zoo.json").is_file():
        raise SystemExit(f"no toy zoo in {zoo}: build it first with `mergesearch zoo {zoo}`")
    scorer = Scorer(base, zoo)
    out = []
    raw = ROOT / "bench" / "out" / f"search_quality_{spec_path.stem}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for seed in seeds:
            for sampler in samplers:
                res = one_run(Path(tmp), base, sampler, seed, trials, checkpoints, scorer)
                out.append(res)
                print(f"seed {seed} {sampler}: winner test {res['winner_test']:.3f}, best baseline "
                      f"{res['best_baseline']} {res['baselines_test'][res['best_baseline']]:.3f}, margin "
                      f"{res['margin']:+.3f} (CI {res['ci95'][0]:+.3f} to {res['ci95'][1]:+.3f}), "
                      f"{res['wall_s']:.0f} s", flush=True)
                raw.write_text(json.dumps(out, indent=1))  # after every run: a long benchmark keeps what it measured
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def section_title(spec_path: Path) -> str:
    """BENCHMARKS.md's heading for a spec's results: the demo's is "Search: quality", another space's is its own."""
    if spec_path.resolve() == (ROOT / "runs" / "demo.yaml").resolve():
        return "## Search: quality"
    return f"## Search: quality of the {yaml.safe_load(spec_path.read_text())['space']['kind']} space"


def quality_report(results: list[dict], checkpoints: list[int], command: str, title: str) -> str:
    samplers = list(dict.fromkeys(r["sampler"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    first = results[0]
    higher = first["direction"] == "maximize"
    ref = first["baselines_heldout"]
    best_ref = (max if higher else min)(ref, key=ref.get)
    lines = [
        title,
        "",
        f"Command: `{command}` (x86_64, 2 cores, {time.strftime('%Y-%m-%d')}). Seeds {seeds[0]}..{seeds[-1]}, "
        f"{len(seeds)} per sampler. Held-out score of the best trial by search score among the first N search "
        f"trials (the run's objective, {'higher' if higher else 'lower'} is better; median over seeds, "
        "then each seed):",
        "",
        "| sampler | " + " | ".join(f"N={c}" for c in checkpoints) + " |",
        "| --- | " + " | ".join("---" for _ in checkpoints) + " |",
    ]
    for s in samplers:
        runs = [r for r in results if r["sampler"] == s]
        cells = []
        for c in checkpoints:
            vals = [r["curve"][str(c)] if str(c) in r["curve"] else r["curve"].get(c) for r in runs]
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.median(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})" if vals else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Reference lines, the run's baselines on held-out: " + ", ".join(
        f"{b} {v:.3f}" for b, v in sorted(ref.items(), key=lambda kv: kv[1], reverse=higher)[:4]
    ) + f" (best: {best_ref}).", ""]
    lines += [
        "The run's winner on the test splits (mean accuracy over the skills; nothing in the run saw them) "
        "against every baseline of the run on the same split:",
        "",
        "| sampler | seed | winner test | best baseline (test) | margin | paired 95% CI | above every baseline |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        above = all(r["winner_test"] > v for v in r["baselines_test"].values())
        lines.append(
            f"| {r['sampler']} | {r['seed']} | {r['winner_test']:.3f} | {r['best_baseline']} "
            f"{r['baselines_test'][r['best_baseline']]:.3f} | {r['margin']:+.3f} | "
            f"{r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f} | {'yes' if above else 'no'} |"
        )
    lines.append("")
    for s in samplers:
        runs = [r for r in results if r["sampler"] == s]
        above = sum(all(r["winner_test"] > v for v in r["baselines_test"].values()) for r in runs)
        lines.append(f"- {s}: mean margin {statistics.mean(r['margin'] for r in runs):+.3f} over the best baseline; "
                     f"above every baseline in {above} of {len(runs)} seeds; "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} s per run.")
    return "\n".join(lines) + "\n"
