"""Faults, on a real two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node):
a worker killed mid-trial, a driver interrupted (Ctrl-C) and killed (SIGKILL) and resumed,
and a plain sweep whose two workers sit on the two nodes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from search.study import records  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402
from search.commands.cli import main as cli_main  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

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


def write_run(folder: Path, name: str, zoo: Path, fns: str, **spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fns.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom search_fns import *\n" + textwrap.dedent(fns)
    )
    data = {"models": {m: str(zoo / m) for m in ("base", "fst", "nxt")}, "space": SPACE,
            "objectives": OBJECTIVE, "heldout_top_k": 0, "baselines": False, "seed": 0, **spec}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_sweep_on_two_nodes_keeps_both_workers_busy(cluster, pair_zoo, tmp_path):
    spec = load_spec(write_run(tmp_path, "two_nodes", pair_zoo, "score = sleepy(0.2)\n", trials=10, workers=2))
    result = run(spec, quiet=True)
    assert result.counts == {"complete": 10, "pruned": 0, "failed": 0}
    recs = records.read_trials(spec.run_dir / "trials.jsonl")
    nodes = {r["node"] for r in recs}
    assert len(nodes) == 2  # one worker per node: both nodes scored trials
    workers = result.utilization["workers"]
    assert set(workers) == {"w0", "w1"} and {w["node"] for w in workers.values()} == nodes
    for w in workers.values():
        # each worker logged its busy time; no worker sat out the search: the loop hands every free worker a
        # trial at once, so each has one at least (more would depend on how fast each loads the models)
        assert w["trials"] >= 1 and w["busy_s"] >= 0.2 * w["trials"]
    assert sum(r["timings"]["busy_s"] for r in recs) == pytest.approx(
        sum(w["busy_s"] for w in workers.values()), rel=1e-3)


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried_once(cluster, pair_zoo, tmp_path):
    """The objective kills its own worker process three times: the first trial dies twice (FAIL with the
    reason), the next dies once and completes on its retry, the rest run on the replacement worker."""
    counter = tmp_path / "kills.count"
    counter.write_text("3")
    spec = load_spec(write_run(tmp_path, "kills", pair_zoo, f"score = kill_times({str(counter)!r})\n", trials=5,
                               workers=1))
    result = run(spec, quiet=True)
    assert counter.read_text() == "0"
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["state"] for r in recs] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert recs[0]["attempts"] == 2 and recs[0]["reason"].startswith("worker died: the process ended without telling")
    assert "SIGKILL" in recs[0]["reason"] and "Some common causes" not in recs[0]["reason"]
    assert recs[0]["reason"].endswith("(after 2 attempts)") and recs[0]["recipe"]
    assert recs[1]["attempts"] == 2 and recs[1]["reason"] is None
    assert recs[1]["timings"]["deaths"] and recs[1]["workers"] == ["w0.2", "w0.3"]
    assert all(r["worker"] == "w0.3" and r["attempts"] == 1 for r in recs[2:])
    assert result.counts == {"complete": 4, "pruned": 0, "failed": 1}
    study = optuna.load_study(study_name="kills", storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    assert study.trials[0].user_attrs["reason"] == recs[0]["reason"]


HANG_FIRST_CALL = """
import threading
def score(model, tokenizer, fidelity):
    marker = Path({marker!r})
    if not marker.exists():
        marker.touch()
        threading.Event().wait()  # never set: only the trial timeout ends this call
    return fingerprint(model, tokenizer, fidelity)
"""

HANG_EVERY_CALL = """
import threading
def score(model, tokenizer, fidelity):
    threading.Event().wait()
"""


def test_a_hung_trial_times_out_its_worker_is_replaced_and_the_run_goes_on(cluster, pair_zoo, tmp_path):
    # generous: the limit must hold a replacement worker's start-up and first model load on a busy machine
    spec = load_spec(write_run(tmp_path, "hung", pair_zoo, HANG_FIRST_CALL.format(marker=str(tmp_path / "hung.marker")),
                               trials=3, workers=1, trial_timeout=30))
    result = run(spec, quiet=True)
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["state"] for r in recs] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert recs[0]["reason"] == "timed out after 30 s" and recs[0]["worker"] == "w0"
    assert all(r["worker"] == "w0.1" for r in recs[1:])  # the hung worker was killed and replaced
    assert result.counts == {"complete": 2, "pruned": 0, "failed": 1}


def test_a_hung_trial_holds_the_time_budget_up_by_at_most_the_trial_timeout(cluster, pair_zoo, tmp_path, capsys):
    """Every call hangs: the run stops when its 1 s budget is spent and the call in flight times out after 5 s."""
    path = write_run(tmp_path, "hung_budget", pair_zoo, HANG_EVERY_CALL, timeout=1, workers=1)
    assert cli_main(["run", str(path), "--quiet", "--trial-timeout", "5"]) == 1  # every trial failed
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mergesearch run: error: every trial failed (1); the most common reason (1 of them): "
                   "timed out after 5 s"]
    spec = load_spec(path)
    recs = records.read_trials(spec.run_dir / "trials.jsonl")
    # a trial sampled ahead but not started when the budget ran out is left (interrupted, and enqueued again)
    # for --resume, not started late
    left = [r for r in recs if r["reason"] == records.INTERRUPTED]
    assert [r["state"] for r in recs if r not in left and r["state"] != "WAITING"] == ["FAIL"]
    assert len([r for r in recs if r["state"] == "WAITING"]) == len(left)


def test_a_run_whose_every_trial_failed_exits_1_with_the_most_common_reason(cluster, pair_zoo, tmp_path, capsys):
    path = write_run(tmp_path, "all_fail", pair_zoo, "score = fail_when(lambda model: True)\n", trials=3, workers=1)
    assert cli_main(["run", str(path), "--quiet"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "mergesearch run: error: every trial failed (3); the most common reason (3 of them): "
        "RuntimeError: this candidate cannot be scored"]


def crash_loop(tmp_path: Path, zoo: Path, capfd) -> tuple[Path, str, str]:
    """A run whose worker exits with code 17 on every call stops in one line: (spec, that line, all output)."""
    path = write_run(tmp_path, "crash_loop", zoo, "def score(model, tokenizer, fidelity):\n    sys.exit(17)\n",
                     trials=5, workers=1)
    assert cli_main(["run", str(path), "--quiet"]) == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesearch run: error: worker w0 died 4 times in a row"), err
    assert lines[0].endswith(f"{path} --resume")
    return path, lines[0], out + err


def test_a_worker_that_dies_on_every_call_stops_the_run_with_its_exit_code(cluster, pair_zoo, tmp_path, capfd):
    path, line, output = crash_loop(tmp_path, pair_zoo, capfd)
    assert "Worker exits with an exit code 17." in line
    assert "A worker died" not in output  # Ray's own multi-line report is not echoed
    # trial 0 failed after its 2 attempts; trial 1 died on its second and stopped the run: it (and any
    # trial sampled ahead) is left interrupted, and enqueued again for --resume
    trials = _study(load_spec(path)).get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"].endswith("(after 2 attempts)")
    interrupted = [t.number for t in trials if t.user_attrs.get("reason") == records.INTERRUPTED]
    assert interrupted[0] == 1
    assert sorted(t.user_attrs["retry_of"] for t in trials if t.state == TrialState.WAITING) == interrupted


def test_resume_with_nothing_left_writes_the_outputs_without_ray(cluster, pair_zoo, tmp_path):
    path = write_run(tmp_path, "done", pair_zoo, "score = fingerprint\n", trials=2, workers=1)
    spec = load_spec(path)
    run(spec, quiet=True)
    best = (spec.run_dir / "best.yaml").read_text()
    (spec.run_dir / "best.yaml").unlink()  # as a driver killed after its last trial leaves the folder
    with socket.socket() as s:  # an address where no Ray answers: joining it would fail
        s.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "search.commands.cli", "run", str(path), "--resume", "--quiet",
                           "--ray-address", nowhere], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    # the same winner: its header line (trial and score) and its recipe
    again = (spec.run_dir / "best.yaml").read_text()
    assert again.splitlines()[0] == best.splitlines()[0] and recipes.loads(again) == recipes.loads(best)
    assert set(records.read_json(spec.run_dir / "run.json")["utilization"]["workers"]) == {"w0"}  # kept


def _wait_for(path: Path, complete: int, proc: subprocess.Popen) -> None:
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count('"state": "COMPLETE"') >= complete:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)


def _study(spec) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.run_dir / 'study.db'}")


def _wait_for_retry_in_flight(spec, proc: subprocess.Popen) -> None:
    """Until the driver has a retry of an interrupted trial RUNNING (read from the study it writes)."""
    while True:
        try:
            if any("retry_of" in t.user_attrs for t in _study(spec).get_trials(states=(TrialState.RUNNING,))):
                return
        except sqlalchemy.exc.OperationalError:  # the driver holds the database for a write
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)


# Trials pass `gate` before they score: while the test has removed the file, every call holds there,
# so the test knows which trials are in flight when it interrupts or kills the driver.
GATED = """
from pathlib import Path
def score(model, tokenizer, fidelity):
    while not Path({gate!r}).exists():
        time.sleep(0.05)
    return fingerprint(model, tokenizer, fidelity)
"""


def test_interrupted_and_killed_drivers_resume_without_losing_or_repeating_a_trial(cluster, pair_zoo, tmp_path):
    """Ctrl-C, then SIGKILL while retries of the interrupted trials are in flight, then a resume that finishes.
    A retry interrupted in turn is retried again with the same params: each chain of retries ends in one
    COMPLETE trial, and no trial completed before a kill is lost or run twice."""
    budget = 14
    gate = tmp_path / "gate"
    gate.touch()
    path = write_run(tmp_path, "resumed", pair_zoo, "import time\n" + GATED.format(gate=str(gate)), trials=budget,
                     workers=2)
    spec = load_spec(path)
    trials_path = spec.run_dir / "trials.jsonl"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "search.commands.cli", "run", str(path), "--ray-address", cluster.address, "--quiet"]

    # 1. Ctrl-C with trials held in flight: the driver marks them interrupted, enqueues them again, exits 130
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(trials_path, 3, proc)
    gate.unlink()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    study = _study(spec)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.get_trials(states=(TrialState.WAITING,))  # the interrupted ones, to run again
    first = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}

    # 2. without --resume the study is refused; with it, the retries start and are held until SIGKILL
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    proc = subprocess.Popen(command + ["--resume"], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_retry_in_flight(spec, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    study = _study(spec)
    before = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert before == first and any("retry_of" in t.user_attrs for t in running)

    # 3. resume once more, in this process, gate open: it finishes the budget
    gate.touch()
    result = run(load_spec(path), resume=True, quiet=True)
    study = _study(spec)
    trials = study.get_trials()
    for number, values in before.items():  # every trial completed before the kills is kept as it was
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    interrupted = [t for t in trials if t.user_attrs.get("reason") == records.INTERRUPTED]
    assert all(t.state == TrialState.FAIL for t in interrupted)
    assert {t.number for t in interrupted} >= {t.number for t in running}
    assert any("retry_of" in t.user_attrs for t in interrupted)  # a retry was itself interrupted
    # a duplicate (a recipe scored already) takes its original's result and is not counted
    counted = [t for t in trials if t.state.is_finished() and t not in interrupted
               and records.DUPLICATE_ATTR not in t.user_attrs]
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted)
    assert result.counts == {"complete": budget, "pruned": 0, "failed": 0}
    # each interrupted trial has exactly one retry, with its params; following the retries of a trial
    # interrupted first leads, through any retries interrupted in turn, to one COMPLETE trial
    retry_of = {t.number: t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    assert sorted(retry_of.values()) == sorted(t.number for t in interrupted)
    retry = {original: number for number, original in retry_of.items()}
    for t in interrupted:
        if t.number in retry_of:
            continue  # a link inside a chain: followed from the chain's first trial
        # what the first had sampled (nothing, or part, if the kill came while the space was sampling)
        wanted = {**t.system_attrs.get("fixed_params", {}), **t.params}
        link = trials[retry[t.number]]
        while link.state != TrialState.COMPLETE:  # a retry interrupted in turn: enqueued with the same params
            assert link in interrupted and wanted.items() <= link.system_attrs["fixed_params"].items()
            link = trials[retry[link.number]]
        assert wanted.items() <= link.params.items()
    # trials.jsonl: rewritten whole from the study, one line per trial, no duplicates
    lines = trials_path.read_text().splitlines()
    numbers = [records.json.loads(line)["trial"] for line in lines]
    assert numbers == list(range(len(trials)))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
