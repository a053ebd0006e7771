"""Faults, on a real two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node):
a worker killed mid-trial, a driver interrupted (Ctrl-C) and killed (SIGKILL) and resumed,
and a plain sweep whose two workers sit on the two nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from standins import make_finetune, make_standin  # noqa: E402

from search import records  # noqa: E402
from search.driver import run  # noqa: E402
from search.runspec import load_spec  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SPACE = {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]}
OBJECTIVE = [{"kind": "custom", "function": "fns.py:score"}]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    make_standin(root / "base", "llama", 2, seed=0)
    make_finetune(root / "fst", root / "base", seed=1, scale=0.05)
    make_finetune(root / "nxt", root / "base", seed=2, scale=0.05)
    return root


def write_run(folder: Path, name: str, zoo: Path, fns: str, **spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fns.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom search_fns import *\n" + textwrap.dedent(fns)
    )
    data = {"models": {m: str(zoo / m) for m in ("base", "fst", "nxt")}, "space": SPACE,
            "objectives": OBJECTIVE, "heldout_top_k": 0, "seed": 0, **spec}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_sweep_on_two_nodes_keeps_both_workers_busy(cluster, zoo, tmp_path):
    spec = load_spec(write_run(tmp_path, "two_nodes", zoo, "score = sleepy(0.2)\n", trials=10, workers=2))
    result = run(spec, quiet=True)
    assert result.counts == {"complete": 10, "pruned": 0, "failed": 0}
    recs = records.read_trials(spec.run_dir / "trials.jsonl")
    nodes = {r["node"] for r in recs}
    assert len(nodes) == 2  # one worker per node: both nodes scored trials
    workers = result.utilization["workers"]
    assert set(workers) == {"w0", "w1"} and {w["node"] for w in workers.values()} == nodes
    for w in workers.values():
        # each worker logged its busy time; no worker sat out the search
        assert w["trials"] >= 2 and w["busy_s"] >= 0.2 * w["trials"]
    assert sum(r["timings"]["busy_s"] for r in recs) == pytest.approx(
        sum(w["busy_s"] for w in workers.values()), rel=1e-3)


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried_once(cluster, zoo, tmp_path):
    """The objective kills its own worker process three times: the first trial dies twice (FAIL with the
    reason), the next dies once and completes on its retry, the rest run on the replacement worker."""
    counter = tmp_path / "kills.count"
    counter.write_text("3")
    spec = load_spec(write_run(tmp_path, "kills", zoo, f"score = kill_times({str(counter)!r})\n", trials=5,
                               workers=1))
    result = run(spec, quiet=True)
    assert counter.read_text() == "0"
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["state"] for r in recs] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert recs[0]["attempts"] == 2 and recs[0]["reason"].startswith("worker died")
    assert recs[0]["reason"].endswith("(after 2 attempts)") and recs[0]["recipe"]
    assert recs[1]["attempts"] == 2 and recs[1]["reason"] is None
    assert recs[1]["timings"]["deaths"] and recs[1]["workers"] == ["w0.2", "w0.3"]
    assert all(r["worker"] == "w0.3" and r["attempts"] == 1 for r in recs[2:])
    assert result.counts == {"complete": 4, "pruned": 0, "failed": 1}
    study = optuna.load_study(study_name="kills", storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    assert study.trials[0].user_attrs["reason"] == recs[0]["reason"]


def _wait_for(path: Path, complete: int, proc: subprocess.Popen) -> None:
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count('"state": "COMPLETE"') >= complete:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)


def _study(spec) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.run_dir / 'study.db'}")


def test_interrupted_and_killed_drivers_resume_without_losing_or_repeating_a_trial(cluster, zoo, tmp_path):
    budget = 14
    path = write_run(tmp_path, "resumed", zoo, "score = sleepy(0.3)\n", trials=budget, workers=2)
    spec = load_spec(path)
    trials_path = spec.run_dir / "trials.jsonl"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "search.cli", "run", str(path), "--ray-address", cluster.address, "--quiet"]

    # 1. Ctrl-C: the driver marks its running trials interrupted, enqueues them again, and exits 130
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(trials_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    study = _study(spec)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.get_trials(states=(TrialState.WAITING,))  # the interrupted ones, to run again

    # 2. without --resume the study is refused; with it, the run goes on until SIGKILL
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    proc = subprocess.Popen(command + ["--resume"], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(trials_path, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    study = _study(spec)
    before = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert len(before) >= 7 and running  # killed mid-run, with trials in flight

    # 3. resume once more, in this process: it finishes the budget
    result = run(load_spec(path), resume=True, quiet=True)
    study = _study(spec)
    trials = study.get_trials()
    for number, values in before.items():  # every trial completed before the kill is kept as it was
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    interrupted = [t for t in trials if t.user_attrs.get("reason") == records.INTERRUPTED]
    assert {t.number for t in interrupted} >= set(running)
    assert all(t.state == TrialState.FAIL for t in interrupted)
    counted = [t for t in trials if t.state.is_finished() and t not in interrupted]
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted)
    assert result.counts == {"complete": budget, "pruned": 0, "failed": 0}
    # each interrupted trial ran again with its own params, exactly once
    retried = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retried) == sorted(t.number for t in interrupted)
    for t in retried:
        original = trials[t.user_attrs["retry_of"]]
        # what the original had sampled (nothing, or part, if the kill came while the space was sampling)
        wanted = {**original.system_attrs.get("fixed_params", {}), **original.params}
        assert t.state == TrialState.COMPLETE and wanted.items() <= t.params.items()
    # trials.jsonl: rewritten whole from the study, one line per trial, no duplicates
    lines = trials_path.read_text().splitlines()
    numbers = [records.json.loads(line)["trial"] for line in lines]
    assert numbers == list(range(len(trials)))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
