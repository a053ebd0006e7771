"""`mergesearch show RUN_DIR`: a finished (or running) run's summary, on stdout.

The same summary the end of `mergesearch run` prints (search/results/summary.py): counts of
complete / pruned / failed trials, the top trials (or the Pareto front) with their scores,
held-out scores and full parameters, the winner and the rule that picked it, the baselines
and the verdict, what each file and folder of the run is, and the winner's YAML. Fitted to a
terminal's width; off a terminal (`mergesearch show RUN | cat`, a file) nothing is wrapped,
so the YAML and the commands in its header can be copied as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search.results import summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the folder `mergesearch run` wrote (runs/<name>/)")
    p.add_argument("--top", type=int, default=10, help="how many of the best trials to list (default 10)")


def main(args: argparse.Namespace) -> int:
    from search.engine.errors import UserError

    if args.top < 1:
        raise UserError("--top: must be at least 1")
    summary.render(Path(args.run_dir), summary.stdout_console(), args.top)
    return 0
