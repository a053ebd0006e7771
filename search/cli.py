"""The `mergesearch` command: one sub-command per job, each defined in its own module.

Every sub-command module exposes `add_arguments(parser)` and `main(args) -> int`.
Errors the user can fix are raised as `UserError` (or RecipeError) and printed as
one line, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from search.engine.errors import UserError
from search.engine.recipe import RecipeError

# sub-command -> (module, one-line help); modules are imported only when used,
# so `mergesearch merge` does not pay for Ray and `run` does not pay for the zoo.
COMMANDS = {
    "merge": ("search.engine.merge_command", "build a mergekit recipe into an HF model folder"),
    "run": ("search.run_command", "search merge recipes as a run spec describes"),
    "export": ("search.export_command", "write trials of a finished run as mergekit YAML"),
    "zoo": ("objectives.zoo.command", "build the toy model zoo (tokenizer, base, specialists, tasks)"),
    "demo": ("search.demo", "build the zoo, search merges of it, rebuild the winner with mergekit"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergesearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except (UserError, RecipeError) as e:
        print(f"mergesearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mergesearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
