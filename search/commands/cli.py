"""The `mergesearch` command: one sub-command per job, each defined in its own module.

Every sub-command module exposes `add_arguments(parser)` and `main(args) -> int`.
Errors the user can fix are raised as `UserError` (or RecipeError) and printed as
one line, with exit status 2 and no traceback; so is the system refusing a read or
a write (an OSError: permissions, a read-only or full disk), naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import warnings

from search.engine.errors import UserError
from search.engine.recipe import RecipeError

# What `mergesearch --help` says first: the tool, not the code.
ABOUT = """\
Search mergekit merge recipes for language models. Name some models and a
space of recipes (slerp t-curves, weights and densities, passthrough layouts,
block expansion, MoE expert picks, or stages of these); mergesearch samples
recipes with Optuna, builds each candidate in memory in its workers (local
processes, or Ray actors on a cluster), scores it on a cheap proxy eval in
stages (pruning weak ones early), and hands back the winner as mergekit YAML
that mergekit-yaml / mergekit-moe / mergekit-multi rebuild exactly."""

START = """\
where to start:
  mergesearch demo            the whole loop on a built-in toy zoo, offline
  mergesearch run SPEC.yaml   search as a spec says (example: runs/demo.yaml)
  mergesearch show RUN_DIR    a run's top trials, winner and files
  mergesearch report RUN_DIR  its plots, in RUN_DIR/report/report.html
  mergesearch COMMAND --help  what a command does, and its options"""

# sub-command -> (module, one-line help for the list, description for its --help); modules are
# imported only when used, so `mergesearch merge` does not pay for Ray and `run` not for the zoo.
COMMANDS = {
    "run": ("search.commands.run_command", "search merge recipes as a run spec describes",
            "Search merge recipes as a run spec (YAML) describes: models, a space of recipes, "
            "objectives with optional fidelity stages, a sampler and a pruner, a budget. Scores the "
            "run's baselines (each model alone, the space's defaults, enqueued recipes) before the "
            "search, and ends by saying whether the winner beat the best of them. Writes "
            "runs/<name>/: the study, trials.jsonl, best.yaml (or pareto/), a report/ with plots, "
            "and prints a summary on stdout (progress on stderr). The same spec, seed and worker "
            "count give the same run. "
            "Ctrl-C stops it; --resume continues."),
    "show": ("search.commands.show_command", "print a run's summary: top trials, parameters, winner, files",
             "Print a run's summary, fitted to the terminal's width (unwrapped when stdout is no "
             "terminal, so its YAML copies whole): trials complete / pruned / failed, the top trials "
             "(or the Pareto front) with their scores and held-out scores, their full parameters, "
             "the winner and the rule that picked it, the baselines, what each file of the run "
             "folder is, and the winner's YAML."),
    "report": ("search.commands.report_command", "write a run's plots and report.html into RUN_DIR/report/",
               "Write PNG plots and one self-contained report.html (the plots embedded) into "
               "RUN_DIR/report/: optimization history, parameter importances, stage scores and "
               "pruning, slerp t-curves, the winner's layers, the Pareto front, the summary table "
               "and the winner's YAML. `mergesearch run` writes it at its end; this writes it again "
               "from the run folder alone."),
    "export": ("search.commands.export_command", "write trials of a run as mergekit YAML, or the winner as a model",
               "Write trials of a run as mergekit YAML with the command that rebuilds each: the "
               "winner by default (by held-out score when the run has one), the Pareto front for "
               "several objectives, one trial (--trial N) or the K best (--top K). Models are named "
               "publicly (hub id, the spec's name:, or the alias), with the --model-map arguments that "
               "rebuild the recipe on this machine; --local-paths writes this machine's folders. "
               "--materialize OUT_DIR builds the trial into a model folder with a model card."),
    "merge": ("search.engine.merge_command", "build a mergekit recipe into an HF model folder",
              "Build a mergekit recipe (what mergekit-yaml, mergekit-moe or mergekit-multi "
              "accept) into a Hugging Face model folder, bit for bit as mergekit 0.1.5 builds it: "
              "config, safetensors shards, tokenizer, the recipe and a model card. OUT_DIR "
              "appears complete or not at all."),
    "zoo": ("objectives.zoo.command", "build the toy model zoo (tokenizer, base, specialists, tasks)",
            "Build the toy zoo on CPU, deterministically: a character-level tokenizer, a small "
            "Llama base, specialists fine-tuned from it on one skill each, and an lm-eval task "
            "folder per skill with search / held-out / test splits; prints the skill x model "
            "accuracy matrix. The demo searches merges of it."),
    "demo": ("search.commands.demo", "build the zoo, search merges of it, rebuild the winner with mergekit",
             "The whole product offline on one machine: build (or reuse) the toy zoo in runs/zoo/, "
             "search merges of its specialists as runs/demo.yaml says, rebuild the winner with "
             "mergekit-multi, and score the parents, two default merges and the winner on test "
             "splits the search never saw."),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergesearch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


@contextlib.contextmanager
def quiet_libraries():
    """Libraries' warnings (torch's note on a checkpoint's pickle protocol, transformers' deprecations) are
    nothing a user of mergesearch can act on, which says what matters in its own lines: off while a command
    runs, here and in the processes it starts (workers, mergekit). `python -W ...` or PYTHONWARNINGS shows
    them again, TRANSFORMERS_VERBOSITY transformers' own."""
    from search.workers.ray_workers import environment

    quiet = {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}
    if not sys.warnoptions:
        quiet["PYTHONWARNINGS"] = "ignore"
    with environment(quiet), warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    with quiet_libraries():
        return _command(argv)


def _command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="mergesearch", description=ABOUT, epilog=START, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mergesearch {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except (UserError, RecipeError) as e:
        return _error(args.command, str(e))
    except OSError as e:
        # The system refused a read or a write (permissions, a read-only or full disk): say which file.
        where = f"{e.filename}: " if e.filename else ""
        return _error(args.command, f"{where}{e.strerror or e}{_OS_HINTS.get(e.errno, '')}")
    except KeyboardInterrupt:
        print(f"mergesearch {args.command}: interrupted", file=sys.stderr)
        return 130


# errno -> how to fix it
_OS_HINTS = {
    errno.EACCES: "; choose a path you may write to, or fix its permissions",
    errno.EPERM: "; choose a path you may write to, or fix its permissions",
    errno.EROFS: "; choose a path on a writable filesystem",
    errno.ENOSPC: "; free some space or choose another disk",
}
MAX_LINE = 500  # characters of one error line; the start names the field, the end says how to fix it


def _error(command: str, message: str) -> int:
    line = " ".join(message.splitlines())
    if len(line) > MAX_LINE:
        keep = (MAX_LINE - 5) // 2
        line = f"{line[:keep]} ... {line[-keep:]}"
    print(f"mergesearch {command}: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
