"""`mergesearch report` and `mergesearch show` on real tiny runs.

Three runs, built once for the module with real worker processes, real Optuna storage and the
stand-in models of test_driver.py, cover what a report draws differently:

- staged: one objective in stages with a pruner and held-out scores; a slerp
  stage composed with a passthrough layout (t-curves, a layer map of an
  intermediate, pruned trials);
- flat: one objective without stages; block expansion (copied blocks with scaled
  outputs) whose deep stacks fail (failed trials);
- pareto: two objectives (a Pareto front), a depth up-scaled layout.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from test_driver import write_run, zoo  # noqa: E402,F401  (zoo: a module fixture)

from search.study import records  # noqa: E402
from search.commands.cli import main as cli_main  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

STAGED = {
    "space": {"kind": "compose", "stages": [
        {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 3},
        {"kind": "layout", "mode": "dus", "models": ["blend"], "m": [1, 3]},
    ]},
    "fns": """
        import math

        def score(model, tokenizer, fidelity):  # stage scores that differ, as on a real eval's subsets
            f = fingerprint(model, tokenizer, fidelity)
            return f + 2 * math.sin(3 * f + fidelity)

        def reversed_heldout(model, tokenizer, fidelity):
            return -fingerprint(model, tokenizer, fidelity)
    """,
    "objectives": [{"kind": "custom", "function": "fns.py:score", "heldout_function": "fns.py:reversed_heldout",
                    "fidelities": [1, 2, 4]}],
    "spec": {"trials": 10, "pruner": "successive_halving", "sampler": "random", "heldout_top_k": 2},
}
FLAT = {
    "space": {"kind": "expansion", "model": "base", "placement": ["end", "every"], "count": [1, 2],
              "every": [2, 4], "scale": [0.0, 0.5]},
    "fns": "score = fail_when(lambda model: model.config.num_hidden_layers > 5)\n",
    "objectives": [{"kind": "custom", "function": "fns.py:score"}],
    "spec": {"trials": 8, "sampler": "random", "heldout_top_k": 0},
}
PARETO = {
    "space": {"kind": "layout", "mode": "dus", "models": ["deep", "deep2"]},
    "fns": """
        import math

        def depth(model, tokenizer, fidelity):  # deeper is better, against the cost in layers: a real front
            return model.config.num_hidden_layers + 3 * math.sin(fingerprint(model, tokenizer, fidelity))
    """,
    "objectives": [{"kind": "custom", "function": "fns.py:depth"}, {"kind": "cost", "measure": "layers"}],
    "spec": {"trials": 8, "sampler": "nsga2", "heldout_top_k": 0},
}
RUNS = {"staged": STAGED, "flat": FLAT, "pareto": PARETO}


def build_runs(root: Path, zoo: Path) -> dict[str, Path]:
    """Run the three searches (quietly); the driver writes each run's report at its end."""
    out = {}
    for name, r in RUNS.items():
        # a folder each: a run's fns.py is imported once per path, so runs must not share one
        spec = load_spec(write_run(root / name, name, zoo, r["space"], r["fns"], r["objectives"], **r["spec"]))
        run(spec, quiet=True)
        out[name] = spec.run_dir
    return out


@pytest.fixture(scope="module")
def runs(zoo, tmp_path_factory) -> dict[str, Path]:
    return build_runs(tmp_path_factory.mktemp("report_runs"), zoo)


def trials_of(run_dir: Path) -> list[dict]:
    return records.read_trials(run_dir / "trials.jsonl")


# ---- the report -------------------------------------------------------------------------------


EXPECTED_PLOTS = {
    "staged": {"history", "importance", "stages", "t_curves", "layer_map"},
    "flat": {"history", "importance", "layer_map"},
    "pareto": {"history", "layer_map", "pareto"},  # one parameter (m): no importance to compare
}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_plot_that_applies_is_a_real_picture(runs, name):
    report = runs[name] / "report"
    pngs = {p.stem: p for p in report.glob("*.png")}
    assert set(pngs) == EXPECTED_PLOTS[name]
    for stem, path in pngs.items():
        with Image.open(path) as im:
            im.verify()  # a whole, valid PNG
        with Image.open(path) as im:
            width, height = im.size
            pixels = np.asarray(im.convert("L"), dtype=np.float64)
        assert 400 <= width <= 3000 and 250 <= height <= 3000, (stem, im.size)
        assert pixels.std() > 10, f"{stem}.png is (nearly) blank"


@pytest.mark.parametrize("name", list(RUNS))
def test_the_html_embeds_every_plot_the_yaml_and_the_counts(runs, name):
    run_dir = runs[name]
    page = (run_dir / "report" / "report.html").read_text()
    assert "src=\"file:" not in page and ".png\"" not in page  # self-contained: nothing read from disk
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(EXPECTED_PLOTS[name])
    recs = trials_of(run_dir)
    for state, label in (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed")):
        count = sum(r["state"] == state for r in recs)
        assert re.search(rf"<td>{label}</td><td>{count}</td>", page), (label, count)
    winner = run_dir / "best.yaml" if name != "pareto" else None
    if winner:
        assert html.escape(winner.read_text()) in page
    else:
        assert "merge_method: passthrough" in page


def test_plots_that_do_not_apply_are_named_with_a_reason(runs):
    flat = (runs["flat"] / "report" / "report.html").read_text()
    assert "no fidelity stages" in flat and "no slerp" in flat and "one objective" in flat
    pareto = (runs["pareto"] / "report" / "report.html").read_text()
    assert "several objectives" in pareto and "only one parameter (m)" in pareto


def test_every_searched_parameter_is_drawn_or_named_with_the_reason_it_is_not(runs):
    from search.results import importance
    from search.results.report import load_view

    view = load_view(runs["flat"])
    imp = importance.compute(view.run_dir, view.meta, view.trials)
    drawn = {p for per in imp.values.values() for p in per}
    searched = {k for r in view.trials for k in r["params"]}
    assert drawn | set(imp.left_out) == searched and not drawn & set(imp.left_out)
    assert {"count", "every"} <= set(imp.left_out)  # asked only by the trials placed at the end / every k
    page = html.unescape((runs["flat"] / "report" / "report.html").read_text())
    for p, why in imp.left_out.items():
        assert f"Not drawn: {p}: {why}" in page


def test_the_runs_pruned_failed_and_rescored_trials_and_fanova_read_the_study(runs):
    staged, flat = trials_of(runs["staged"]), trials_of(runs["flat"])
    assert any(r["state"] == "PRUNED" for r in staged) and any(r.get("heldout") for r in staged)
    assert any(r["state"] == "FAIL" for r in flat)
    page = (runs["staged"] / "report" / "report.html").read_text()
    assert "fANOVA" in page  # importances from the study itself


def test_report_command_rebuilds_from_the_run_folder_alone(runs, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(runs["staged"], moved)
    (moved / "study.db").unlink()  # no study: importances fall back to the records
    shutil.rmtree(moved / "report")
    assert cli_main(["report", str(moved)]) == 0
    assert str(moved / "report" / "report.html") in capsys.readouterr().out
    page = (moved / "report" / "report.html").read_text()
    assert "rank correlation" in page and len(list((moved / "report").glob("*.png"))) == 5


def test_baseline_records_are_drawn_as_lines_not_counted_as_trials(runs, tmp_path):
    from search.results import report_plots
    from search.results.report import load_view

    moved = tmp_path / "with_baseline"
    shutil.copytree(runs["flat"], moved)
    recs = trials_of(moved)
    best = max((r for r in recs if r["state"] == "COMPLETE"), key=lambda r: r["values"][0])
    baseline = {**best, "trial": None, "baseline": "plain average", "params": {},
                "values": [best["values"][0] * 0.5]}
    with open(moved / "trials.jsonl", "a") as f:
        f.write(json.dumps(baseline) + "\n")
    view = load_view(moved)
    assert [b["baseline"] for b in view.baselines] == ["plain average"]
    assert all(isinstance(r["trial"], int) for r in view.trials)
    fig = report_plots.history(view)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("plain average" in label for label in labels)


@pytest.mark.parametrize("bad", ["missing", "not_a_run"])
def test_report_and_show_refuse_a_folder_that_is_not_a_run_in_one_line(bad, tmp_path, capsys):
    folder = tmp_path / bad
    if bad == "not_a_run":
        folder.mkdir()
    for command in ("report", "show"):
        assert cli_main([command, str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a run folder" in err


# ---- show and the end-of-run summary -------------------------------------------------------------


def show_text(run_dir: Path, width: int = 80) -> str:
    """What `mergesearch show` prints on a terminal `width` columns wide."""
    from rich.console import Console

    from search.results import summary

    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    summary.render(run_dir, console)
    return console.export_text()


@pytest.mark.parametrize("name", list(RUNS))
def test_show_fits_80_columns_and_lists_the_files(runs, name):
    run_dir = runs[name]
    text = show_text(run_dir)
    assert max(len(line) for line in text.splitlines()) <= 80
    for entry in ("trials.jsonl", "run.json", "study.db", "report/"):
        assert re.search(rf"^\s*{re.escape(entry)}\s+\S", text, re.M), entry
    assert ("pareto/" if name == "pareto" else "best.yaml") in text
    recs = trials_of(run_dir)
    counts = {s: sum(r["state"] == s for r in recs) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed" in text


def test_show_prints_every_parameter_of_the_winner_in_full(runs):
    from search.results import summary, winner

    run_dir = runs["staged"]
    text = show_text(run_dir)
    flat_text = re.sub(r"\s+", "", text)  # wrapped lines joined: nothing was cut
    meta = records.read_json(run_dir / "run.json")
    best = winner.winner(trials_of(run_dir), meta["directions"])
    for group, items in summary.param_groups(best["params"]):
        for key, value in items:
            assert re.sub(r"\s+", "", f"{key}={value}") in flat_text
    # the slerp anchors are shown as one list per filter, under the stage's prefix
    assert re.search(r"blend:\s+t\.self_attn=\[", text)
    assert "..." not in text


def test_the_end_of_run_summary_is_the_same_table_and_lists_the_files(runs):
    from rich.console import Console

    from search.results import summary

    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    summary.render(runs["staged"], console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "trials.jsonl" in text and "best.yaml" in text and "report/" in text
    assert "..." not in text


# ---- the command line ------------------------------------------------------------------------------


def test_version_and_help_describe_the_tool(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and version("mergesearch") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    top = capsys.readouterr().out
    assert "mergesearch demo" in top
    for command in ("run", "export", "zoo", "demo", "report", "show", "merge"):
        assert re.search(rf"^\s+{command}\s+\S", top, re.M), command
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        sub = capsys.readouterr().out
        description = sub.split("\n\n")[1]  # argparse: usage, blank line, description
        assert not description.lstrip().startswith(("positional arguments", "options")), command


def test_the_history_shows_the_trials_and_the_best_baselines_not_squeezed_by_far_ones(tmp_path):
    """Baselines far from the trials (a base model alone) and weak pruned trials fall off the scale, named in
    the legend, so the trials and the best baselines fill the view."""
    from search.results.report import RunView
    from search.results import report_plots

    trials = [{"trial": t, "state": "COMPLETE", "values": [1.5 - 0.01 * t], "params": {}} for t in range(10)]
    trials += [{"trial": 10, "state": "PRUNED", "values": [8.0], "params": {}}]
    baselines = [{"baseline": name, "values": [v]} for name, v in
                 (("base alone", 12.77), ("ties", 1.59), ("average", 2.99), ("slerp", 2.62), ("cnt alone", 12.5))]
    view = RunView(run_dir=tmp_path, meta={"name": "r", "objectives": ["loss"], "directions": ["minimize"]},
                   trials=trials, baselines=baselines, top=[], front=[], winner=None)
    fig = report_plots.history(view)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo < 1.41 and 2.99 < hi < 4  # every trial and the three best baselines, and no more than a margin
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "baseline: base alone (12.77, off the scale above)" in labels
    assert "baseline: cnt alone (12.5, off the scale above)" in labels
    assert "pruned (1), off the scale above" in labels
    assert "baseline: ties (1.59)" in labels
