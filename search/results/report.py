"""A run's report: PNG plots and one self-contained report.html in RUN_DIR/report/.

Written at the end of every run (search/run/driver.py) and by `mergesearch report
RUN_DIR`. It reads the run folder only: run.json and trials.jsonl, plus the study
when it opens (for fANOVA importances; search/results/importance.py says what happens
without it). The plots are search/results/report_plots.py; the summary table is the one
`mergesearch show` prints (search/results/summary.py). report.html embeds the plots as
data URIs, so the one file can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from search.results import export, run_folder, summary, winner
from search.engine import recipe as recipes

# file stem -> (heading, what the picture shows, plot function name in report_plots)
PLOTS = (
    ("history", "Optimization history", "history"),
    ("importance", "Parameter importance", "importances"),
    ("stages", "Stage scores and pruning", "stages"),
    ("t_curves", "Slerp t-curves of the top trials", "t_curves"),
    ("layer_map", "The winner's layers", "layer_map"),
    ("pareto", "Pareto front", "pareto"),
)


@dataclass
class RunView:
    """What the plots read: the run's settings and records, trials and baselines apart."""

    run_dir: Path
    meta: dict[str, Any]
    trials: list[dict]
    baselines: list[dict]
    top: list[dict]  # complete trials, best first (by held-out score where there is one)
    front: list[dict]  # the Pareto front (several objectives), else empty
    winner: dict | None
    notes: dict[str, str] = field(default_factory=dict)  # said under a plot (e.g. how importances were computed)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def objectives(self) -> list[str]:
        return self.meta["objectives"]

    @property
    def directions(self) -> list[str]:
        return self.meta["directions"]

    def depth_resolver(self, stages):
        from search.results import recipe_layers

        return recipe_layers.depth_resolver(stages, self.meta.get("model_paths") or {})

    @property
    def slerp_ends(self) -> tuple[str, str] | None:
        """(t = 0 model, t = 1 model) when the winner has exactly one slerp stage."""
        if not self.winner:
            return None
        slerps = [s for s in recipes.loads(self.winner["recipe"]) if getattr(s, "merge_method", "") == "slerp"]
        if len(slerps) != 1 or not slerps[0].models:
            return None
        base = slerps[0].base_model
        other = next((m.model for m in slerps[0].models if m.model != base), None)
        return (base, other) if base and other else None


def load_view(run_dir: Path) -> RunView:
    meta, recs = run_folder.load_run(run_dir)
    trials, baselines = summary.split_baselines(recs)
    # run.json names every baseline with its scores too; take those trials.jsonl does not have
    listed = {b["baseline"] for b in baselines}
    for name, b in (meta.get("baselines") or {}).items():
        if name not in listed and b.get("values"):
            baselines.append({"baseline": name, "trial": b.get("trial"), "values": b["values"],
                              "heldout": b.get("heldout")})
    directions = meta["directions"]
    return RunView(
        run_dir=Path(run_dir),
        meta=meta,
        trials=trials,
        baselines=baselines,
        top=winner.rank(trials, directions),
        front=winner.pareto(trials, directions) if len(directions) > 1 else [],
        winner=winner.winner(trials, directions),
    )


def write_report(run_dir: Path) -> Path:
    """Draw every plot that applies into RUN_DIR/report/ and write report.html; returns its path."""
    from search.results import report_plots
    import matplotlib.pyplot as plt

    view = load_view(run_dir)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()  # a plot that no longer applies must not linger from an earlier report
    sections = []
    for stem, heading, fn_name in PLOTS:
        draw: Callable = getattr(report_plots, fn_name)
        try:
            fig = draw(view)
        except report_plots.NotApplicable as e:
            sections.append((heading, None, f"Not drawn: {e}."))
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        (out / f"{stem}.png").write_bytes(buf.getvalue())
        sections.append((heading, buf.getvalue(), view.notes.get(stem, "")))
    page = out / "report.html"
    page.write_text(_html(view, sections))
    return page


# ---- HTML ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.winner { background: #eef8ee; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.note { color: #555; font-style: italic; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _settings(view: RunView) -> str:
    meta = view.meta
    steps = [s for s in meta.get("stages") or [] if s is not None]
    rows = [
        ("run", meta["name"]),
        ("spec", meta.get("spec") or "-"),
        ("storage", meta.get("storage") or "-"),
        ("objectives", ", ".join(f"{n} ({d})" for n, d in zip(view.objectives, view.directions))),
        ("fidelity stages", ", ".join(map(str, steps)) or "none"),
        ("seed", meta.get("seed")),
        ("baselines", ", ".join(b["baseline"] for b in view.baselines) or "none in this run"),
    ]
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _counts(view: RunView) -> str:
    cells = "".join(f"<tr><td>{label}</td><td>{n}</td></tr>" for label, n in summary.counts(view.trials).items())
    return f"<table><tr><th>trials</th><th>count</th></tr>{cells}</table>"


def _table(view: RunView) -> str:
    s = summary.build(view.meta, view.trials + view.baselines, top=10)
    if not s.rows:
        return "<p>No trial completed: trials.jsonl says why each failed or was pruned.</p>"
    head = "<tr><th>trial</th>" + "".join(f"<th>{_e(c)}</th>" for c in s.columns)
    head += "<th>held-out</th>" if s.has_heldout else ""
    head += "<th>parameters</th></tr>"
    body = ""
    for r in s.rows:
        cls = ' class="winner"' if r.is_winner else ""
        cells = f"<td class=num>{r.trial}{' (winner)' if r.is_winner else ''}</td>"
        cells += "".join(f"<td class=num>{_e(v)}</td>" for v in r.values)
        cells += f"<td class=num>{_e(r.heldout or '')}</td>" if s.has_heldout else ""
        lines = [(f"{group}: " if group else "") + summary.items_text(members) for group, members in r.params]
        cells += "<td>" + "<br>".join(_e(line) for line in lines) + "</td>"
        body += f"<tr{cls}>{cells}</tr>"
    return f"<p>{_e(s.caption)}</p><table>{head}{body}</table>"


def _winner_yaml(view: RunView) -> str:
    best = view.run_dir / "best.yaml"
    if best.is_file():
        return f"<p>best.yaml</p><pre>{_e(best.read_text())}</pre>"
    if view.winner:
        name = f"trial-{view.winner['trial']}.yaml"
        path = view.run_dir / "pareto" / name
        text = path.read_text() if path.is_file() else export.recipe_text(view.winner, view.meta, name)
        return f"<p>pareto/{name} (the front's best on {_e(view.objectives[0])})</p><pre>{_e(text)}</pre>"
    return "<p>No trial completed.</p>"


def _html(view: RunView, sections: list[tuple[str, bytes | None, str]]) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>mergesearch report: {_e(view.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>mergesearch report: {_e(view.name)}</h1>",
        _settings(view),
        "<h2>Trials</h2>",
        _counts(view),
        _table(view),
    ]
    for heading, png, note in sections:
        parts.append(f"<h2>{_e(heading)}</h2>")
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<img alt="{_e(heading)}" src="data:image/png;base64,{data}">')
        if note:
            parts.append(f"<p class=note>{_e(note)}</p>")
    parts += ["<h2>The winner's YAML</h2>", _winner_yaml(view), "</body></html>"]
    return "\n".join(parts)
