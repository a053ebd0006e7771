"""`mergesearch demo`: the whole product on the built-in toy zoo, on one machine, offline.

1. build the zoo (cached: a second run reuses it),
2. search merges of its specialists as runs/demo.yaml says, with 2 Ray workers; the
   run scores its baselines before the search: each specialist alone, the space's
   defaults (the plain average and TIES of all four specialists), and the hand-written
   merge the spec enqueues (runs/ties-4.yml),
3. export the winner as mergekit YAML and rebuild it with mergekit,
4. score every baseline and the rebuilt winner on each skill's test split (never seen
   by the search), print the table and the winner's margin over the best baseline
   with a paired 95% interval. Exit status 1 when the winner does not beat it.

The previous demo run (runs/demo/) is replaced.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from search.engine import safe_yaml
from search.engine.errors import UserError

DEFAULT_SPEC = Path("runs/demo.yaml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="run spec to search with (default runs/demo.yaml)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--trials", type=int, help="trial budget (default: the spec's)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")


def test_scores(objective, model, tokenizer, skills: list[str]) -> tuple[dict[str, float], dict]:
    """skill -> accuracy on its test split, and the per-example results behind it (for the paired margin)."""
    from objectives.zoo.tasks import task_name

    objective.new_candidate()
    scores = objective.task_scores(model, tokenizer)
    return {s: scores[task_name(s, "test")] for s in skills}, objective.example_values()


def print_table(table: dict[str, dict[str, float]], winner: str) -> None:
    from rich.console import Console
    from rich.table import Table

    skills = list(next(iter(table.values())))
    t = Table(title="test-split accuracy (never seen by the search): the run's baselines and its winner")
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
    from search.results import run_folder, winner
    from search.study import records
    from search.run.driver import run
    from search.engine import recipe as recipes
    from search.engine.materialize import Materializer
    from search.study.paired_stats import margin
    from search.results.publish import materialize
    from search.spec.runspec import load_spec

    started = time.time()
    spec_path = args.spec
    if not spec_path.is_file():
        raise UserError(f"demo: {spec_path} not found; run the demo from the checkout's top folder or pass --spec")
    # the zoo's folder, read before the zoo exists (load_spec would refuse its missing models)
    raw = safe_yaml.load_all(safe_yaml.read_text(spec_path, str(spec_path)), str(spec_path))
    try:
        zoo_dir = (spec_path.parent / Path(raw[0]["models"]["base"]).parent).resolve()
    except (IndexError, KeyError, TypeError):
        raise UserError(f"demo: {spec_path} has no `models: {{base: ...}}`; the demo builds its zoo there") from None

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
    meta, recs = run_folder.load_run(run_dir)
    best = winner.winner(recs, meta["directions"])
    if best is None:
        raise UserError(f"demo: the search finished without a complete trial ({run_dir}/trials.jsonl says why)")
    winner_dir = materialize(best, meta, recs, run_dir / "winner", with_mergekit=True, overwrite=True)

    import datasets

    datasets.disable_progress_bars()  # one bar per tiny test split is noise here
    print("[4/4] scoring the run's baselines and its winner on the test splits", flush=True)
    objective = LmEvalObjective(
        [TaskEntry(task_name(s, "test"), "acc", 1.0, None) for s in SKILLS], include_path=[zoo_dir / "tasks"]
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_dir / "base")
    table, examples = {}, {}
    engine = Materializer(spec.models)  # scored one at a time: the engine reuses one resident model
    for r in records.read_trials(run_dir / "trials.jsonl"):
        if r.get("baseline"):
            model = engine.materialize(recipes.loads(r["recipe"]))
            table[r["baseline"]], examples[r["baseline"]] = test_scores(objective, model, tokenizer, SKILLS)
    searched = "searched winner (rebuilt by mergekit)"
    with no_hf_progress_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(winner_dir).eval()
    table[searched], examples[searched] = test_scores(objective, model, tokenizer, SKILLS)
    print_table(table, searched)

    means = {name: sum(r.values()) / len(r) for name, r in table.items()}
    best = max((n for n in table if n != searched), key=means.get)
    paired = margin(examples[searched], examples[best], "maximize")
    low, high = paired["ci95"]
    if low > 0:
        verdict = "beats"
    elif paired["difference"] > 0:
        verdict = "is ahead of, but not significantly (the interval includes 0),"
    else:
        verdict = "does NOT beat"
    print(
        f"winner {verdict} the best baseline ({best}, {means[best]:.3f}) on the test mean: "
        f"{paired['difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f}); recipe: {run_dir / 'best.yaml'}; "
        f"demo took {time.time() - started:.0f} s"
    )
    return 0 if paired["difference"] > 0 else 1
