"""The worker pool: one worker per slot, spawned, replaced when it dies, and timed.

A slot is a worker position. Its worker (search/workers/worker.py) keeps the source models
resident; when the worker dies the slot gets a fresh one (a new generation), and a
slot whose worker cannot even start is retired; a slot whose workers keep dying
before any call returns stops the run (WorkerCrashLoop). A hung call's worker is
killed and replaced (`replace`). The pool also keeps each slot's busy time and
idle gaps, so a run can say how well the workers were used.

Where the workers run (`runs_locally`): on one machine without GPUs they are local
processes forked from one that has imported their libraries (search/workers/local_workers.py:
ready in seconds, not Ray's start plus every worker's imports); on a Ray cluster
(--ray-address), on a machine with GPUs, or in a program that has started Ray they
are Ray actors (search/workers/ray_workers.py). Both answer the same calls: `call` a worker's
method, `wait` for the first answer among calls, `get` it (WorkerDied, CallFailed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from search.engine.errors import UserError
from search.engine.memory_plan import LIMIT_ENV
from search.workers.local_workers import LocalWorkers, runs_locally
from search.workers.ray_workers import RayWorkers
from search.spec.runspec import RunSpec
from search.workers.worker import OFFLINE_ENV, Worker
from search.workers.worker_faults import CallFailed, WorkerDied


# set by the command line (search/commands/cli.py): libraries' warnings as quiet in the workers as on the driver
QUIET_ENV = ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")


def worker_env(spec: RunSpec) -> dict[str, str]:
    """Each worker's environment: offline hub, the spec's folder and this one on its path (custom
    objectives import from there), a memory limit set for the run (search/engine/memory_plan.py), and
    the driver's settings of libraries' warnings."""
    pythonpath = os.pathsep.join(p for p in [str(spec.base_dir), os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
    passed = {k: os.environ[k] for k in (LIMIT_ENV, *QUIET_ENV) if os.environ.get(k)}
    return {**OFFLINE_ENV, "PYTHONPATH": pythonpath, **passed}


# a slot's workers dying this many times in a row, none returning a call, stop the run (3 replacements tried)
MAX_DEATHS_IN_A_ROW = 4


def worker_line(slot: Slot) -> str:
    """'worker w0 on node 3f2a9c01 (cpu): sources shared-mmap: ...' from the worker's info."""
    info = slot.info
    node = (info.get("node") or info.get("host") or "?")[:8]
    return f"worker {slot.name} on node {node} ({info.get('device')}): {info.get('sources_plan') or 'sources ?'}"


class WorkerCrashLoop(UserError):
    """Every replacement of a worker died too: the run stops (its trials can be resumed once fixed)."""


@dataclass
class Slot:
    """One worker position; its worker is replaced when it dies."""

    index: int
    handle: Any = None
    generation: int = 0
    retired: bool = False
    busy_s: float = 0.0
    calls: int = 0
    trials: int = 0
    free_since: float | None = None  # driver clock; to measure idle gaps
    deaths_in_a_row: int = 0  # deaths since the slot's last call that returned
    idle_gaps: list[float] = field(default_factory=list)
    known: dict = field(default_factory=dict)  # what the worker said of itself (info()): node, pid, device
    info_ref: Any = None  # a replacement's info() call, read once it has answered
    retired_why: str | None = None
    workers: Any = None  # the pool's LocalWorkers or RayWorkers, to read info_ref with

    @property
    def name(self) -> str:
        return f"w{self.index}" + (f".{self.generation}" if self.generation else "")

    @property
    def info(self) -> dict:
        """What the slot's worker said of itself; a replacement's answer is read once it is in, without waiting
        (its node stays None until then: a replacement may land on another node than the worker it replaces)."""
        if self.info_ref is not None and self.workers is not None and self.workers.wait([self.info_ref], 0):
            ref, self.info_ref = self.info_ref, None
            try:
                self.known = self.workers.get(ref)
            except (WorkerDied, CallFailed):
                pass  # it died before answering: that death is handled where its call fails
        return self.known

    @info.setter
    def info(self, value: dict) -> None:
        self.known, self.info_ref = value, None


class WorkerPool:
    def __init__(self, spec: RunSpec, ray_address: str | None, send_examples: bool):
        self.spec, self.send_examples = spec, send_examples
        self.workers = LocalWorkers() if runs_locally(ray_address) else RayWorkers(ray_address)
        self.slots: list[Slot] = []
        self.last_death: str | None = None
        self.worker_class: type = Worker

    @property
    def where(self) -> str:
        return self.workers.where

    def start(self, log: Callable[[str], None] | None = None, meanwhile: Callable[[], None] | None = None) -> None:
        """Start (or join) Ray, or the local fork server, and one worker per slot; return once every worker
        has built its objectives, so the run's clock measures trials, not start-up. `log` gets one line per
        worker: where it runs and how it keeps the source models (resident, shared-mmap or streamed).
        `meanwhile` is the driver's own start-up work, done while the fork server imports."""
        self.threads = self.workers.start(self.spec.workers, worker_env(self.spec))
        if meanwhile is not None:
            meanwhile()
        self.slots = [Slot(i, workers=self.workers) for i in range(self.spec.workers)]
        for slot in self.slots:
            self._spawn(slot)
        infos = {slot.index: self.call(slot, "info") for slot in self.slots}
        for slot in self.slots:
            try:
                slot.info = self.get(infos[slot.index])
            except (WorkerDied, CallFailed) as e:
                raise UserError(f"worker {slot.name}: {e.reason}") from None
            if slot.info.get("startup_error"):  # what only the built objectives can say wrong (search/workers/worker.py)
                raise UserError(slot.info["startup_error"])
            if log is not None:
                log(worker_line(slot))

    def worker_args(self, slot: Slot) -> tuple:
        spec = self.spec
        return (slot.name, spec.models, spec.objectives, str(spec.base_dir), spec.seed, spec.allow_pickle,
                self.threads, self.send_examples, spec.adapters)

    def _spawn(self, slot: Slot) -> None:
        slot.handle = self.workers.spawn(self.worker_class, self.worker_args(slot))

    # ---- calls: the same for Ray actors and local processes

    def call(self, slot: Slot, method: str, *args: Any) -> Any:
        """Call `method` on the slot's worker; a reference to wait on."""
        return self.workers.call(slot.handle, method, *args)

    def wait(self, refs: list, timeout: float | None) -> list:
        """Those of `refs` answered (at most one), waiting up to `timeout` seconds (None: until one is)."""
        return self.workers.wait(refs, timeout)

    def get(self, ref: Any) -> Any:
        """A call's result; raises WorkerDied (the worker is gone) or CallFailed (the call raised)."""
        return self.workers.get(ref)

    # ---- deaths and replacements

    def replace(self, slot: Slot, gone: str | None = None) -> bool:
        """Kill the slot's worker and start its next one; True if started. When no live node has room for it
        (`gone`, the node the worker died with, left the cluster and the nodes left are full), the slot is
        retired instead: Ray would keep a worker it cannot place pending for ever, and its calls with it."""
        if slot.handle is not None:
            self.workers.kill(slot.handle)
        held = [other.info.get("node") for other in self.live() if other is not slot and other.handle is not None]
        lacking = self.workers.room_for_another(held, gone)
        if lacking is not None:
            slot.retired, slot.handle = True, None
            slot.retired_why = (f"no node left has room for a replacement ({lacking}); "
                                f"the run goes on with {len(self.live())} worker(s)")
            return False
        slot.generation += 1
        self._spawn(slot)
        slot.info = {}
        slot.info_ref = self.call(slot, "info")
        return True

    def worker_died(self, slot: Slot, e: WorkerDied) -> str:
        """Replace the slot's worker after it died (or retire the slot if it cannot start); the reason.
        A slot whose workers die MAX_DEATHS_IN_A_ROW times without one call returning is a fault that
        replacing will not fix (the models, the objective, the machine): WorkerCrashLoop stops the run."""
        reason = e.reason
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
            self.replace(slot, gone=e.node)
        return reason

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def stop(self) -> None:
        self.workers.stop()  # every worker, the slots' and any not killed yet

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
