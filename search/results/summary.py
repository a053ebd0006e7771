"""A run's summary: counts, the top trials with their full parameters, the winner, the run's files.

One builder for every place a run is summed up: the end of `mergesearch run`
(search/run/driver.py), `mergesearch show`, and the report's HTML table. It reads
the run folder's records only. Printed, it goes to stdout (progress goes to stderr),
fitted to a terminal's width; off a terminal (a file, a pipe) nothing is wrapped, so
the winner's YAML and the commands in its header can be copied as they are.

Parameters are shown whole, never cut: anchors of one curve (`t.mlp.0`,
`t.mlp.1`, ...) become one list (`t.mlp=[0.1,0.8]`), and names that share a
first part (a compose stage, `t`, `weight`, `slice.3`) are grouped on one line
under it. Items hold no spaces, so a narrow terminal wraps between items only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.results import run_folder, winner
from search.results.verdict import verdict_line

STATES = (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed"))

# What each entry of a run folder is, in the order they are listed.
RUN_FILES = (
    ("best.yaml", "the winner as mergekit YAML (the rebuild command is in its header)"),
    ("pareto/", "the Pareto-optimal trials, one mergekit YAML each"),
    ("trials.jsonl", "every trial: params, recipe, score per stage, held-out score, timings, state"),
    ("run.json", "the run's settings, baselines, winner and verdict (the winner against the best baseline)"),
    ("study.db", "the Optuna study (SQLite): resume with --resume, or open in optuna-dashboard"),
    ("study.db-wal", "SQLite's log of the study's latest writes, merged into study.db when it is closed"),
    ("study.db-shm", "SQLite's index of that log"),
    ("report/", "plots and report.html (mergesearch report rebuilds it)"),
    ("top/", "the top trials as mergekit YAML (mergesearch export --top)"),
    ("winner/", "the winner rebuilt as a model folder"),
)


def split_baselines(recs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(trials, baselines): records marked `"baseline": name` are reference merges, not trials of the study."""
    return [r for r in recs if not r.get("baseline")], [r for r in recs if r.get("baseline")]


def counts(trials: list[dict]) -> dict[str, int]:
    return {label: sum(r["state"] == state for r in trials) for state, label in STATES}


def counts_text(trials: list[dict]) -> str:
    return ", ".join(f"{n} {label}" for label, n in counts(trials).items())


def shown_trials(meta: dict, trials: list[dict], top: int) -> list[dict]:
    """The Pareto front for several objectives, else the `top` best (by held-out score where there is one)."""
    directions = meta["directions"]
    return winner.pareto(trials, directions) if len(directions) > 1 else winner.rank(trials, directions)[:top]


# ---- parameters --------------------------------------------------------------


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def param_groups(params: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(group, [(key, value text), ...])]: anchors joined into lists, keys grouped by their first part
    (and its index, as in `slice.3`); keys of one part come first, as group ""."""
    curves: dict[str, list[tuple[int, Any]]] = {}
    for key, v in params.items():
        stem, _, last = key.rpartition(".")
        if stem and last.isdigit():
            curves.setdefault(stem, []).append((int(last), v))
        else:
            curves.setdefault(key, []).append((-1, v))
    items = []
    for key, values in curves.items():
        if values[0][0] < 0:
            items.append((key, _value(values[0][1])))
        else:
            items.append((key, "[" + ",".join(_value(v) for _, v in sorted(values)) + "]"))
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, text in items:
        m = re.match(r"^([^.]+(?:\.\d+)?)\.(.+)$", key)
        group, rest = (m.group(1), m.group(2)) if m else ("", key)
        groups.setdefault(group, []).append((rest, text))
    # keys without a group share the first line, so no line of them sits under a group's name
    loose = groups.pop("", [])
    return ([("", loose)] if loose else []) + list(groups.items())


def items_text(members: list[tuple[str, str]]) -> str:
    return " ".join(f"{k}={v}" for k, v in members)


# ---- the table -----------------------------------------------------------------


@dataclass
class Row:
    trial: int
    values: list[str]
    heldout: str | None
    params: list[tuple[str, list[tuple[str, str]]]]  # param_groups of the trial
    is_winner: bool


@dataclass
class Summary:
    name: str
    counts: str
    caption: str  # "top 10" or "Pareto front"
    columns: list[str]  # the score columns
    has_heldout: bool
    rows: list[Row]
    winner: dict | None


def build(meta: dict, recs: list[dict], top: int = 10) -> Summary:
    trials, _ = split_baselines(recs)
    names, directions = meta["objectives"], meta["directions"]
    shown = shown_trials(meta, trials, top)
    best = winner.winner(trials, directions)
    rows = [
        Row(
            trial=r["trial"],
            values=[f"{v:.4g}" for v in r["values"]],
            heldout=", ".join(f"{v:.4g}" for v in r["heldout"]) if r.get("heldout") else None,
            params=param_groups(r.get("params") or {}),
            is_winner=best is not None and r["trial"] == best["trial"],
        )
        for r in shown
    ]
    return Summary(
        name=meta["name"],
        counts=counts_text(trials),
        caption="Pareto front" if len(directions) > 1 else f"top {len(shown)}",
        columns=[f"{n} ({'max' if d == 'maximize' else 'min'})" for n, d in zip(names, directions)],
        has_heldout=any(r.heldout for r in rows),
        rows=rows,
        winner=best,
    )


def run_files(run_dir: Path) -> list[tuple[str, str]]:
    """(entry, what it is) for what the run folder holds: the known entries, then any others."""
    run_dir = Path(run_dir)
    known = {name.rstrip("/") for name, _ in RUN_FILES}
    out = [(name, what) for name, what in RUN_FILES if (run_dir / name.rstrip("/")).exists()]
    for p in sorted(run_dir.iterdir()):
        if p.name not in known and not p.name.startswith("."):
            out.append((p.name + ("/" if p.is_dir() else ""), "a folder" if p.is_dir() else "a file"))
    return out


# ---- rich rendering (terminal) -----------------------------------------------------

UNWRAPPED = 1_000_000  # columns of a console that is no terminal: wide enough that nothing wraps


def stdout_console(file=None):
    """Where a summary is printed: stdout (or `file`), fitted to a terminal's width, unwrapped off a terminal."""
    from rich.console import Console

    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=UNWRAPPED)


def render(run_dir: Path, console, top: int = 10) -> None:
    """Print the summary fitted to the console's width: a one-line-per-trial score table, then each
    listed trial's parameters (wrapped, whole), the winner and the tie rule that picked it, the
    baselines and the verdict, the run folder's entries and the winner's YAML."""
    from rich.table import Table
    from rich.text import Text

    meta, recs = run_folder.load_run(run_dir)
    s = build(meta, recs, top)
    console.print(Text(f"{s.name}: {s.counts}", style="bold"))
    if not s.rows:
        console.print("no trial completed: trials.jsonl says why each failed or was pruned")
    else:
        console.print(Text(s.caption, style="italic"))
        scores = Table(box=None, pad_edge=False)
        scores.add_column("trial", justify="right")
        for c in s.columns:
            scores.add_column(c, justify="right")
        if s.has_heldout:
            scores.add_column("held-out", justify="right")
        for row in s.rows:
            cells = [f"{row.trial}{' *' if row.is_winner else ''}"] + row.values
            scores.add_row(*cells, *([row.heldout or ""] if s.has_heldout else []))
        console.print(scores)
        console.print()
        console.print(Text("parameters", style="italic"))
        params = Table(box=None, pad_edge=False, show_header=False)
        params.add_column(justify="right", no_wrap=True)
        params.add_column()
        for row in s.rows:
            params.add_row(str(row.trial), _params_grid(row.params))
        console.print(params)
        console.print(Text(winner_line(s, recs, meta["directions"]), style="bold green"))
    _render_baselines(meta, recs, s.columns, console)
    console.print()
    console.print(Text(f"in {run_dir}", style="italic"))
    files = Table(box=None, pad_edge=False, show_header=False)
    files.add_column(no_wrap=True)
    files.add_column(overflow="fold")
    for name, what in run_files(run_dir):
        files.add_row(name, what)
    console.print(files)
    _render_winner_yaml(run_dir, s.winner, console)


def winner_line(s: Summary, recs: list[dict], directions: list[str]) -> str:
    """'winner: trial 3 (marked *), picked by held-out score; ...' with the tie rule, and the tie it decided."""
    line = f"winner: trial {s.winner['trial']} (marked *)"
    if not s.has_heldout:
        return line
    tied = winner.heldout_ties(recs, directions)
    if not tied:
        return f"{line}, picked by held-out score ({winner.TIE_RULE})"
    numbers = ", ".join(str(r["trial"]) for r in tied)
    return (f"{line}, picked by held-out score: trials {numbers} tie there at {tied[0]['heldout'][0]:.4g}, "
            f"and {winner.TIE_RULE}")


def _render_winner_yaml(run_dir: Path, best: dict | None, console) -> None:
    """The winner's file as it is: on a terminal highlighted and wrapped, elsewhere unwrapped, to copy whole."""
    if best is None:
        return
    path = Path(run_dir) / "best.yaml"
    if not path.is_file():
        path = Path(run_dir) / "pareto" / f"trial-{best['trial']}.yaml"
    if not path.is_file():
        return
    console.print(f"\n{path}:", markup=False, highlight=False, soft_wrap=not console.is_terminal)
    if console.is_terminal:
        from rich.syntax import Syntax

        console.print(Syntax(path.read_text(), "yaml", word_wrap=True, background_color="default"))
    else:
        console.print(path.read_text().rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


def _render_baselines(meta: dict, recs: list[dict], columns: list[str], console) -> None:
    """The run's baselines with their scores, and the verdict: the winner against the best of them."""
    from rich.table import Table
    from rich.text import Text

    _, baselines = split_baselines(recs)
    if not baselines:
        return
    console.print()
    console.print(Text("baselines (hand-written merges, scored before the search)", style="italic"))
    table = Table(box=None, pad_edge=False)
    table.add_column("baseline", overflow="fold")
    for c in columns:
        table.add_column(c, justify="right")
    table.add_column("held-out", justify="right")
    for b in baselines:
        table.add_row(b["baseline"], *[f"{v:.4g}" for v in b.get("values") or []],
                      ", ".join(f"{v:.4g}" for v in b["heldout"]) if b.get("heldout") else "")
    console.print(table)
    line = verdict_line(meta.get("verdict"))
    if line:
        console.print(Text(line, style="bold"))


def _params_grid(groups: list[tuple[str, list[tuple[str, str]]]]):
    """A group name beside its items, so a wrapped line stays under its group (a hanging indent)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for group, members in groups:
        grid.add_row(f"{group}:" if group else "", items_text(members))
    return grid
