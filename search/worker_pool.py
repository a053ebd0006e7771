"""The worker pool: one Ray actor per slot, spawned, replaced when it dies, and timed.

A slot is a worker position. Its actor (search/worker.py) keeps the source models
resident; when the actor dies the slot gets a fresh one (a new generation), and a
slot whose actor cannot even start is retired; a slot whose actors keep dying
before any call returns stops the run (WorkerCrashLoop). A hung call's actor is
killed and replaced (`replace`). The pool also keeps each slot's busy time and
idle gaps, so a run can say how well the workers were used.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from search import placement
from search.engine.errors import UserError
from search.engine.memory_plan import LIMIT_ENV
from search.runspec import RunSpec
from search.worker import OFFLINE_ENV, Worker


def connect_ray(address: str | None, worker_env: dict[str, str] | None = None) -> bool:
    """Join `address`, or start a local Ray (no dashboard); True if this call started it. A local Ray's
    processes are started with `worker_env` in their environment, so its workers inherit it: actors then
    need no runtime_env of their own, and Ray gives them the workers it started at once instead of starting
    new ones through its runtime-env agent (seconds on a small machine)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = False
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


def worker_env(spec: RunSpec) -> dict[str, str]:
    """Each worker's environment: offline hub, the spec's folder and this one on its path (custom
    objectives import from there), and a memory limit set for the run (search/engine/memory_plan.py)."""
    pythonpath = os.pathsep.join(p for p in [str(spec.base_dir), os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
    limit = {LIMIT_ENV: os.environ[LIMIT_ENV]} if os.environ.get(LIMIT_ENV) else {}
    return {**OFFLINE_ENV, "PYTHONPATH": pythonpath, **limit}


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
    of a CPU (up to one) with which all the workers fit, counted node by node (search/placement.py), so
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
REASON_CHARS = 200
# a slot's actors dying this many times in a row, none returning a call, stop the run (3 replacements tried)
MAX_DEATHS_IN_A_ROW = 4


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


def cut(text: str, limit: int = REASON_CHARS) -> str:
    """`text` up to `limit` characters, cut at a word boundary."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def worker_line(slot: Slot) -> str:
    """'worker w0 on node 3f2a9c01 (cpu): sources shared-mmap: ...' from the worker's info."""
    info = slot.info
    node = (info.get("node") or info.get("host") or "?")[:8]
    return f"worker {slot.name} on node {node} ({info.get('device')}): {info.get('sources_plan') or 'sources ?'}"


class WorkerCrashLoop(UserError):
    """Every replacement of a worker died too: the run stops (its trials can be resumed once fixed)."""


@dataclass
class Slot:
    """One worker position; its actor is replaced when it dies."""

    index: int
    handle: Any = None
    generation: int = 0
    retired: bool = False
    info: dict = field(default_factory=dict)
    busy_s: float = 0.0
    calls: int = 0
    trials: int = 0
    free_since: float | None = None  # driver clock; to measure idle gaps
    deaths_in_a_row: int = 0  # deaths since the slot's last call that returned
    idle_gaps: list[float] = field(default_factory=list)
    known: dict = field(default_factory=dict)  # what the actor said of itself (info()): node, pid, device
    info_ref: Any = None  # a replacement's info() call, read once it has answered
    retired_why: str | None = None

    @property
    def name(self) -> str:
        return f"w{self.index}" + (f".{self.generation}" if self.generation else "")

    @property
    def info(self) -> dict:
        """What the slot's actor said of itself; a replacement's answer is read once it is in, without waiting
        (its node stays None until then: a replacement may land on another node than the actor it replaces)."""
        if self.info_ref is not None:
            import ray

            if ray.is_initialized() and ray.wait([self.info_ref], timeout=0)[0]:
                ref, self.info_ref = self.info_ref, None
                try:
                    self.known = ray.get(ref)
                except ray.exceptions.RayError:
                    pass  # it died before answering: that death is handled where its call fails
        return self.known

    @info.setter
    def info(self, value: dict) -> None:
        self.known, self.info_ref = value, None


class WorkerPool:
    def __init__(self, spec: RunSpec, ray_address: str | None, send_examples: bool):
        self.spec, self.ray_address, self.send_examples = spec, ray_address, send_examples
        self.slots: list[Slot] = []
        self.started_ray = False
        self.last_death: str | None = None

    def start(self, log: Callable[[str], None] | None = None) -> None:
        """Start Ray (or join it) and one actor per slot; return once every actor has built its objectives,
        so the run's clock measures trials, not start-up. `log` gets one line per worker: where it runs and
        how it keeps the source models (resident, shared-mmap or streamed)."""
        import ray

        env = worker_env(self.spec)
        self.started_ray = connect_ray(self.ray_address, env)
        self.actor_options, self.threads = worker_resources(self.spec.workers)
        if not (self.started_ray and self.ray_address is None):  # a local Ray started here has it already
            # on every node of a cluster (a memory limit set for the run too: search/engine/memory_plan.py)
            self.actor_options["runtime_env"] = {"env_vars": env}
        self.remote_worker = ray.remote(Worker)
        self.slots = [Slot(i) for i in range(self.spec.workers)]
        for slot in self.slots:
            self._spawn(slot)
        infos = {slot.index: slot.handle.info.remote() for slot in self.slots}
        for slot in self.slots:
            try:
                slot.info = ray.get(infos[slot.index])
            except ray.exceptions.RayActorError as e:
                raise UserError(f"worker {slot.name}: {death_reason(e)}") from None
            if slot.info.get("startup_error"):  # what only the built objectives can say wrong (search/worker.py)
                raise UserError(slot.info["startup_error"])
            if log is not None:
                log(worker_line(slot))

    def _spawn(self, slot: Slot) -> None:
        spec = self.spec
        slot.handle = self.remote_worker.options(max_restarts=0, **self.actor_options).remote(
            slot.name, spec.models, spec.objectives, str(spec.base_dir), spec.seed, spec.allow_pickle, self.threads,
            self.send_examples,
        )

    def replace(self, slot: Slot, gone: str | None = None) -> bool:
        """Kill the slot's actor and start its next one; True if started. When no live node has room for it
        (`gone`, the node the actor died with, left the cluster and the nodes left are full), the slot is
        retired instead: Ray would keep a worker it cannot place pending for ever, and its calls with it."""
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        need = placement.demand(getattr(self, "actor_options", {}))
        if not self._room_for(slot, need, gone):
            slot.retired, slot.handle = True, None
            slot.retired_why = (f"no node left has room for a replacement ({placement.describe(need)}); "
                                f"the run goes on with {len(self.live())} worker(s)")
            return False
        slot.generation += 1
        self._spawn(slot)
        slot.info = {}
        slot.info_ref = slot.handle.info.remote()
        return True

    def _room_for(self, slot: Slot, need: dict, gone: str | None) -> bool:
        """Whether some live node holds `slot`'s next actor beside the pool's other workers. The pool counts on
        the cluster being the run's; an actor other jobs keep from its room waits, as Ray actors do, until
        trial_timeout."""
        nodes = alive_nodes()
        nodes.pop(gone, None)
        held = [other.info.get("node") for other in self.live() if other is not slot and other.handle is not None]
        free, unplaced = placement.free_after(nodes, held, need)
        return placement.actors_that_fit(free, need) > unplaced

    def worker_died(self, slot: Slot, e: Exception) -> str:
        """Replace the slot's actor after it died (or retire the slot if it cannot start); the reason.
        A slot whose actors die MAX_DEATHS_IN_A_ROW times without one call returning is a fault that
        replacing will not fix (the models, the objective, the machine): WorkerCrashLoop stops the run."""
        reason = death_reason(e)
        self.last_death = reason
        slot.deaths_in_a_row += 1
        if slot.deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            slot.handle = None  # dead already: nothing to kill at stop()
            raise WorkerCrashLoop(
                f"worker {slot.name.split('.')[0]} died {slot.deaths_in_a_row} times in a row without finishing "
                f"a call; last: {reason}"
            )
        if reason.startswith("worker failed to start"):
            # a replacement that cannot start will not start next time either: stop using the slot
            slot.retired, slot.handle = True, None
            slot.retired_why = f"the run goes on with {len(self.live())} worker(s)"
        else:
            self.replace(slot, gone=dead_node(e))
        return reason

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def stop(self) -> None:
        import ray

        for slot in self.slots:
            if slot.handle is not None:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:
                    pass
        if self.started_ray:
            ray.shutdown()

    def utilization(self, wall: float) -> dict:
        """Busy time over `wall` seconds of the loop, per worker and overall."""
        wall = max(1e-9, wall)
        per = {
            s.name.split(".")[0]: {
                "busy_s": round(s.busy_s, 4),
                "trials": s.trials,
                "calls": s.calls,
                "utilization": round(s.busy_s / wall, 4),
                "max_idle_gap_s": round(max(s.idle_gaps[1:], default=0.0), 4),
                "node": s.info.get("node"),
            }
            for s in self.slots
        }
        total = sum(s.busy_s for s in self.slots)
        return {"wall_s": round(wall, 4), "workers": per, "utilization": round(total / (wall * len(self.slots)), 4)}
