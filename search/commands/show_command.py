"""`mergesearch show RUN_DIR`: a finished (or running) run's summary in the terminal.

The same summary the end of `mergesearch run` prints (search/results/summary.py), fitted
to the terminal's width, then the winner's YAML: counts of complete / pruned /
failed trials, the top trials (or the Pareto front) with their scores, held-out
scores and full parameters, and what each file and folder of the run is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search.results import run_folder, summary, winner


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the folder `mergesearch run` wrote (runs/<name>/)")
    p.add_argument("--top", type=int, default=10, help="how many of the best trials to list (default 10)")


def show(run_dir: Path, console, top: int = 10) -> None:
    summary.render(run_dir, console, top)
    meta, recs = run_folder.load_run(run_dir)
    best = winner.winner(recs, meta["directions"])
    if best is None:
        return
    path = Path(run_dir) / "best.yaml"
    if not path.is_file():
        path = Path(run_dir) / "pareto" / f"trial-{best['trial']}.yaml"
    if path.is_file():
        from rich.syntax import Syntax

        console.print(f"\n{path}:")
        console.print(Syntax(path.read_text(), "yaml", word_wrap=True, background_color="default"))


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from search.engine.errors import UserError

    if args.top < 1:
        raise UserError("--top: must be at least 1")
    show(Path(args.run_dir), Console(), args.top)
    return 0
