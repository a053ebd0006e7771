"""The run spec, samplers, pruners and storage URLs: validated before any work, one-line errors."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.engine.errors import UserError
from search.study.pruners import build_pruner
from search.spec.runspec import load_spec
from search.study.samplers import build_sampler
from search.study.staged_tpe import read_pruned_as_finished
from search.study.storage import mask, open_storage


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for name in ("base", "fst"):
        (tmp_path / "zoo" / name).mkdir(parents=True)
        (tmp_path / "zoo" / name / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "known.yaml").write_text("merge_method: linear\nmodels:\n  - model: base\n  - model: fst\n")
    return tmp_path


def good(**changes) -> dict:
    spec = {
        "models": {"base": "zoo/base", "fst": "zoo/fst"},
        "space": {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst"]},
        "objectives": [{"kind": "custom", "function": "scores.py:score"}],
        "trials": 10,
    }
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}


def write(folder: Path, data: dict, name: str = "demo.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(folder: Path, data: dict, **overrides) -> str:
    with pytest.raises(UserError) as e:
        load_spec(write(folder, data), overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_good_spec_resolves_paths_and_defaults(folder):
    spec = load_spec(write(folder, good(enqueue=["known.yaml"])))
    assert spec.name == "demo"  # the file's stem
    assert spec.run_dir == folder / "demo"
    assert spec.models == {"base": str(folder / "zoo/base"), "fst": str(folder / "zoo/fst")}
    assert spec.enqueue == [str(folder / "known.yaml")]
    assert (spec.pruner, spec.sampler_name, spec.workers, spec.seed, spec.heldout_top_k) == (
        "successive_halving", "tpe", 1, 0, 3)


def test_command_line_overrides_win(folder):
    spec = load_spec(write(folder, good()), {"trials": 3, "workers": 2, "timeout": None})
    assert (spec.trials, spec.workers, spec.timeout) == (3, 2, None)


def test_run_options_override_seed_sampler_pruner_and_name(folder):
    import argparse

    from search.commands import run_command

    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    path = write(folder, good())
    args = parser.parse_args([str(path), "--seed", "7", "--sampler", "random", "--pruner", "none", "--name", "seed7"])
    spec = load_spec(path, run_command.spec_overrides(args))
    assert (spec.seed, spec.sampler_name, spec.pruner, spec.name) == (7, "random", "none", "seed7")
    assert spec.run_dir == folder / "seed7"
    args = parser.parse_args([str(path), "--pruner", "sometimes"])
    with pytest.raises(UserError, match="pruner"):
        load_spec(path, run_command.spec_overrides(args))


def test_a_single_objective_mapping_is_a_list_of_one(folder):
    spec = load_spec(write(folder, good(objectives={"kind": "custom", "function": "scores.py:score"})))
    assert len(spec.objectives) == 1


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        ({"trials": 0}, "trials:", "greater than or equal to 1"),
        ({"trials": None}, "budget", "timeout"),
        ({"pruner": "medain"}, "pruner:", "median"),
        ({"sampler": "tpee"}, "sampler", "tpe, cmaes"),
        ({"sampler": "no.such.Sampler"}, "sampler", "dotted path"),
        ({"workers": 0}, "workers:", "greater than or equal to 1"),
        ({"heldout_top_k": -1}, "heldout_top_k:", "greater than or equal to 0"),
        ({"seeed": 1}, "seeed:", "unknown key"),
        ({"spec_path": "elsewhere.yaml"}, "spec_path:", "unknown key"),
        ({"name": "a/b"}, "name:", "folder name"),
        ({"space": {"method": "ties"}}, "space:", "kind"),
        ({"objectives": [{"function": "x:y"}]}, "objectives:", "kind"),
        ({"objectives": []}, "objectives:", "at least 1"),
        ({"models": {"base": "zoo/nope"}}, "models.base:", "fix the path"),
        ({"models": {}}, "models:", "at least 1"),
        ({"enqueue": ["missing.yaml"]}, "enqueue[0]:", "fix the path"),
    ],
)
def test_mistakes_are_one_line_naming_the_field(folder, changes, field, hint):
    message = error_of(folder, good(**changes))
    assert message.startswith(str(folder / "demo.yaml") + ": ")
    assert field in message and hint in message


def test_a_model_folder_without_config_is_refused(folder):
    (folder / "empty").mkdir()
    assert "models.base: 'empty' has no config.json" in error_of(folder, good(models={"base": "empty"}))


def test_an_enqueued_recipe_must_be_a_recipe(folder):
    (folder / "bad.yaml").write_text("merge_method: linear\n")
    assert "enqueue[0]:" in error_of(folder, good(enqueue=["bad.yaml"]))


def test_malformed_yaml_names_the_line(folder):
    path = folder / "broken.yaml"
    path.write_text("name: x\nmodels: {a: b\n")
    with pytest.raises(UserError, match=r"malformed YAML at line \d"):
        load_spec(path)


def test_the_command_refuses_a_bad_spec_before_any_work(folder):
    path = write(folder, good(trials=0))
    proc = subprocess.run(
        [sys.executable, "-m", "search.commands.cli", "run", str(path)], capture_output=True, text=True, cwd=folder
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "trials:" in proc.stderr
    assert not (folder / "demo").exists()  # nothing half-written


# ---- samplers and pruners -------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("tpe", optuna.samplers.TPESampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("gp", optuna.samplers.GPSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("random", optuna.samplers.RandomSampler),
        ("qmc", optuna.samplers.QMCSampler),
        ("optuna.samplers.RandomSampler", optuna.samplers.RandomSampler),
    ],
)
def test_samplers_by_name_are_seeded(name, cls):
    def first_points(seed):
        study = optuna.create_study(sampler=build_sampler(name, seed))
        out = []
        for _ in range(3):
            t = study.ask()
            out.append(t.suggest_float("x", 0, 1))
            study.tell(t, out[-1])
        return out

    assert isinstance(build_sampler(name, 0), cls)
    assert first_points(7) == first_points(7)
    if name != "qmc":  # a scrambled Sobol sequence's first point does not move with every seed
        assert first_points(7) != first_points(8)


def test_tpe_is_multivariate_with_constant_liar():
    tpe = build_sampler("tpe", 0)
    assert tpe._multivariate is True and tpe._constant_liar is True


def _proposals(study, n):
    xs = []
    for _ in range(n):
        t = study.ask()
        xs.append(t.suggest_float("x", 0, 1))
        study.tell(t, (xs[-1] - 0.5) ** 2)
    return xs


def test_tpe_without_stages_proposes_as_optunas_tpe():
    ours = optuna.create_study(sampler=build_sampler("tpe", 3))
    theirs = optuna.create_study(sampler=optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=3))
    assert _proposals(ours, 25) == _proposals(theirs, 25)  # past the 10 random start-up trials


def test_tpe_ranks_pruned_trials_by_their_estimated_final_score():
    """Thirty trials pruned at the last stage before the full score (16 here) show the good region
    is near x = 0.8; the three that finished sit near 0.2. Optuna's TPE ranks pruned trials behind
    every finished one and keeps proposing elsewhere; ours reads each pruned trial at its stage-16
    score plus the finished trials' mean gap from stage 16 to the end (here 0), and moves to 0.8."""
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def seeded(sampler):
        study = optuna.create_study(sampler=sampler)
        for i in range(30):
            x = (i + 0.5) / 30
            study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, state=TrialState.PRUNED,
                                                      intermediate_values={16: (x - 0.8) ** 2}))
        for x in (0.18, 0.2, 0.22):
            study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=(x - 0.8) ** 2,
                                                      intermediate_values={16: (x - 0.8) ** 2}))
        xs = []
        for _ in range(10):
            t = study.ask(dist)
            xs.append(t.params["x"])
            study.tell(t, state=TrialState.FAIL)  # keep the history as it is
        return statistics.median(xs)

    assert seeded(build_sampler("tpe", 0)) > 0.6
    assert seeded(optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=0)) < 0.4


def test_a_trial_pruned_at_the_deepest_stage_reads_at_its_score_there_plus_the_mean_gap():
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    finished = [optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=v + 0.5,
                                          intermediate_values={16: v, 128: v + 0.25}) for v in (1.0, 2.0)]
    at_16 = optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, state=TrialState.PRUNED,
                                      intermediate_values={16: 3.0})
    at_128 = optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, state=TrialState.PRUNED,
                                       intermediate_values={16: 3.0, 128: 3.0})
    at_64 = optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, state=TrialState.PRUNED,
                                      intermediate_values={64: 3.0})  # a step no finished trial reported
    read = read_pruned_as_finished([*finished, at_16, at_128, at_64])
    assert (read[3].state, read[3].value) == (TrialState.COMPLETE, 3.25)  # 3.0 + the mean gap from 128 to the end
    assert read[2] is at_16 and read[4] is at_64  # pruned earlier (or elsewhere): left as they are
    assert at_128.state == TrialState.PRUNED  # a copy was read as finished; the study is untouched
    assert read[:2] == finished


def test_sampler_options_and_limits():
    assert build_sampler("tpe", 0, options={"n_startup_trials": 3})._n_startup_trials == 3
    with pytest.raises(UserError, match="sampler: cmaes handles one objective"):
        build_sampler("cmaes", 0, n_objectives=2)
    with pytest.raises(UserError, match="sampler: bad options for tpe"):
        build_sampler("tpe", 0, options={"bogus": 1})
    with pytest.raises(UserError, match="not an optuna sampler"):
        build_sampler("collections.OrderedDict", 0)


def test_pruners_read_the_fidelity_stages():
    fid = [16, 64, 256]
    assert isinstance(build_pruner("median", fid), optuna.pruners.MedianPruner)
    sh = build_pruner("successive_halving", fid)
    assert isinstance(sh, optuna.pruners.SuccessiveHalvingPruner)
    assert (sh._min_resource, sh._reduction_factor) == (16, 4)
    hb = build_pruner("hyperband", fid)
    assert isinstance(hb, optuna.pruners.HyperbandPruner)
    assert (hb._min_resource, hb._max_resource, hb._reduction_factor) == (16, 256, 4)
    # nothing to prune between: a single stage, or no pruner asked for
    assert isinstance(build_pruner("median", None), optuna.pruners.NopPruner)
    assert isinstance(build_pruner("none", fid), optuna.pruners.NopPruner)


# ---- storage ------------------------------------------------------------------


def test_passwords_in_storage_urls_are_masked():
    assert mask("postgresql://me:s3cret@db.example:5432/optuna") == "postgresql://me:***@db.example:5432/optuna"
    assert mask("mysql+pymysql://u:p%40ss@h/db?password=x&ssl=1") == "mysql+pymysql://u:***@h/db?password=***&ssl=1"
    assert mask("sqlite:///runs/demo/study.db") == "sqlite:///runs/demo/study.db"  # nothing to mask


def test_an_unreachable_storage_is_one_line_without_the_password():
    with pytest.raises(UserError) as e:
        open_storage("postgresql+nosuchdriver://me:s3cret@127.0.0.1:1/optuna")
    assert "s3cret" not in str(e.value) and str(e.value).startswith("storage: cannot open")
    with pytest.raises(UserError, match="neither a database URL"):
        open_storage("somewhere")


def test_journal_and_sqlite_storages_hold_a_study(tmp_path):
    for url in (f"journal:{tmp_path}/j/study.log", f"sqlite:///{tmp_path}/s/study.db"):
        storage = open_storage(url)
        study = optuna.create_study(study_name="x", storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="x", storage=open_storage(url)).trials) == 2
