"""`mergesearch export RUN_DIR [--trial N | --top K] [OUT]`: trials of a run as mergekit YAML.

Without --trial/--top: the best trial (by held-out score when the run re-scored
its top trials), or every Pareto-optimal trial when the run had several objectives.
OUT is a file for one recipe (default: print it), a folder for several
(default: RUN_DIR/top or RUN_DIR/pareto).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

from search import export
from search.engine.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the folder `mergesearch run` wrote (runs/<name>/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="export this trial number")
    which.add_argument("--top", type=int, help="export the K best trials, one file each")
    p.add_argument("out", nargs="?", help="output file (one recipe) or folder (several)")
    # OUT may follow the options (`export RUN --trial 3 out.yaml`): plain argparse stops
    # filling positionals at the first option, intermixed parsing does not.
    p.parse_known_args = types.MethodType(_parse_intermixed, p)


def _parse_intermixed(self: argparse.ArgumentParser, args=None, namespace=None):
    # parse_known_intermixed_args calls parse_known_args itself: the inner calls take the plain path.
    if getattr(self, "_intermixing", False):
        return argparse.ArgumentParser.parse_known_args(self, args, namespace)
    self._intermixing = True
    try:
        return self.parse_known_intermixed_args(args, namespace)
    finally:
        self._intermixing = False


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    meta, recs = export.load_run(run_dir)
    directions = meta["directions"]
    if args.top is not None:
        if args.top < 1:
            raise UserError("--top: must be at least 1")
        chosen = export.rank(recs, directions)[: args.top]
        folder = Path(args.out) if args.out else run_dir / "top"
    elif args.trial is None and len(directions) > 1:
        chosen = export.pareto(recs, directions)
        folder = Path(args.out) if args.out else run_dir / "pareto"
    else:
        if args.trial is not None:
            record = export.find_trial(recs, args.trial)
        else:
            ranked = export.rank(recs, directions)
            if not ranked:
                raise UserError(f"{run_dir}: no trial completed; nothing to export")
            record = ranked[0]
        if args.out:
            path = export.write_recipe(record, meta, Path(args.out))
            print(f"wrote trial {record['trial']} to {path}", file=sys.stderr)
        else:
            sys.stdout.write(export.recipe_text(record, meta, "recipe.yaml"))
        return 0
    if not chosen:
        raise UserError(f"{run_dir}: no trial completed; nothing to export")
    items = [(f"trial-{r['trial']}.yaml", export.recipe_text(r, meta, f"trial-{r['trial']}.yaml")) for r in chosen]
    export.write_folder(folder, items)
    print(f"wrote {len(items)} recipes to {folder}", file=sys.stderr)
    return 0
