"""A run on a real three-node Ray cluster (ray.cluster_utils.Cluster: a head and two more nodes, one CPU
each), joined by address as `mergesearch run --ray-address` joins one: trials land on every node, and a
node removed mid-run loses no completed trial; its trial in flight is retried on a node left, and the
run finishes its whole budget there.

The node is removed on an event, never after a wait: the worker on that node, once it has completed
BEFORE trials, writes a line to a FIFO the test listens on and holds its next trial, so the node goes
with a trial in flight."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from search.study import records  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

BEFORE = 2  # trials the doomed node completes before its node is removed with the next one in flight
# The reproducible schedule (search/run/schedule.py) asks no trial while one asked K = 3 earlier is unfinished,
# so each worker's next trial comes at most K + 1 after its last: the doomed worker's first is among the
# first 3, its third at trial 10 at the latest, and trials remain after it for the nodes left.
TRIALS = 14

# The doomed node's worker counts its trials in a file (one worker per node: nothing else writes it);
# its trial after BEFORE signals the test through the FIFO, then holds until its node is gone.
DOOMED_SCORE = """
import threading
from pathlib import Path

import ray
from search_fns import fingerprint

def score(model, tokenizer, fidelity):
    if ray.get_runtime_context().get_node_id() == {doomed!r}:
        counter = Path({counter!r})
        done = int(counter.read_text()) if counter.exists() else 0
        if done >= {before}:
            with open({fifo!r}, "w") as signal:  # blocks until the test listens
                signal.write("ready\\n")
            threading.Event().wait()  # never set: the node's removal ends this call
        counter.write_text(str(done + 1))
    return fingerprint(model, tokenizer, fidelity)
"""


@pytest.fixture(scope="module")
def cluster():
    """Three nodes of one CPU each; Ray and the cluster are shut down whatever the test did."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()  # the driver's own connection, if a failed run left it open
        c.shutdown()


def write_spec(folder: Path, zoo: Path, fns: str) -> Path:
    (folder / "fns.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(fns))
    data = {
        "name": "cluster",
        "models": {m: str(zoo / m) for m in ("base", "fst", "nxt")},
        "space": {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]},
        "objectives": [{"kind": "custom", "function": "fns.py:score"}],
        "trials": TRIALS,
        "workers": 3,  # one per node: each node has one CPU
        # a guard, not the mechanism: a retry sent to a worker that can never be placed fails after this
        # instead of hanging the test
        "trial_timeout": 120,
        "heldout_top_k": 0,
        "baselines": False,
        "seed": 0,
    }
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class NodeRemover(threading.Thread):
    """Removes `node` once a line comes through the FIFO at `fifo`."""

    def __init__(self, cluster, node, fifo: Path):
        super().__init__(daemon=True)
        self.cluster, self.node, self.fifo = cluster, node, fifo
        self.removed = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.fifo) as signal:  # blocks until the doomed worker opens it to write
                line = signal.readline()
            if line == "ready\n":
                self.cluster.remove_node(self.node)
                self.removed.set()
        except BaseException as e:  # reported by the test, not lost in the thread
            self.error = e

    def release(self) -> None:
        """Unblock a listener no worker ever wrote to (a run that failed before the signal)."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody listens any more
            return
        os.write(fd, b"stop\n")
        os.close(fd)


def test_trials_land_on_every_node_and_a_node_removed_mid_run_loses_no_completed_trial(cluster, pair_zoo, tmp_path,
                                                                                        capsys):
    doomed = list(cluster.worker_nodes)[-1]  # not the head: the driver joins through the head's node
    fifo = tmp_path / "doomed.fifo"
    os.mkfifo(fifo)
    counter = tmp_path / "doomed.count"
    fns = DOOMED_SCORE.format(doomed=doomed.node_id, counter=str(counter), before=BEFORE, fifo=str(fifo))
    spec = load_spec(write_spec(tmp_path, pair_zoo, fns))
    remover = NodeRemover(cluster, doomed, fifo)
    remover.start()
    try:
        result = run(spec, ray_address=cluster.address)
    finally:
        remover.release()
        remover.join()
    assert remover.error is None, remover.error
    assert remover.removed.is_set()

    # the whole budget, nothing failed: the trial in flight on the removed node was retried on another
    assert result.counts == {"complete": TRIALS, "pruned": 0, "failed": 0}
    recs = sorted(records.read_trials(spec.run_dir / "trials.jsonl"), key=lambda r: r["trial"])
    assert [r["trial"] for r in recs] == list(range(TRIALS)) and {r["state"] for r in recs} == {"COMPLETE"}

    # (a) trials landed on every node, the removed one included
    head, other = cluster.head_node.node_id, list(cluster.worker_nodes)[0].node_id
    assert {r["node"] for r in recs} == {head, other, doomed.node_id}

    # (b) every trial the removed node completed is kept, and the one it had in flight ran again elsewhere
    assert counter.read_text() == str(BEFORE)
    assert len([r for r in recs if r["node"] == doomed.node_id]) == BEFORE
    retried = [r for r in recs if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["node"] in (head, other)
    (death,) = retried[0]["timings"]["deaths"]
    assert death.startswith(f"worker died: its node {doomed.node_id[:8]} left the cluster"), death

    # the removed node's worker was retired, not replaced by one that could never be placed
    # (each node has one CPU, held by the worker on it), in one line; the other two took the rest of the budget
    said = " ".join(capsys.readouterr().err.split())  # the progress display wraps long lines
    assert (f"{death}; no node left has room for a replacement (1 CPU); the run goes on with 2 worker(s)"
            in said), said[-2000:]
    workers = result.utilization["workers"]
    gone = [name for name, w in workers.items() if w["node"] == doomed.node_id]
    assert len(gone) == 1 and workers[gone[0]]["trials"] == BEFORE
    assert sum(w["trials"] for w in workers.values()) == TRIALS

    # the study agrees with trials.jsonl
    study = optuna.load_study(study_name="cluster", storage=f"sqlite:///{spec.run_dir / 'study.db'}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == TRIALS
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL))


# ---- where workers fit (search/workers/placement.py): pure, no Ray

def test_a_cpu_share_is_counted_node_by_node():
    from search.workers.placement import cpu_share

    three = {n: {"CPU": 1.0} for n in "abc"}
    assert cpu_share(three, 3, {}) == 1.0
    # cluster-wide, 4 workers on 3 CPUs would take 0.75 each: one per node, and the fourth never placed
    assert cpu_share(three, 4, {}) == 0.5
    assert cpu_share({"a": {"CPU": 2.0}, "b": {"CPU": 1.0}}, 3, {}) == 1.0
    assert cpu_share({"a": {"CPU": 0.0}}, 1, {}) is None
    gpu_nodes = {n: {"CPU": 1.0, "GPU": 2.0} for n in "ab"}
    assert cpu_share(gpu_nodes, 4, {"GPU": 1}) == 0.5


def test_a_replacement_has_room_only_where_the_other_workers_leave_some():
    from search.workers.placement import actors_that_fit, free_after

    need = {"CPU": 1.0}
    left = {"a": {"CPU": 1.0}, "b": {"CPU": 1.0}}  # node c left the cluster
    free, unplaced = free_after(left, ["a", "b"], need)  # the two other workers hold a and b
    assert actors_that_fit(free, need) == 0 and unplaced == 0
    free, unplaced = free_after(left, ["a", "c"], need)  # c's worker is gone with its node: b has room
    assert actors_that_fit(free, need) == 1 and unplaced == 0
    free, unplaced = free_after(left, ["a", None], need)  # a worker not placed yet takes b's room
    assert actors_that_fit(free, need) == 1 and unplaced == 1
    assert actors_that_fit({"a": {"CPU": 1.0}}, {}) > 1000  # needing nothing fits anywhere
