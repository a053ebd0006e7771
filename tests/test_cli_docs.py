"""README and `--help` agree: every option a command's parser defines is in its README section, and every
option the README gives a command exists.

A command's options in the README are those of its section (`### \\`mergesearch CMD ...\\``) and of
every command line or inline command that starts with `mergesearch CMD` anywhere. Lines and inline
spans that start with another program (mergekit-multi, optuna-dashboard, pip) name that program's
options and are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from search.commands.cli import COMMANDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SECTION = re.compile(r"^### `mergesearch (\w+)[^`]*`$", re.M)
INVOCATION = re.compile(r"(?:\.venv/bin/)?mergesearch (\w+)\b(.*)")


def parser_options(command: str) -> set[str]:
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"}


def pieces(text: str) -> tuple[list[str], list[str]]:
    """(code: code-block lines, `\\` continuations joined, and inline code spans; the prose around them)."""
    code, prose = [], []
    for i, block in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if i % 2:
            code += block.replace("\\\n", " ").splitlines()
        else:
            parts = re.split(r"`([^`]*)`", block)
            prose += parts[::2]
            code += parts[1::2]
    return code, prose


def attributed(text: str, command: str | None) -> dict[str, set[str]]:
    """command -> options `text` names for it: a `mergesearch CMD ...` line or span names CMD's; a bare option
    (a span starting with `-`, or prose) is the section's `command`'s; other programs' lines are skipped."""
    found: dict[str, set[str]] = {}
    code, prose = pieces(text)
    for piece in code:
        call = INVOCATION.match(piece.strip())
        if call:
            found.setdefault(call.group(1), set()).update(OPTION.findall(call.group(2)))
        elif command and piece.strip().startswith("-"):
            found.setdefault(command, set()).update(OPTION.findall(piece))
    if command:
        found.setdefault(command, set()).update(o for piece in prose for o in OPTION.findall(piece))
    return found


def readme_options() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    headings = list(SECTION.finditer(README))
    starts = [m.start() for m in headings] + [len(README)]
    # what lies outside the command sections: only full `mergesearch CMD ...` invocations count there
    outside = README[: starts[0]]
    for m, end in zip(headings, starts[1:]):
        section = README[m.end(): end]
        next_h2 = re.search(r"^## ", section, re.M)
        if next_h2:
            outside += section[next_h2.start():]
            section = section[: next_h2.start()]
        for command, options in attributed(m.group(0).strip("#` ") + "\n" + section, m.group(1)).items():
            out.setdefault(command, set()).update(options)
    for command, options in attributed(outside, None).items():
        out.setdefault(command, set()).update(options)
    return out


def test_every_command_has_a_readme_section_and_the_readme_runs_no_other():
    assert {m.group(1) for m in SECTION.finditer(README)} == set(COMMANDS)
    assert set(readme_options()) - {"COMMAND"} <= set(COMMANDS)  # `mergesearch COMMAND --help`: a placeholder


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_and_help_name_the_same_options(command):
    documented = readme_options().get(command, set())
    defined = parser_options(command)
    assert not defined - documented, f"{command}: options --help has that the README does not name"
    assert not documented - defined, f"{command}: options the README names that `{command}` does not have"


def test_the_top_level_options_are_in_the_readme():
    assert "mergesearch --version" in README and "mergesearch --help" in README
