"""The search driver end to end: real Optuna storage, real local worker processes, tiny stand-in models,
real mergekit.

The sweeps (one per space) run first in a
module fixture; their winners are rebuilt by mergekit's own commands in one
subprocess, and each must equal, tensor for tensor, what the worker scored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import assert_same_tensors  # noqa: E402
from search_fns import PROBE, state_fingerprint  # noqa: E402
from standins import make_finetune, make_standin  # noqa: E402

from search.results import winner  # noqa: E402

from search.study import records
from search.engine import recipe as recipes  # noqa: E402
from search.commands.cli import main as cli_main  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.engine.errors import UserError  # noqa: E402
from search.engine.materialize import Materializer  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray started for the module, which runs then use (Ray actors) instead of local processes."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a Ray found running
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A llama base, three fine-tunes of it, and an 8-layer model for layouts."""
    root = tmp_path_factory.mktemp("zoo")
    make_standin(root / "base", "llama", 4, seed=0)
    for seed, name in enumerate(("fst", "nxt", "cnt"), start=1):
        make_finetune(root / name, root / "base", seed=seed, scale=0.05)
    make_standin(root / "deep", "llama", 8, seed=5)
    make_finetune(root / "deep2", root / "deep", seed=6, scale=0.05)
    return root


MODELS = ("base", "fst", "nxt", "cnt", "deep", "deep2")


def write_run(folder: Path, name: str, zoo: Path, space: dict, fns: str, objectives: list[dict], **spec) -> Path:
    """A run folder: fns.py (binding test score functions) and NAME.yaml; returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fns.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom search_fns import *\n" + textwrap.dedent(fns)
    )
    data = {
        "models": {m: str(zoo / m) for m in MODELS},
        "space": space,
        "objectives": objectives,
        "workers": 1,
        "seed": 0,
        "baselines": False,  # tests/test_baselines.py runs with them
        **spec,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trials_of(run_dir: Path) -> list[dict]:
    return records.read_trials(run_dir / "trials.jsonl")


FINGERPRINT = [{"kind": "custom", "function": "fns.py:fingerprint"}]

# One sweep per space. Each winner is rebuilt by mergekit and compared with what the worker scored.
SWEEPS = {
    "weights": {"kind": "weights", "method": ["task_arithmetic", "ties", "dare_ties"], "base": "base",
                "models": ["fst", "nxt"], "weight": [0.2, 1.0]},
    "slerp": {"kind": "slerp", "models": ["fst", "nxt"], "anchors": 3},
    "layout": {"kind": "layout", "mode": "dus", "models": ["deep", "deep2"]},
    "expansion": {"kind": "expansion", "model": "base", "placement": ["end", "every"], "count": [1, 2],
                  "every": [2, 4], "scale": [0.0, 0.5]},
    "moe": {"kind": "moe", "base": "base", "models": ["fst", "nxt", "cnt"], "gate_mode": ["hidden", "random"],
            "prompts": {"fst": ["fst:ab", "first"], "nxt": ["nxt:ab"], "cnt": ["cnt:ab", "count"]}},
    "compose": {"kind": "compose", "stages": [
        {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
        {"kind": "layout", "mode": "dus", "models": ["blend"], "m": [1, 3]},
    ]},
}

REBUILD = """
import json, sys
from mergekit.scripts.run_yaml import main as mergekit_yaml
from mergekit.scripts.moe import main as mergekit_moe
from mergekit.scripts.multimerge import main as mergekit_multi
for command, recipe, out, seed in json.loads(sys.argv[1]):
    common = ["--random-seed", str(seed)]
    if command == "mergekit-yaml":
        mergekit_yaml([recipe, out, *common], standalone_mode=False)
    elif command == "mergekit-moe":
        mergekit_moe([recipe, out, *common], standalone_mode=False)
    else:
        mergekit_multi([recipe, "--out-path", out, "--intermediate-dir", out + "-parts", *common],
                       standalone_mode=False)
"""


@pytest.fixture(scope="module")
def sweeps(zoo, tmp_path_factory) -> dict[str, Path]:
    """Run every sweep, then rebuild every best.yaml with mergekit's own commands (one subprocess)."""
    root = tmp_path_factory.mktemp("sweeps")
    run_dirs, jobs = {}, []
    for kind, space in SWEEPS.items():
        spec = load_spec(write_run(root, kind, zoo, space, "", FINGERPRINT, trials=5, heldout_top_k=0))
        result = run(spec, quiet=True)
        assert result.counts["complete"] >= 1, trials_of(spec.run_dir)
        run_dirs[kind] = spec.run_dir
        # best.yaml names the models publicly (here: by alias); mergekit reads this machine's folders
        best = spec.run_dir / "best.local.yaml"
        assert cli_main(["export", str(spec.run_dir), "--local-paths", str(best)]) == 0
        rebuild = next(line for line in best.read_text().splitlines() if line.startswith("# rebuild: "))
        command = rebuild.split()[2]  # "# rebuild: mergekit-... best.local.yaml ..."
        jobs.append((command, str(best), str(spec.run_dir / "rebuilt"), 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", REBUILD, json.dumps(jobs)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dirs


def rebuilt_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", list(SWEEPS))
def test_sweep_winner_rebuilt_by_mergekit_is_what_the_worker_scored(kind, sweeps, zoo):
    import transformers

    run_dir = sweeps[kind]
    meta = records.read_json(run_dir / "run.json")
    recs = trials_of(run_dir)
    best = winner.rank(recs, meta["directions"])[0]
    assert best["trial"] == max(winner.complete(recs), key=lambda r: r["values"][0])["trial"]
    # 1. the score the worker gave is a fingerprint of the exact weights it scored: mergekit's model has them too
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "rebuilt", dtype="auto")
    assert state_fingerprint(rebuilt.state_dict()) == pytest.approx(best["values"][0], rel=1e-12, abs=1e-9)
    # 2. tensor for tensor: mergekit's files against the engine's state_dict of the recipe the trial stored
    stages = recipes.loads(best["recipe"])
    _, ours = Materializer({m: zoo / m for m in MODELS}).state_dict(stages, seed=0)
    assert_same_tensors(ours, rebuilt_tensors(run_dir / "rebuilt"), f"{kind} trial {best['trial']}")


def test_a_sweep_writes_every_trial_with_recipe_stages_timings_and_worker(sweeps):
    recs = trials_of(sweeps["slerp"])
    assert [r["trial"] for r in recs] == list(range(5))
    for r in recs:
        assert r["state"] == "COMPLETE" and r["worker"] == "w0" and r["attempts"] == 1
        assert recipes.loads(r["recipe"])[0].merge_method == "slerp"
        assert r["stages"] == [{"step": None, "scores": {"fingerprint": r["values"][0]}}]
        assert r["timings"]["busy_s"] > 0 and len(r["timings"]["materialize_s"]) == 1
        assert set(r["params"]) == {f"t.{c}.{j}" for c in ("self_attn", "mlp", "rest") for j in range(3)}


def test_the_composed_winner_is_a_multi_document_recipe(sweeps):
    text = (sweeps["compose"] / "best.yaml").read_text()
    assert "mergekit-multi" in text.splitlines()[1]
    stages = recipes.loads(text)
    assert [s.merge_method for s in stages] == ["slerp", "passthrough"] and stages[0].name == "blend"


def test_an_existing_study_needs_resume_and_resume_needs_a_study(sweeps, zoo, tmp_path):
    spec = load_spec(sweeps["slerp"].parent / "slerp.yaml")
    with pytest.raises(UserError, match="already exists.*pass --resume"):
        run(spec, quiet=True)
    fresh = load_spec(write_run(tmp_path, "fresh", zoo, SWEEPS["slerp"], "", FINGERPRINT, trials=1))
    with pytest.raises(UserError, match="--resume: no study named 'fresh'"):
        run(fresh, resume=True, quiet=True)
    assert not fresh.run_dir.exists()


def test_export_command_writes_a_trial_or_the_top_k(sweeps, tmp_path, capsys):
    run_dir = sweeps["weights"]
    assert cli_main(["export", str(run_dir), "--trial", "2", str(tmp_path / "t2.yaml")]) == 0
    stored = recipes.loads(trials_of(run_dir)[2]["recipe"])[0]
    written = recipes.load(tmp_path / "t2.yaml")[0]
    assert written.merge_method == stored.merge_method
    assert [m.parameters for m in written.models] == [m.parameters for m in stored.models]
    assert {m.model for m in written.models} <= {"base", "fst", "nxt"}  # public names: here, the aliases
    assert cli_main(["export", str(run_dir), "--trial", "2", "--local-paths", str(tmp_path / "t2.local.yaml")]) == 0
    local = recipes.load(tmp_path / "t2.local.yaml")[0]
    assert all(Path(m.model).is_dir() for m in local.models)  # aliases became folders mergekit can read
    assert cli_main(["export", str(run_dir), "--top", "3", str(tmp_path / "top")]) == 0
    assert len(list((tmp_path / "top").glob("trial-*.yaml"))) == 3
    assert cli_main(["export", str(run_dir), "--trial", "99"]) == 2
    assert "--trial 99: no such trial" in capsys.readouterr().err


# ---- stages, pruning, held-out, enqueue, constraints, failures ---------------------------------


def test_stages_prune_on_the_resident_candidate_and_held_out_changes_the_pick(zoo, tmp_path):
    """Fidelity stages with the median pruner; held-out scores that rank the top trials the other way round."""
    known = tmp_path / "known.yaml"
    known.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                     "  - {model: fst, parameters: {weight: 0.5}}\n  - {model: nxt, parameters: {weight: 0.25}}\n")
    fns = """
        def reversed_heldout(model, tokenizer, fidelity):
            return -fingerprint(model, tokenizer, fidelity)
        score = staged(per_stage_penalty=0.0)
    """
    objectives = [{"kind": "custom", "function": "fns.py:score", "heldout_function": "fns.py:reversed_heldout",
                   "fidelities": [1, 2, 4]}]
    space = {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]}
    # random sampling: TPE would climb this (linear) score so steadily that the median might stop nothing
    spec = load_spec(write_run(tmp_path, "staged", zoo, space, fns, objectives, trials=14, workers=2,
                               pruner="median", sampler="random", heldout_top_k=3, enqueue=["known.yaml"]))
    result = run(spec, quiet=True)
    recs = trials_of(spec.run_dir)
    assert len(recs) == 14 and result.counts["complete"] + result.counts["pruned"] == 14
    # the enqueued recipe is trial 0, exactly
    assert recs[0]["params"] == {"weight.fst": 0.5, "weight.nxt": 0.25}
    study = optuna.load_study(study_name="staged", storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    pruned = [r for r in recs if r["state"] == "PRUNED"]
    assert pruned, "the median pruner stopped nothing"
    for r in recs:
        t = study.trials[r["trial"]]
        assert len(r["timings"]["materialize_s"]) == 1  # built once, scored stage by stage
        steps = [s["step"] for s in r["stages"]]
        if r["state"] == "COMPLETE":
            assert steps == [1, 2, 4] and sorted(t.intermediate_values) == [1, 2]
        else:
            assert steps in ([1], [1, 2]) and r["reason"].startswith("pruned after stage")
            assert sorted(t.intermediate_values) == steps
    # held-out: the top 3 by search score are re-scored; the pick goes by held-out score
    complete = sorted(winner.complete(recs), key=lambda r: -r["values"][0])
    rescored = [r for r in recs if r["heldout"] is not None]
    assert sorted(r["trial"] for r in rescored) == sorted(r["trial"] for r in complete[:3])
    for r in rescored:
        assert r["heldout"][0] == pytest.approx(-r["values"][0])
    best_text = (spec.run_dir / "best.yaml").read_text()
    assert f"trial {complete[2]['trial']}:" in best_text.splitlines()[0]  # lowest search score of the 3
    assert result.best["trial"] == complete[2]["trial"] != complete[0]["trial"]


def test_the_paired_pruner_needs_an_objective_that_reports_its_examples(zoo, tmp_path):
    objectives = [{"kind": "custom", "function": "fns.py:fingerprint", "fidelities": [1, 2, 4]}]
    space = {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]}
    spec = load_spec(write_run(tmp_path, "paired", zoo, space, "", objectives, trials=2, pruner="paired"))
    with pytest.raises(UserError, match="pruner: paired .* only the lmeval objective reports .* successive_halving"):
        run(spec, quiet=True)
    assert not spec.run_dir.exists()


def test_constraints_prune_before_building_and_failures_are_recorded(zoo, tmp_path):
    """A free layout under max_layers (pruned, never built), an objective that raises on deep stacks (FAIL),
    on a journal-file storage."""
    fns = """
        score = fail_when(lambda model: model.config.num_hidden_layers > 5)
    """
    space = {"kind": "layout", "mode": "free", "models": ["deep", "deep2"], "slices": [1, 3], "length": [1, 4],
             "max_layers": 8}
    objectives = [{"kind": "custom", "function": "fns.py:score"}]
    journal = tmp_path / "journal" / "study.log"
    spec = load_spec(write_run(tmp_path, "free", zoo, space, fns, objectives, trials=24,
                               storage=f"journal:{journal}", sampler="random", heldout_top_k=0))
    result = run(spec, quiet=True)
    recs = trials_of(spec.run_dir)
    assert len(recs) == 24 and journal.is_file() and not (spec.run_dir / "study.db").exists()
    by_state = {s: [r for r in recs if r["state"] == s] for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert by_state["PRUNED"] and by_state["FAIL"] and by_state["COMPLETE"], [r["state"] for r in recs]
    for r in by_state["PRUNED"]:
        assert r["recipe"] is None and r["worker"] is None  # rejected before a worker saw it
        assert "layers" in r["reason"] or "starts at layer" in r["reason"]
    for r in by_state["FAIL"]:
        assert r["reason"] == "RuntimeError: this candidate cannot be scored" and r["recipe"]
        assert sum(e - s for s, e in _layout(r)) > 5
    for r in by_state["COMPLETE"]:
        assert sum(e - s for s, e in _layout(r)) <= 5
    assert result.counts == {"complete": len(by_state["COMPLETE"]), "pruned": len(by_state["PRUNED"]),
                             "failed": len(by_state["FAIL"])}


def _layout(record: dict) -> list[tuple[int, int]]:
    stage = recipes.loads(record["recipe"])[0]
    return [tuple(s.sources[0].layer_range) for s in stage.slices]


def test_several_objectives_make_a_pareto_front(zoo, tmp_path):
    space = {"kind": "layout", "mode": "dus", "models": ["deep"]}
    objectives = FINGERPRINT + [{"kind": "cost", "measure": "layers"}]
    spec = load_spec(write_run(tmp_path, "pareto", zoo, space, "", objectives, trials=8, sampler="nsga2",
                               pruner="hyperband", heldout_top_k=0))
    result = run(spec, quiet=True)
    recs = trials_of(spec.run_dir)
    front = winner.pareto(recs, ["maximize", "minimize"])
    files = sorted((spec.run_dir / "pareto").glob("trial-*.yaml"))
    assert [f.name for f in files] == sorted(f"trial-{r['trial']}.yaml" for r in front) and files
    assert not (spec.run_dir / "best.yaml").exists()
    for r in recs:  # no pruning in a multi-objective study: one stage, both objectives at once
        assert r["state"] == "COMPLETE" and list(r["stages"][0]["scores"]) == ["fingerprint", "layers"]
    # dus of one 8-layer model has 7 points (m = 1..7): each is built once, whatever the budget of 8
    built = [r for r in recs if r["duplicate_of"] is None]
    assert len(built) == len({r["recipe"] for r in built}) == result.counts["complete"] == 7


# ---- recovery of a hidden target ----------------------------------------------------------


def hidden_target(folder: Path, zoo: Path, stages) -> Path:
    """Logits of a target merge on the probe batch, saved where the objective reads them."""
    model = Materializer({m: zoo / m for m in MODELS}).materialize(stages, seed=0)
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits.float()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(logits, folder / "target.pt")
    return folder / "target.pt"


def test_recovers_a_hidden_slerp_curve(zoo, tmp_path):
    from spaces import build_space, read_model_infos

    space_spec = {"kind": "slerp", "models": ["fst", "nxt"], "filters": ["self_attn"], "anchors": 2}
    space = build_space(space_spec, read_model_infos({m: zoo / m for m in MODELS}))
    target = {"t.self_attn.0": 0.2, "t.self_attn.1": 0.7, "t.rest.0": 0.6, "t.rest.1": 0.3}
    from spaces.base import ReplayTrial

    target_path = hidden_target(tmp_path, zoo, space.suggest(ReplayTrial(target)))
    fns = f"score = closeness({str(target_path)!r})\n"
    # Gaussian-process sampling: for continuous knobs it needs far fewer trials than TPE (BENCHMARKS.md)
    spec = load_spec(write_run(tmp_path, "slerp_target", zoo, space_spec, fns,
                               [{"kind": "custom", "function": "fns.py:score"}], trials=30, workers=1,
                               sampler="gp", heldout_top_k=0))
    result = run(spec, quiet=True)
    found = result.best["params"]
    error = max(abs(found[k] - v) for k, v in target.items())
    assert error <= 0.05, (found, target)  # the tolerance BENCHMARKS.md states


def test_finds_the_exact_hidden_slice_layout(zoo, tmp_path):
    space_spec = {"kind": "layout", "mode": "interleave", "models": ["deep", "deep2"], "width": [2, 6],
                  "stride": [1, 6]}
    target_recipe = recipes.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": m, "layer_range": r}]}
                   for m, r in (("deep", [0, 4]), ("deep2", [2, 6]), ("deep", [4, 8]))],
    })
    target_path = hidden_target(tmp_path, zoo, [target_recipe])
    fns = f"score = closeness({str(target_path)!r})\n"
    spec = load_spec(write_run(tmp_path, "layout_target", zoo, space_spec, fns,
                               [{"kind": "custom", "function": "fns.py:score"}], trials=40, workers=1,
                               heldout_top_k=0))
    result = run(spec, quiet=True)
    best = recipes.load(spec.run_dir / "best.yaml")[0]
    assert [(Path(s.sources[0].model).name, list(s.sources[0].layer_range)) for s in best.slices] == [
        ("deep", [0, 4]), ("deep2", [2, 6]), ("deep", [4, 8])]
    assert result.best["values"][0] > -1e-6  # the target's own logits, up to float rounding
