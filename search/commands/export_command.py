"""`mergesearch export RUN_DIR [--trial N | --top K] [OUT]`: trials of a run as mergekit YAML.

Without --trial/--top: the best trial (by held-out score when the run re-scored
its top trials), or every Pareto-optimal trial when the run had several objectives.
OUT is a file for one recipe (default: print it), a folder for several
(default: RUN_DIR/top or RUN_DIR/pareto). An existing OUT is left alone unless
--overwrite is given, and even then only the files export writes are replaced:
nothing else in a folder is deleted. A failed trial has no recipe worth exporting;
a pruned one is exported with a header saying at which stage its score was taken.

Models are written under their public names (hub id, the spec's `name:`, or the
alias), with the `--model-map NAME=PATH` arguments that rebuild the recipe on this
machine in the header and on stderr; --local-paths writes this machine's folders
instead, which mergekit reads as they are. --materialize OUT builds the trial (the
winner by default) into a model folder with a model card, by the engine or, with
--with-mergekit, by mergekit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from pathlib import Path

from search.results import export, run_folder, winner
from search.engine import recipe as recipes
from search.engine.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the folder `mergesearch run` wrote (runs/<name>/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="export this trial number")
    which.add_argument("--top", type=int, help="export the K best trials, one file each")
    p.add_argument("out", nargs="?", help="output file (one recipe) or folder (several)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing OUT file, same-named files in an OUT folder, or the --materialize folder",
    )
    p.add_argument("--local-paths", action="store_true",
                   help="name the models by this machine's folders (what mergekit reads) instead of their public names")
    p.add_argument("--materialize", metavar="OUT_DIR",
                   help="build the trial (default: the winner) into a model folder with a model card (README.md)")
    p.add_argument("--with-mergekit", action="store_true",
                   help="with --materialize: build it with mergekit-yaml / mergekit-multi / mergekit-moe, not the engine")
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


@contextlib.contextmanager
def _writing(out):
    """The system refusing a write (permissions, a read-only disk) names OUT, not the temporary file."""
    try:
        yield
    except OSError as e:
        raise UserError(f"OUT {out}: cannot write there ({e.strerror or e}); choose a path you may write to") from None


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    meta, recs = run_folder.load_run(run_dir)
    directions = meta["directions"]
    if args.with_mergekit and not args.materialize:
        raise UserError("--with-mergekit: it builds the model of --materialize OUT_DIR; add that, or drop it")
    if args.materialize:
        return _materialize(args, run_dir, meta, recs)
    if args.top is not None:
        if args.top < 1:
            raise UserError("--top: must be at least 1")
        chosen = winner.rank(recs, directions)[: args.top]
        folder = Path(args.out) if args.out else run_dir / "top"
    elif args.trial is None and len(directions) > 1:
        chosen = winner.pareto(recs, directions)
        folder = Path(args.out) if args.out else run_dir / "pareto"
    else:
        record = _one_trial(args, run_dir, recs, directions)
        if args.out:
            with _writing(args.out):
                path = export.write_recipe(record, meta, Path(args.out), args.overwrite, args.local_paths)
            print(f"wrote trial {record['trial']} to {path}", file=sys.stderr)
            _say_how_to_rebuild([record], meta, str(path), args.local_paths)
        else:
            sys.stdout.write(export.recipe_text(record, meta, "recipe.yaml", args.local_paths))
        return 0
    if not chosen:
        raise UserError(f"{run_dir}: no trial completed; nothing to export")
    items = [(f"trial-{r['trial']}.yaml", export.recipe_text(r, meta, f"trial-{r['trial']}.yaml", args.local_paths))
             for r in chosen]
    with _writing(folder):
        export.write_folder(folder, items, args.overwrite)
    print(f"wrote {len(items)} recipes to {folder}", file=sys.stderr)
    _say_how_to_rebuild(chosen, meta, str(folder / "trial-N.yaml"), args.local_paths)
    return 0


def _one_trial(args: argparse.Namespace, run_dir: Path, recs: list[dict], directions: list[str]) -> dict:
    """--trial N, else the winner: the best by held-out score, or the Pareto front's best on the first objective."""
    if args.trial is not None:
        return winner.find_trial(recs, args.trial)
    pool = winner.pareto(recs, directions) if len(directions) > 1 else recs
    ranked = winner.rank(pool, directions)
    if not ranked:
        raise UserError(f"{run_dir}: no trial completed; nothing to export")
    return ranked[0]


def _materialize(args: argparse.Namespace, run_dir: Path, meta: dict, recs: list[dict]) -> int:
    from search.engine.merge_command import Progress, recipe_file_name
    from search.engine.model_card import not_on_the_hub
    from search.results import publish, run_card
    from search.results.verdict import verdict_line

    for given, flag in ((args.top is not None, "--top"), (args.out, "OUT"), (args.local_paths, "--local-paths")):
        if given:
            raise UserError(f"--materialize: builds one trial's model folder, which names the models publicly; "
                            f"drop {flag}")
    record = _one_trial(args, run_dir, recs, meta["directions"])
    try:
        with _writing(args.materialize):
            out = publish.materialize(record, meta, recs, Path(args.materialize), with_mergekit=args.with_mergekit,
                                      overwrite=args.overwrite, progress=Progress(sys.stderr.isatty()))
    except UserError as e:  # the engine names its folder OUT_DIR; here it is this option's
        raise UserError(str(e).replace("OUT_DIR ", "--materialize ", 1)) from None
    print(f"built trial {record['trial']} into {out} (model card: README.md)", file=sys.stderr)
    stages = recipes.loads(record["recipe"])
    unlisted = not_on_the_hub(run_card.base_models(stages, meta))
    if unlisted:
        print(f"the model card names {', '.join(unlisted)} in its text but not in `base_model`, which takes hub "
              "ids only; give each its hub id as `name:` under the run spec's models", file=sys.stderr)
    verdict = verdict_line(meta.get("verdict"))
    if verdict:  # what was built is worth publishing only if it beat the hand-written merges
        print(f"verdict of the run: {verdict}", file=sys.stderr)
    _say_how_to_rebuild([record], meta, str(out / recipe_file_name(stages)), local_paths=False)
    print(out)
    return 0


def _say_how_to_rebuild(chosen: list[dict], meta: dict, file_name: str, local_paths: bool) -> None:
    """The --model-map arguments that rebuild the public recipe here (the header says it too)."""
    if local_paths:
        return
    mapping: dict[str, str] = {}
    for r in chosen:
        mapping.update(export.model_map(recipes.loads(r["recipe"]), meta))
    seed = f" --random-seed {meta['seed']}" if meta.get("seed") is not None else ""
    print(f"rebuild here: mergesearch merge {file_name} OUT_DIR{seed} {export.model_map_args(mapping)}",
          file=sys.stderr)
