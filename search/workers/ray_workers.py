"""Workers as Ray actors: on a Ray cluster (--ray-address), on a machine with GPUs (one actor per GPU),
or in a program that has started Ray itself. search/workers/worker_pool.py drives them through the calls below,
the same as its local processes (search/workers/local_workers.py).

Ray's start costs seconds of CPU on a small machine (its GCS, raylet, dashboard head and agents, all
started whatever ray.init is asked) and every actor imports torch, transformers and lm-eval on its own;
that is why one machine without GPUs uses local processes instead (BENCHMARKS.md, "Search: time to
first trial").
"""

from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import contextmanager
from typing import Any

from search.workers import placement
from search.engine.errors import UserError
from search.workers.worker_faults import CallFailed, WorkerDied, cut


def connect_ray(address: str | None, worker_env: dict[str, str] | None = None) -> bool:
    """Join `address`, or start a local Ray (no dashboard; `address` None or "local"); True if this call
    started it. A local Ray's processes are started with `worker_env` in their environment, so its workers
    inherit it: actors then need no runtime_env of their own, and Ray gives them the workers it started at
    once instead of starting new ones through its runtime-env agent (seconds on a small machine)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = False
    address = None if address == "local" else address  # "local": a fresh Ray on this machine, as no address
    if not ray.is_initialized():
        if address:
            check_answers(address)
        kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local" always starts a fresh instance: a bare init() would join any Ray
                # another program on this machine happens to run.
                with environment(worker_env or {}):
                    ray.init(address="local", include_dashboard=False, **kwargs)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError, and a plain Exception when a node times out starting
            where = f"--ray-address {address}" if address else "a local Ray instance"
            raise UserError(f"cannot start or join {where}: {str(e).splitlines()[0]}") from None
        started = True
    # Ray prints its own multi-line "A worker died ..." for every dead actor, even without log_to_driver;
    # the loop reports each death in one line, so these prints are switched off (the flag Ray's debugger uses)
    ray._private.worker._worker_logs_enabled = False
    return started


@contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set, as it was afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_answers(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) where nothing listens is one line now: ray.init would retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the address itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(
            f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the cluster "
            "(`ray start --head`) or fix the address"
        ) from None


def alive_nodes() -> dict[str, dict[str, float]]:
    """Each live node's resources (what it has in all, not what is free now), by node id."""
    import ray

    return {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n["Alive"]}


def worker_resources(workers: int) -> tuple[dict, int]:
    """Actor options and torch threads per worker: one GPU each where there are GPUs, and the largest share
    of a CPU (up to one) with which all the workers fit, counted node by node (search/workers/placement.py), so
    that no worker waits for ever on a placement that cannot happen."""
    nodes = alive_nodes()
    gpus = sum(n.get("GPU", 0) for n in nodes.values())
    cpus = sum(n.get("CPU", 0) for n in nodes.values()) or 1
    need = {}
    if gpus >= 1:
        fit = placement.actors_that_fit(nodes, {"GPU": 1})
        if workers > fit:
            raise UserError(f"workers: {workers} workers but Ray sees {int(gpus)} GPUs; pass --workers {fit}")
        need = {"GPU": 1}
    share = placement.cpu_share(nodes, workers, need)
    if share is None and not need:
        raise UserError(f"workers: {workers} workers do not fit the {cpus:g} CPUs of {len(nodes)} Ray node(s); "
                        "pass fewer --workers or add nodes")
    options = {"num_gpus": 1} if need else {}
    options["num_cpus"] = share or 0  # a GPU node without CPUs to spare: its worker reserves none
    # spread over the nodes: Ray would otherwise pack the first workers onto one node, each holding its
    # sources in that node's memory and sharing its cores
    options["scheduling_strategy"] = "SPREAD"
    return options, max(1, int(cpus // workers))


# Ray's death text: an exit detail, then a paragraph of common causes the one line leaves out
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.*?)(?: Some common causes include:|$)", re.S)
# ... and when the actor's node left the cluster (removed, preempted, lost): its id, then how it went
_NODE_DIED = re.compile(r"its node has died\. Node Id: ([0-9a-f]+)[ \t]*\n?[ \t]*(.*)")
def death_reason(e: Exception) -> str:
    """One line saying why an actor call failed, out of Ray's multi-line error text; keeps the exit code or
    signal when Ray has one (a process killed outright, by SIGKILL, a segfault or os._exit, leaves none)."""
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
    if "creation task" in text:  # the actor's __init__ raised: its last line is the exception
        return "worker failed to start: " + cut(lines[-1])
    node = _NODE_DIED.search(text)
    if node:
        how = f" ({node.group(2).strip()})" if node.group(2).strip() else ""
        return cut(f"worker died: its node {node.group(1)[:8]} left the cluster{how}")
    detail = _EXIT_DETAIL.search(text)
    if detail:
        said = " ".join(detail.group(1).split())
        if "connection error" in said and "End of file" in said:  # Ray only saw the connection drop
            said = ("the process ended without telling Ray why (a signal such as SIGKILL or SIGSEGV, "
                    "the OOM killer, or os._exit)")
        return "worker died: " + cut(said)
    return "worker died: " + cut(lines[0])


def dead_node(e: Exception) -> str | None:
    """The id of the node whose death killed the actor, when that is how it died."""
    node = _NODE_DIED.search(str(e))
    return node.group(1) if node else None


class RayWorkers:
    """Ray actors of one worker class: started, called, waited on, killed."""

    def __init__(self, address: str | None):
        self.address = address
        self.started_ray = False
        self.actors: list = []

    @property
    def where(self) -> str:
        return f"Ray at {self.address}" if self.address and self.address != "local" else "local Ray"

    def start(self, workers: int, env: dict[str, str]) -> int:
        """Start Ray (or join it); the torch threads each worker gets."""
        self.started_ray = connect_ray(self.address, env)
        self.options, threads = worker_resources(workers)
        if not (self.started_ray and self.address in (None, "local")):  # a local Ray started here has it
            # already; on every node of a cluster (a memory limit set for the run too: memory_plan.py)
            self.options["runtime_env"] = {"env_vars": env}
        return threads

    def spawn(self, worker_class: type, args: tuple) -> Any:
        import ray

        actor = ray.remote(worker_class).options(max_restarts=0, **self.options).remote(*args)
        self.actors.append(actor)
        return actor

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def wait(self, refs: list, timeout: float | None) -> list:
        """Those of `refs` that have their answer, at most one; [] after `timeout` seconds."""
        import ray

        return ray.wait(refs, num_returns=1, timeout=timeout)[0] if refs else []

    def get(self, ref: Any) -> Any:
        """The call's result; raises WorkerDied or CallFailed with Ray's error text made one line."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(death_reason(e), dead_node(e)) from None
        except ray.exceptions.RayError as e:  # the call itself raised
            raise CallFailed(death_reason(e).replace("worker died", "worker error")) from None

    def kill(self, handle: Any) -> None:
        import ray

        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        if handle in self.actors:
            self.actors.remove(handle)

    def room_for_another(self, held: list[str | None], gone: str | None) -> str | None:
        """None if some live node holds one more actor beside the actors on the nodes `held` (None: not
        placed yet), `gone` (a node that left) not counted; else what the actor needs. The pool counts on
        the cluster being the run's; an actor other jobs keep from its room waits, as Ray actors do, until
        trial_timeout."""
        need = placement.demand(self.options)
        nodes = alive_nodes()
        nodes.pop(gone, None)
        free, unplaced = placement.free_after(nodes, held, need)
        return None if placement.actors_that_fit(free, need) > unplaced else placement.describe(need)

    def stop(self) -> None:
        import ray

        for actor in list(self.actors):
            self.kill(actor)
        if self.started_ray:
            ray.shutdown()
