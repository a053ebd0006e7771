"""Baselines in a real run: scored before the search on every stage and on held-out, never pruned,
outside the trial budget, recorded in trials.jsonl, the study and run.json, with the run's verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_fns import state_fingerprint  # noqa: E402
from test_driver import trials_of, write_run, zoo  # noqa: E402,F401  (zoo: a module fixture)

from search.study import records  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402
from search.engine.materialize import Materializer  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402
from search.results.verdict import verdict_line, winner_vs_baselines  # noqa: E402

FNS = """
def reversed_heldout(model, tokenizer, fidelity):
    return -fingerprint(model, tokenizer, fidelity)
score = staged(per_stage_penalty=0.0)
"""


@pytest.fixture(scope="module")
def baseline_run(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines")
    space = {"kind": "weights", "method": ["linear", "task_arithmetic", "ties"], "base": "base",
             "models": ["fst", "nxt"]}
    objectives = [{"kind": "custom", "function": "fns.py:score", "heldout_function": "fns.py:reversed_heldout",
                   "fidelities": [1, 2, 4]}]
    spec = load_spec(write_run(folder, "with_baselines", zoo, space, FNS, objectives, trials=6, workers=2,
                               pruner="successive_halving", sampler="random", heldout_top_k=2, baselines=True))
    result = run(spec, quiet=True)
    return spec, result


EXPECTED = ["base alone", "fst alone", "nxt alone", "linear average", "ties w=1 d=0.5"]


def test_every_baseline_is_scored_on_every_stage_and_on_held_out(baseline_run):
    spec, _ = baseline_run
    recs = {r["baseline"]: r for r in trials_of(spec.run_dir) if r.get("baseline")}
    assert sorted(recs) == sorted(EXPECTED)
    for name, r in recs.items():
        assert r["state"] == "COMPLETE", name  # never pruned
        assert [s["step"] for s in r["stages"]] == [1, 2, 4]
        assert r["heldout"] == [pytest.approx(-r["values"][0])]


def test_a_baseline_scores_what_its_recipe_builds(baseline_run, zoo):
    spec, _ = baseline_run
    fst = next(r for r in trials_of(spec.run_dir) if r.get("baseline") == "fst alone")
    model = Materializer(spec.models).materialize(recipes.loads(fst["recipe"]))
    assert fst["values"][0] == state_fingerprint(model.state_dict())
    assert state_fingerprint(model.state_dict()) == state_fingerprint(
        Materializer(spec.models).materialize(recipes.loads("merge_method: passthrough\nmodels:\n  - model: fst\n")).state_dict())


def test_baselines_in_the_space_teach_the_study_but_do_not_count_as_trials(baseline_run):
    spec, result = baseline_run
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    marked = {t.user_attrs[records.BASELINE_ATTR]: t for t in study.trials if records.BASELINE_ATTR in t.user_attrs}
    # the points of this space among them: the linear average and TIES (weights 1, density 0.5)
    assert sorted(marked) == ["linear average", "ties w=1 d=0.5"]
    assert marked["ties w=1 d=0.5"].params == {"method": "ties", "weight.fst": 1.0, "density.fst": 0.5,
                                               "weight.nxt": 1.0, "density.nxt": 0.5}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in marked.values())
    searched = [t for t in study.trials if records.BASELINE_ATTR not in t.user_attrs]
    assert len(searched) == 6  # the budget counts the search's trials only
    assert sum(result.counts.values()) == 6


def test_run_json_names_the_winner_against_the_best_baseline(baseline_run):
    spec, result = baseline_run
    meta = records.read_json(spec.run_dir / "run.json")
    assert sorted(meta["baselines"]) == sorted(EXPECTED)
    v = meta["verdict"]
    assert v["winner"] == result.best["trial"] and v["split"] == "held-out"
    best = max(meta["baselines"], key=lambda n: meta["baselines"][n]["heldout"][0])
    assert v["best_baseline"] == best
    assert v["difference"] == pytest.approx(v["winner_score"] - meta["baselines"][best]["heldout"][0])
    assert v["ci95"] is None  # a custom objective keeps no per-example results


def test_the_verdict_says_plainly_when_the_search_did_not_win():
    recs = [{"trial": 0, "state": "COMPLETE", "recipe": "x", "values": [0.5], "heldout": [0.6], "params": {}}]
    baselines = {"ties": {"values": [0.7], "heldout": [0.7]}, "avg": {"values": [0.4], "heldout": [0.65]}}
    v = winner_vs_baselines(recs, ["maximize"], baselines, {})
    assert v["best_baseline"] == "ties" and v["difference"] == pytest.approx(-0.1) and not v["beats"]
    assert verdict_line(v).startswith("the search did not beat the best baseline (ties)")
    v = winner_vs_baselines(recs, ["minimize"], baselines, {})  # lower is better: the winner's 0.6 wins
    assert v["best_baseline"] == "avg" and v["difference"] == pytest.approx(0.05) and v["beats"]
    assert verdict_line(v).startswith("the winner (trial 0) beats the best baseline (avg)")


def test_the_winner_and_the_best_search_score_are_named_apart_and_alike_everywhere(baseline_run):
    spec, result = baseline_run
    meta = records.read_json(spec.run_dir / "run.json")
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    recs = [r for r in trials_of(spec.run_dir) if not r.get("baseline") and r["state"] == "COMPLETE"]
    top_search = max(recs, key=lambda r: (r["values"][0], -r["trial"]))
    assert meta["best_search_score"]["trial"] == study.user_attrs["best_search_score"]["trial"] == top_search["trial"]
    winner = meta["winner"]
    assert winner == study.user_attrs["winner"] == result.best["trial"] == meta["verdict"]["winner"]
    assert f"trial {winner}:" in (spec.run_dir / "best.yaml").read_text().splitlines()[0]
    assert study.metric_names == meta["objectives"] == ["score"]


def test_baselines_are_scored_first_timed_as_trials_and_utilization_stays_at_most_one(baseline_run):
    spec, _ = baseline_run
    recs = trials_of(spec.run_dir)
    baselines, searched = [r for r in recs if r.get("baseline")], [r for r in recs if not r.get("baseline")]
    first = min(r["timings"]["dispatched"] for r in searched)
    for b in baselines:
        assert b["timings"]["finished"] <= first and b["worker"] in ("w0", "w1"), b["baseline"]
        assert b["timings"]["busy_s"] > 0 and len(b["timings"]["materialize_s"]) == 1
    util = records.read_json(spec.run_dir / "run.json")["utilization"]
    assert 0 < util["utilization"] <= 1 and all(0 < w["utilization"] <= 1 for w in util["workers"].values())
