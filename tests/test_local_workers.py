"""Local worker processes (search/workers/local_workers.py), what a run without Ray uses on a machine without GPUs:
forked from the fork server, replaced when they die or hang, the same trials from the same seed, and a
user's script without a main guard not run again in them. Real processes, real Optuna, tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from test_driver import zoo  # noqa: E402,F401  (a module fixture)
from test_faults import GATED, HANG_FIRST_CALL, _study, _wait_for, crash_loop, write_run  # noqa: E402
from test_reproducible import decided, run_twice  # noqa: E402

from search.study import records  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.workers.local_workers import LocalWorkers, runs_locally  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402
from search.workers.worker_faults import CallFailed, WorkerDied  # noqa: E402


@pytest.fixture(autouse=True)
def without_ray():
    """Every test here must run on local processes: no Ray started in this process, and none by the run."""
    assert runs_locally(None), "Ray is running in the test process (or a GPU is visible): these tests need neither"
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


class Echo:
    """A stand-in worker class: answers with its arguments, or raises."""

    def __init__(self, name: str, fail_to_start: bool = False):
        if fail_to_start:
            raise ValueError("no such model folder")
        self.name = name

    def echo(self, value):
        return (self.name, value, os.getpid())

    def boom(self):
        raise RuntimeError("a call that raises")

    def die(self):
        os._exit(3)


def test_calls_are_answered_in_order_and_faults_become_one_line(tmp_path):
    workers = LocalWorkers()
    workers.start(2, {"PYTHONPATH": str(TESTS)})
    try:
        a, b = workers.spawn(Echo, ("a",)), workers.spawn(Echo, ("b", True))
        calls = [workers.call(a, "echo", i) for i in range(3)]
        assert [workers.get(c)[:2] for c in calls] == [("a", 0), ("a", 1), ("a", 2)]
        assert workers.get(calls[0])[2] not in (os.getpid(), None)  # another process
        with pytest.raises(CallFailed, match="^worker error: RuntimeError: a call that raises$"):
            workers.get(workers.call(a, "boom"))
        assert workers.get(workers.call(a, "echo", "still up"))[1] == "still up"
        with pytest.raises(WorkerDied, match="^worker failed to start: ValueError: no such model folder$"):
            workers.get(workers.call(b, "echo", 1))
        dying, queued = workers.call(a, "die"), workers.call(a, "echo", "never answered")
        with pytest.raises(WorkerDied, match="^worker died: the process exited with code 3$"):
            workers.get(dying)
        with pytest.raises(WorkerDied, match="code 3"):  # a call queued behind the death is answered with it
            workers.get(queued)
        with pytest.raises(WorkerDied, match="code 3"):  # and so is any later call
            workers.get(workers.call(a, "echo", "too late"))
    finally:
        workers.stop()


def test_a_run_without_ray_uses_local_processes_on_two_workers(pair_zoo, tmp_path):
    spec = load_spec(write_run(tmp_path, "local", pair_zoo, "score = sleepy(0.05)\n", trials=6, workers=2))
    result = run(spec, quiet=True)
    assert result.counts == {"complete": 6, "pruned": 0, "failed": 0}
    recs = records.read_trials(spec.run_dir / "trials.jsonl")
    assert {r["worker"] for r in recs} <= {"w0", "w1"} and all(r["node"] is None for r in recs)
    assert all(w["trials"] >= 1 for w in result.utilization["workers"].values())


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried_once(pair_zoo, tmp_path):
    counter = tmp_path / "kills.count"
    counter.write_text("3")
    spec = load_spec(write_run(tmp_path, "kills", pair_zoo, f"score = kill_times({str(counter)!r})\n", trials=4,
                               workers=1))
    result = run(spec, quiet=True)
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["state"] for r in recs] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert recs[0]["reason"] == "worker died: the process exited with code 17 (after 2 attempts)"
    assert recs[1]["attempts"] == 2 and recs[1]["workers"] == ["w0.2", "w0.3"]
    assert all(r["worker"] == "w0.3" for r in recs[1:])
    assert result.counts == {"complete": 3, "pruned": 0, "failed": 1}


def test_a_hung_trial_times_out_and_its_worker_is_replaced(pair_zoo, tmp_path):
    spec = load_spec(write_run(tmp_path, "hung", pair_zoo, HANG_FIRST_CALL.format(marker=str(tmp_path / "hung.marker")),
                               trials=3, workers=1, trial_timeout=20))
    result = run(spec, quiet=True)
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["state"] for r in recs] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert recs[0]["reason"] == "timed out after 20 s"
    assert all(r["worker"] == "w0.1" for r in recs[1:])
    assert result.counts == {"complete": 2, "pruned": 0, "failed": 1}


def test_a_worker_that_dies_on_every_call_stops_the_run_in_one_line(pair_zoo, tmp_path, capfd):
    _, line, output = crash_loop(tmp_path, pair_zoo, capfd)
    assert "the process exited with code 17" in line
    assert "Traceback" not in output  # what the workers print goes to their logs


def test_two_runs_on_two_local_workers_give_the_same_trials(zoo, tmp_path):
    runs = run_twice(zoo, tmp_path, trials=10)
    first, second = (decided(d) for d in runs)
    assert [r["state"] for r in first].count("COMPLETE") > 0
    assert first == second


def test_a_script_without_a_main_guard_is_not_run_again_in_the_workers(pair_zoo, tmp_path):
    """multiprocessing runs the main module again in each new process; the workers must not (this script
    would start its run again in each of them)."""
    spec = write_run(tmp_path, "script", pair_zoo, "score = fingerprint\n", trials=2, workers=1)
    script = tmp_path / "my_search.py"
    script.write_text(textwrap.dedent(f"""
        from search.run.driver import run
        from search.spec.runspec import load_spec
        print("started", flush=True)
        result = run(load_spec({str(spec)!r}), quiet=True)
        print(result.counts, flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["started", "{'complete': 2, 'pruned': 0, 'failed': 0}"]


def test_ctrl_c_in_a_terminal_stops_the_run_and_every_worker(pair_zoo, tmp_path):
    """A terminal's Ctrl-C goes to the driver and its workers alike (one process group): the workers ignore it,
    the driver leaves the trials in flight for --resume, stops its workers and exits 130; no process is left."""
    gate = tmp_path / "gate"
    gate.touch()
    path = write_run(tmp_path, "ctrl_c", pair_zoo, "import time\n" + GATED.format(gate=str(gate)), trials=20,
                     workers=2)
    spec = load_spec(path)
    command = [sys.executable, "-m", "search.commands.cli", "run", str(path), "--quiet"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(spec.run_dir / "trials.jsonl", 3, proc)
    gate.unlink()  # the next trials are held on their workers
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "--resume" in err and "Traceback" not in err, err
    study = _study(spec)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.get_trials(states=(TrialState.WAITING,))  # the interrupted ones, to run again
    deadline = time.monotonic() + 60
    while True:  # the workers and the fork server end with the driver (reaped by init once it has exited)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the run outlived its driver"
        time.sleep(0.1)
