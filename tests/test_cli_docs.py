"""The docs and `--help` agree: every option a command's parser defines is in its section of
docs/commands.md, and every option the README or a docs/ page gives a command exists.

A command's options in the docs are those of its section (`## \\`mergesearch CMD ...\\`` in
docs/commands.md) and of every command line or inline command that starts with `mergesearch CMD`
anywhere in README.md or docs/. Lines and inline spans that start with another program
(mergekit-multi, optuna-dashboard, pip) name that program's options and are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from search.commands.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS_PAGE = (ROOT / "docs" / "commands.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SECTION = re.compile(r"^## `mergesearch (\w+)[^`]*`$", re.M)
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


def documented_options() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    headings = list(SECTION.finditer(COMMANDS_PAGE))
    starts = [m.start() for m in headings] + [len(COMMANDS_PAGE)]
    # what lies outside the command sections: only full `mergesearch CMD ...` invocations count there
    outside = [COMMANDS_PAGE[: starts[0]], README] + [text for name, text in DOCS.items() if name != "commands.md"]
    for m, end in zip(headings, starts[1:]):
        section = COMMANDS_PAGE[m.end(): end]
        for command, options in attributed(m.group(0).strip("#` ") + "\n" + section, m.group(1)).items():
            out.setdefault(command, set()).update(options)
    for text in outside:
        for command, options in attributed(text, None).items():
            out.setdefault(command, set()).update(options)
    return out


def test_every_command_has_a_section_and_the_docs_run_no_other():
    assert {m.group(1) for m in SECTION.finditer(COMMANDS_PAGE)} == set(COMMANDS)
    assert set(documented_options()) - {"COMMAND"} <= set(COMMANDS)  # `mergesearch COMMAND --help`: a placeholder


@pytest.mark.parametrize("command", list(COMMANDS))
def test_docs_and_help_name_the_same_options(command):
    documented = documented_options().get(command, set())
    defined = parser_options(command)
    assert not defined - documented, f"{command}: options --help has that docs/commands.md does not name"
    assert not documented - defined, f"{command}: options the docs name that `{command}` does not have"


def test_the_top_level_options_are_in_the_readme():
    assert "mergesearch --version" in README and "mergesearch --help" in README


def test_every_page_the_readme_links_exists_and_every_page_is_linked():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README))
    assert linked == {f"docs/{name}" for name in DOCS}


def test_the_readme_gives_the_suite_s_test_count(request):
    """The README's count is the suite's: checked when this session collected every test file, unfiltered."""
    config, items = request.config, request.session.items
    every_file = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    if {item.path.name for item in items} != every_file or config.option.keyword or config.option.markexpr:
        pytest.skip("only the whole suite knows its count")
    stated = re.search(r"^(\d+) tests, about (\d+) minutes on 2 cores", README, re.M)
    assert stated, "README, Tests: give the count as '<N> tests, about <M> minutes on 2 cores'"
    assert int(stated.group(1)) == len(items), f"README says {stated.group(1)} tests; the suite has {len(items)}"


def written_commands() -> list[tuple[str, str]]:
    """(page, command line) for every `mergesearch CMD ...` the README and docs/ give to copy: code-block lines
    (continuations joined, comments and the shell's redirections and pipes cut), and inline spans with
    arguments that are whole commands (no `[` or `...`); a bare `mergesearch run` in prose names the
    command, it is not one to run."""
    found = []
    for name, text in [("README.md", README), *DOCS.items()]:
        blocks = re.split(r"^```.*$", text, flags=re.M)
        lines = [line for block in blocks[1::2] for line in block.replace("\\\n", " ").splitlines()]
        spans = [span for prose in blocks[::2] for span in re.findall(r"`([^`]+)`", prose)
                 if len(span.split()) > 2]
        for piece in lines + spans:
            line = re.sub(r"\s+#.*$", "", piece.strip())
            line = re.split(r"\s(?:\d?>|<|\||&&|;)\s", line)[0]  # the shell's part: redirections, pipes
            call = INVOCATION.match(line)
            if call and call.group(1) in COMMANDS and not re.search(r"\[|\.\.\.|…", line):
                found.append((name, line))
    return found


def test_every_written_command_parses_as_written():
    """Each command line the docs give parses with the command's own options: no option renamed under a reader."""
    assert len(written_commands()) >= 10
    broken = []
    for page, line in written_commands():
        words = shlex.split(line)
        words = words[words.index(next(w for w in words if w.endswith("mergesearch"))) + 1:]
        parser = argparse.ArgumentParser(prog=f"mergesearch {words[0]}", exit_on_error=False)
        importlib.import_module(COMMANDS[words[0]][0]).add_arguments(parser)
        try:
            parser.parse_args(words[1:])
        except (argparse.ArgumentError, SystemExit) as e:
            broken.append(f"{page}: {line}  ({e})")
    assert not broken, "\n".join(broken)


def test_the_readme_s_first_run_spec_is_ready_to_run_as_written(tmp_path):
    """The spec under "A first run on your own models", saved as it is beside models and a task folder of the
    names it gives, passes every check `mergesearch run` makes before its workers start."""
    from objectives.zoo.tasks import write_task_folder
    from search.run.run_setup import prepare_run
    from search.spec.runspec import load_spec
    from standins import make_finetune, make_standin

    section = README[README.index("## A first run on your own models"):]
    spec_text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    spec = yaml.safe_load(spec_text)
    base = make_standin(tmp_path / spec["models"]["base"], "llama", 2, seed=1)
    make_finetune(tmp_path / spec["models"]["math"], base, seed=2)
    make_finetune(tmp_path / spec["models"]["chat"]["path"], base, seed=3)
    objective = spec["objectives"][0]
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    task, split = objective["tasks"][0].rsplit("_", 1)
    write_task_folder(tmp_path / objective["include_path"], task, {split: rows}, tmp_path / objective["include_path"])
    (tmp_path / "my-merge.yaml").write_text(spec_text)
    setup = prepare_run(load_spec(tmp_path / "my-merge.yaml"), resume=False)
    assert setup.space.used_models == ["base", "math", "chat"]
