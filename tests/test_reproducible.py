"""The same spec, seed and worker count give the same run, whichever worker is faster; a recipe already
scored is never built again. Real Ray actors (tests/test_local_workers.py runs the same on local processes),
real Optuna (TPE with its pruner), tiny stand-in models."""

from __future__ import annotations

import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_driver import local_ray, trials_of, write_run, zoo  # noqa: E402,F401  (module fixtures)

from search.run.driver import run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

# Each call waits a random while first, so the two workers finish in a different order in every run:
# the runs may only agree if what the sampler and the pruner see does not depend on that order.
JITTER = """
import random
def jittered(model, tokenizer, fidelity):
    time.sleep(random.random() * 0.05)
    return staged()(model, tokenizer, fidelity)
def reversed_heldout(model, tokenizer, fidelity):
    return -fingerprint(model, tokenizer, fidelity)
"""

# what a run decides; timings, workers and nodes are the only things allowed to differ
DECIDED = ("trial", "baseline", "state", "values", "heldout", "params", "recipe", "reason", "duplicate_of")


def decided(run_dir: Path) -> list[dict]:
    out = []
    for r in sorted(trials_of(run_dir), key=lambda r: (r["trial"] is None, r["trial"] or 0, r.get("baseline") or "")):
        d = {k: r.get(k) for k in DECIDED}
        d["stages"] = r.get("stages")
        out.append(d)
    return out


def run_twice(zoo: Path, tmp_path: Path, trials: int) -> list[Path]:
    """One spec (jittered workers, a pruner, baselines, held-out) run twice on 2 workers; the run folders."""
    space = {"kind": "weights", "method": ["task_arithmetic", "ties"], "base": "base", "models": ["fst", "nxt"]}
    objectives = [{"kind": "custom", "function": "fns.py:jittered", "heldout_function": "fns.py:reversed_heldout",
                   "fidelities": [1, 2, 4]}]
    runs = []
    for name in ("first", "second"):
        spec = load_spec(write_run(tmp_path / name, "same", zoo, space, JITTER, objectives, trials=trials, workers=2,
                                   pruner="successive_halving", heldout_top_k=2, baselines=True,
                                   sampler={"name": "tpe", "n_startup_trials": 5}))
        run(spec, quiet=True)
        runs.append(spec.run_dir)
    return runs


def test_two_runs_of_one_spec_on_two_ray_workers_give_the_same_trials(local_ray, zoo, tmp_path):
    runs = run_twice(zoo, tmp_path, trials=14)
    first, second = (decided(d) for d in runs)
    assert [r["state"] for r in first].count("PRUNED") > 0, "the pruner must have had a say"
    assert first == second
    assert (runs[0] / "best.yaml").read_text() == (runs[1] / "best.yaml").read_text()


def test_a_recipe_already_scored_is_not_built_again_and_a_spent_space_ends_the_run(zoo, tmp_path):
    # dus of one 8-layer model with m in [1, 3]: three recipes in all
    space = {"kind": "layout", "mode": "dus", "models": ["deep"], "m": [1, 3]}
    objectives = [{"kind": "custom", "function": "fns.py:fingerprint"}]
    spec = load_spec(write_run(tmp_path, "spent", zoo, space, "", objectives, trials=10, sampler="random",
                               heldout_top_k=0, baselines=True))
    result = run(spec, quiet=True)
    recs = [r for r in trials_of(spec.run_dir) if not r.get("baseline")]
    built = [r for r in recs if r["duplicate_of"] is None]
    copies = [r for r in recs if r["duplicate_of"] is not None]
    assert len({r["recipe"] for r in built}) == len(built) == 3  # each recipe built once
    assert sum(result.counts.values()) == 3  # duplicates do not count toward the budget of 10
    # stacks of 10 to 14 layers from an 8-layer model: the first one built outgrows the worker's memory plan,
    # which the worker prints again and the trial keeps
    raised = [r["sources_plan"] for r in built if r["sources_plan"]]
    assert raised and all(re.match(r"sources [\w-]+: runtime .* = [\d.]+ GiB", p) for p in raised), raised
    assert len(copies) >= 100  # the run ended after 100 proposals in a row repeated old recipes
    by_number = {r["trial"]: r for r in trials_of(spec.run_dir)}
    for c in copies:
        original = by_number[c["duplicate_of"]]
        assert c["recipe"] == original["recipe"] and c["values"] == original["values"]
        assert c["worker"] is None and c["timings"].get("materialize_s") == []  # never sent to a worker
