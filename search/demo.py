"""`mergesearch demo`: the whole product on the built-in toy zoo, on one machine, offline.

1. build the zoo (cached: a second run reuses it),
2. search merges of its specialists as runs/demo.yaml says, with 2 Ray workers,
3. export the winner as mergekit YAML and rebuild it with `mergekit-yaml`,
4. score every parent, the usual default merges and the rebuilt winner on each
   skill's test split (never seen by the search) and print the table.

The defaults (a plain average; TIES at mergekit's usual settings) sit beside the
winner because they are what a person would try by hand: on some zoo seeds they
do not even beat the best parent, while the searched merge does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from search.engine.errors import UserError

DEFAULT_SPEC = Path("runs/demo.yaml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="run spec to search with (default runs/demo.yaml)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--trials", type=int, help="trial budget (default: the spec's)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")


def default_recipes(models: dict[str, str]) -> dict[str, dict]:
    """Merges a person would try first: the plain average and TIES with mergekit's usual settings."""
    specialists = [m for m in models if m != "base"]
    return {
        "average (linear)": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in specialists],
            "dtype": "float32",
        },
        "TIES (w 1, d 0.5)": {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in specialists],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    }


def rebuild_with_mergekit(recipe_file: Path, out: Path) -> Path:
    """Rebuild an exported recipe with mergekit itself: mergekit-yaml, or mergekit-multi for stages."""
    from search.engine import recipe as recipes

    multi = len(recipes.load(recipe_file)) > 1
    exe = Path(sys.executable).with_name("mergekit-multi" if multi else "mergekit-yaml")
    if not exe.exists():
        raise UserError(f"demo: {exe.name} is not installed; run `bash setup.sh` (it installs mergekit 0.1.5)")
    shutil.rmtree(out, ignore_errors=True)
    if multi:
        command = [str(exe), str(recipe_file), "--intermediate-dir", str(out.with_name(out.name + "-stages")), "--out-path", str(out)]
    else:
        command = [str(exe), str(recipe_file), str(out)]
    done = subprocess.run(command + ["--random-seed", "0"], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"demo: {exe.name} failed on {recipe_file}: {done.stderr.strip().splitlines()[-1]}")
    return out


def test_scores(objective, model, tokenizer, skills: list[str]) -> dict[str, float]:
    """skill -> accuracy on its test split."""
    from objectives.zoo.tasks import task_name

    scores = objective.task_scores(model, tokenizer)
    return {s: scores[task_name(s, "test")] for s in skills}


def print_table(table: dict[str, dict[str, float]], winner: str) -> None:
    from rich.console import Console
    from rich.table import Table

    skills = list(next(iter(table.values())))
    t = Table(title="test-split accuracy (never seen by the search)")
    t.add_column("model")
    for s in skills:
        t.add_column(s, justify="right")
    t.add_column("mean", justify="right", style="bold")
    for name, row in table.items():
        mean = sum(row.values()) / len(row)
        style = "bold green" if name == winner else None
        t.add_row(name, *(f"{row[s]:.2f}" for s in skills), f"{mean:.3f}", style=style)
    Console().print(t)


def main(args: argparse.Namespace) -> int:
    import transformers

    from objectives.lmeval import LmEvalObjective, TaskEntry
    from objectives.zoo.build import SKILLS, build_zoo, no_hf_progress_bars
    from objectives.zoo.tasks import task_name
    from search.engine import recipe as recipes
    from search.driver import run
    from search.engine.materialize import Materializer
    from search.runspec import load_spec

    started = time.time()
    spec_path = args.spec
    if not spec_path.is_file():
        raise UserError(f"demo: {spec_path} not found; run the demo from the checkout's top folder or pass --spec")
    raw = yaml.safe_load(spec_path.read_text())
    zoo_dir = (spec_path.parent / Path(raw["models"]["base"]).parent).resolve()

    print(f"[1/4] toy zoo in {zoo_dir}", flush=True)
    build_zoo(zoo_dir, seed=args.seed)

    print("[2/4] searching merges of the specialists", flush=True)
    spec = load_spec(spec_path, {"trials": args.trials, "workers": args.workers})
    run_dir = Path(spec.run_dir)
    if run_dir.exists():
        print(f"      replacing the previous demo run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    run(spec)

    print("[3/4] rebuilding the winner with mergekit", flush=True)
    best = run_dir / "best.yaml"
    if not best.is_file():
        raise UserError(f"demo: the search finished without a complete trial ({run_dir}/trials.jsonl says why)")
    winner_dir = rebuild_with_mergekit(best, run_dir / "winner")

    import datasets

    datasets.disable_progress_bars()  # one bar per tiny test split is noise here
    print("[4/4] scoring parents, default merges and the winner on the test splits", flush=True)
    objective = LmEvalObjective(
        [TaskEntry(task_name(s, "test"), "acc", 1.0, None) for s in SKILLS], include_path=[zoo_dir / "tasks"]
    )
    models = {m: str(zoo_dir / m) for m in ["base", *SKILLS]}
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_dir / "base")

    def load(folder):
        with no_hf_progress_bars():
            return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()

    table = {}
    for name, path in models.items():
        table[name] = test_scores(objective, load(path), tokenizer, SKILLS)
    engine = Materializer(models)  # scored one at a time: the engine reuses one resident model
    for label, data in default_recipes(models).items():
        table[label] = test_scores(objective, engine.materialize(recipes.from_dict(data)), tokenizer, SKILLS)
    winner = "searched winner (rebuilt by mergekit)"
    table[winner] = test_scores(objective, load(winner_dir), tokenizer, SKILLS)
    print_table(table, winner)

    means = {name: sum(r.values()) / len(r) for name, r in table.items()}
    best_parent = max(["base", *SKILLS], key=means.get)
    margin = means[winner] - means[best_parent]
    verdict = "beats" if margin > 0 else "does NOT beat"
    print(
        f"winner {verdict} the best parent ({best_parent}, {means[best_parent]:.3f}) by {margin:+.3f} "
        f"on the mean; recipe: {best}; demo took {time.time() - started:.0f} s"
    )
    return 0 if margin > 0 else 1
