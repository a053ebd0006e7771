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
from dataclasses import dataclass, field
from typing import Any

from search.engine.errors import UserError
from search.runspec import RunSpec
from search.worker import OFFLINE_ENV, Worker


def connect_ray(address: str | None) -> bool:
    """Join `address`, or start a local Ray (no dashboard); True if this call started it."""
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
                ray.init(address="local", include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--ray-address {address}" if address else "a local Ray instance"
            raise UserError(f"cannot start or join {where}: {str(e).splitlines()[0]}") from None
        started = True
    # Ray prints its own multi-line "A worker died ..." for every dead actor, even without log_to_driver;
    # the loop reports each death in one line, so these prints are switched off (the flag Ray's debugger uses)
    ray._private.worker._worker_logs_enabled = False
    return started


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


def worker_resources(workers: int) -> tuple[dict, int]:
    """Actor options (one GPU each where there are GPUs) and torch threads per worker."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
    if gpus >= 1:
        if workers > gpus:
            raise UserError(f"workers: {workers} workers but Ray sees {int(gpus)} GPUs; pass --workers {int(gpus)}")
        return {"num_gpus": 1, "num_cpus": min(1.0, cpus / workers)}, max(1, int(cpus // workers))
    return {"num_cpus": min(1.0, cpus / workers)}, max(1, int(cpus // workers))


# Ray's death text: an exit detail, then a paragraph of common causes the one line leaves out
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.*?)(?: Some common causes include:|$)", re.S)
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
    detail = _EXIT_DETAIL.search(text)
    if detail:
        said = " ".join(detail.group(1).split())
        if "connection error" in said and "End of file" in said:  # Ray only saw the connection drop
            said = ("the process ended without telling Ray why (a signal such as SIGKILL or SIGSEGV, "
                    "the OOM killer, or os._exit)")
        return "worker died: " + cut(said)
    return "worker died: " + cut(lines[0])


def cut(text: str, limit: int = REASON_CHARS) -> str:
    """`text` up to `limit` characters, cut at a word boundary."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


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

    @property
    def name(self) -> str:
        return f"w{self.index}" + (f".{self.generation}" if self.generation else "")


class WorkerPool:
    def __init__(self, spec: RunSpec, ray_address: str | None, send_examples: bool):
        self.spec, self.ray_address, self.send_examples = spec, ray_address, send_examples
        self.slots: list[Slot] = []
        self.started_ray = False
        self.last_death: str | None = None

    def start(self) -> None:
        """Start Ray (or join it) and one actor per slot; return once every actor has built its objectives,
        so the run's clock measures trials, not start-up."""
        import ray

        self.started_ray = connect_ray(self.ray_address)
        self.actor_options, self.threads = worker_resources(self.spec.workers)
        pythonpath = os.pathsep.join(
            p for p in [str(self.spec.base_dir), os.getcwd(), os.environ.get("PYTHONPATH", "")] if p
        )
        self.actor_options["runtime_env"] = {"env_vars": {**OFFLINE_ENV, "PYTHONPATH": pythonpath}}
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

    def _spawn(self, slot: Slot) -> None:
        spec = self.spec
        slot.handle = self.remote_worker.options(max_restarts=0, **self.actor_options).remote(
            slot.name, spec.models, spec.objectives, str(spec.base_dir), spec.seed, spec.allow_pickle, self.threads,
            self.send_examples,
        )

    def replace(self, slot: Slot) -> None:
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        slot.generation += 1
        self._spawn(slot)

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
        else:
            self.replace(slot)
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
