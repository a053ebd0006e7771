"""Workers as processes on this machine, forked from one process that has imported their libraries.

A worker needs torch, transformers' model code and lm-eval: 5.5-8 s of imports on one core of a small
machine, most of a run's start (BENCHMARKS.md, "Search: time to first trial"); with Ray, every worker
imported them on its own, after Ray's own start. Here multiprocessing's fork server imports PRELOAD
once, started as early as can be (`mergesearch run` starts it before it reads the spec, so the imports
overlap the driver's own), and every worker (and every replacement) is forked from it, ready a fraction
of a second after, the imported modules' pages shared. The fork server has only imported modules (no
torch threads, no CUDA), so forking from it is safe. It is this process's for its life: later runs in
the same process fork from it at once.

Each worker answers its calls one at a time, in order, over a pipe (as a Ray actor does); a call is
a LocalCall the pool waits on. A worker that dies (killed, crashed, exited) closes its pipe: every
call it had is answered WorkerDied, with the signal or exit code.
"""

from __future__ import annotations

import atexit
import collections
import glob
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing import popen_forkserver, spawn
from typing import Any

from search.engine.errors import UserError
from search.engine.memory_plan import LIMIT_ENV
from search.workers.worker import OFFLINE_ENV, one_line
from search.workers.worker_faults import CallFailed, WorkerDied, cut

# What the fork server imports once for every worker
PRELOAD = ["search.workers.worker_preload"]
# a dead worker's exit status is read within this long of its pipe closing
REAP_S = 10.0
# a worker whose pipe the pool closed at the run's end is killed after this long (it ends at once, unless a call
# is still running)
CLOSE_S = 5.0


def serve(conn, worker_class: type, args: tuple, env: dict[str, str], cwd: str, log: str) -> None:
    """The worker process: build the worker, then answer calls until the pool closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops the workers
    os.chdir(cwd)  # the driver's, as it is now (the fork server's is the driver's when it started)
    # what the libraries print (lm-eval's and transformers' warnings) goes to the worker's log, not over
    # the driver's progress panel
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ.update(env)
    if LIMIT_ENV not in env:  # the fork server's environment is the first run's: a limit is per run
        os.environ.pop(LIMIT_ENV, None)
    # custom objectives import from the spec's folder (PYTHONPATH is read only at an interpreter's start)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    try:
        worker = worker_class(*args)
    except BaseException as e:
        conn.send(("failed", f"worker failed to start: {cut(one_line(e))}"))
        return
    while True:
        try:
            method, call_args = conn.recv()
        except (EOFError, OSError):
            return  # the pool is gone
        try:
            answer = ("ok", getattr(worker, method)(*call_args))
        except Exception as e:
            answer = ("error", f"worker error: {cut(one_line(e))}\n{traceback.format_exc(limit=8)}")
        conn.send(answer)


class _Popen(popen_forkserver.Popen):
    """Starts a process from the fork server without running this program's main module again in it
    (multiprocessing does, so that functions defined there can be called; a worker needs none, and a
    user's script without an `if __name__ == "__main__"` guard would start its run again in every worker)."""

    def _launch(self, process_obj):
        with_main = spawn.get_preparation_data

        def without_main(name):
            data = with_main(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        spawn.get_preparation_data = without_main
        try:
            super()._launch(process_obj)
        finally:
            spawn.get_preparation_data = with_main


class _Process(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


class LocalCall:
    """One call to a LocalWorker; `answer` is set once it is in: ("ok", result), ("error", reason) or
    ("died", reason)."""

    __slots__ = ("worker", "answer")

    def __init__(self, worker: LocalWorker):
        self.worker, self.answer = worker, None


class LocalWorker:
    """One worker process and its pipe; its calls in the order they were made."""

    def __init__(self, context, worker_class: type, args: tuple, env: dict[str, str], log: str):
        self.conn, theirs = context.Pipe()
        self.process = _Process(target=serve, args=(theirs, worker_class, args, env, os.getcwd(), log),
                                daemon=True)
        self.process.start()
        theirs.close()  # the worker's end is the worker's: its death must close the pipe
        self.pending: collections.deque[LocalCall] = collections.deque()
        self.died: str | None = None

    def call(self, method: str, args: tuple) -> LocalCall:
        call = LocalCall(self)
        if self.died is not None:
            call.answer = ("died", self.died)
            return call
        try:
            self.conn.send((method, args))
        except OSError:
            pass  # it died: reading its pipe says how, and answers this call too
        self.pending.append(call)
        return call

    def read(self) -> None:
        """Take the next message off the pipe (it must have one, or be closed)."""
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self._dead(self._death())
            return
        if kind == "failed":
            self._dead(value)
        elif self.pending:
            self.pending.popleft().answer = (kind, value)

    def _death(self) -> str:
        self.process.join(REAP_S)
        code = self.process.exitcode
        if code is None:
            return "worker died: its pipe closed while the process still runs"
        if code < 0:
            name = signal.Signals(-code).name
            why = " (the OOM killer, or a kill -9)" if name == "SIGKILL" else ""
            return f"worker died: killed by {name}{why}"
        return f"worker died: the process exited with code {code}"

    def _dead(self, reason: str) -> None:
        self.died = reason
        while self.pending:
            self.pending.popleft().answer = ("died", reason)
        self.conn.close()

    def kill(self) -> None:
        if self.died is None:
            self.process.kill()
            self.process.join(REAP_S)
            self._dead("worker died: killed by the pool")


def runs_locally(ray_address: str | None) -> bool:
    """Whether a run's workers are local processes: unless Ray is asked for (an address, or "local" for a
    Ray on this machine), this program has started Ray itself, or there are GPUs (one Ray actor per GPU)."""
    ray = sys.modules.get("ray")
    return not (ray_address or (ray is not None and ray.is_initialized()) or gpus_visible())


def gpus_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes (without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def start_fork_server() -> None:
    """Start the fork server, which imports PRELOAD once for every worker; returns at once (the imports run
    on in it), and does nothing when it runs already."""
    from multiprocessing import forkserver

    from search.workers.ray_workers import environment

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    try:
        with environment(OFFLINE_ENV):  # read by huggingface_hub and datasets when the preload imports them
            forkserver.ensure_running()
    except OSError as e:
        raise UserError(f"cannot start local worker processes: {e}") from None
    atexit.unregister(_stop_fork_server)  # once, however many runs this process starts
    atexit.register(_stop_fork_server)


def _stop_fork_server() -> None:
    """At exit, end the fork server at once: left alone it would finish its imports first (seconds of a core
    spent for nothing after a run that stopped early, e.g. on a bad spec), and only then see this process gone."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # multiprocessing keeps it private
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class LocalWorkers:
    """Worker processes on this machine, forked from the fork server (see the module's docstring)."""

    where = "this machine (local processes)"

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.workers: list[LocalWorker] = []

    def start(self, workers: int, env: dict[str, str]) -> int:
        """Start the fork server (its imports run while the driver goes on), if start_fork_server has not;
        the torch threads each worker gets: the machine's cores shared out, at least one."""
        start_fork_server()
        self.env = env
        self.logs = tempfile.mkdtemp(prefix="mergesearch-workers-")  # each worker's output, as Ray keeps its
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, workers))

    def spawn(self, worker_class: type, args: tuple) -> LocalWorker:
        log = os.path.join(self.logs, f"{args[0]}.log")  # args[0]: the worker's name
        try:
            worker = LocalWorker(self.context, worker_class, args, self.env, log)
        except (OSError, EOFError) as e:  # the fork server could not fork (or died importing PRELOAD)
            raise UserError(f"cannot start a local worker process: {type(e).__name__}: {e}") from None
        self.workers.append(worker)
        return worker

    def call(self, handle: LocalWorker, method: str, *args: Any) -> LocalCall:
        return handle.call(method, args)

    def wait(self, calls: list[LocalCall], timeout: float | None) -> list[LocalCall]:
        """Those of `calls` answered, at most one; [] after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [c for c in calls if c.answer is not None]
            if done:
                return done[:1]
            pipes = {c.worker.conn: c.worker for c in calls if c.worker.died is None}
            if not pipes:
                return []  # cannot be: a dead worker has answered all its calls
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(pipes), timeout=left)
            for conn in ready:
                pipes[conn].read()
            if not ready and left is not None and left <= 0:
                return []

    def get(self, call: LocalCall) -> Any:
        """The call's result (waiting for it); raises WorkerDied or CallFailed."""
        while call.answer is None:
            self.wait([call], None)
        kind, value = call.answer
        if kind == "died":
            raise WorkerDied(value)
        if kind == "error":
            raise CallFailed(value.splitlines()[0])
        return value

    def kill(self, handle: LocalWorker) -> None:
        handle.kill()
        if handle in self.workers:
            self.workers.remove(handle)

    def room_for_another(self, held: list, gone: str | None) -> str | None:
        return None  # a replacement takes the place of the worker it replaces, on the same machine

    def stop(self) -> None:
        """Close every worker's pipe, so each ends on its own (giving back what it holds, such as semaphores),
        and kill those still running CLOSE_S later (a call in progress)."""
        for worker in self.workers:
            if worker.died is None:
                worker.conn.close()
                worker.died = "worker died: stopped by the pool"
        deadline = time.monotonic() + CLOSE_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(REAP_S)
        self.workers.clear()
