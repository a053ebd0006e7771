"""One piece of work on the workers, a trial or a baseline: its attempts, where it ran, what each step took.

Trials (search/run/trial_loop.py) and baselines (search/run/baselines.py) keep the same account,
so their lines in trials.jsonl say the same things: the worker of each attempt, the node and how it
kept the sources, and the timings (seconds building and scoring, busy in all, wall clock when it was
first sent to a worker and when it finished).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def _timings() -> dict:
    return {"materialize_s": [], "score_s": [], "busy_s": 0.0}


@dataclass(kw_only=True)
class Work:
    attempts: int = 0
    started: float = 0.0  # driver clock at this attempt's first call, for trial_timeout
    workers: list[str] = field(default_factory=list)  # one per attempt
    timings: dict = field(default_factory=_timings)
    raised_plan: str | None = None  # the worker's memory plan, when this recipe raised it (worker.py)

    def attempt(self, worker_name: str) -> None:
        """A new attempt starts on this worker."""
        self.attempts += 1
        self.started = time.monotonic()
        self.workers.append(worker_name)
        self.timings.setdefault("dispatched", time.time())

    def took(self, result: dict) -> None:
        """One call's result: its busy time, and what building and scoring took."""
        self.timings["busy_s"] += result["busy_s"]
        for key in ("materialize_s", "score_s"):
            if key in result:
                self.timings[key].append(result[key])
        self.raised_plan = result.get("sources_plan") or self.raised_plan

    def finished(self) -> None:
        self.timings["finished"] = time.time()

    def record(self, worker) -> dict:
        """What trials.jsonl keeps of it; `worker`: the pool's slot of its last attempt, if any."""
        info = worker.info if worker is not None else {}
        return {
            "worker": self.workers[-1] if self.workers else None,
            "workers": self.workers,
            "node": info.get("node"),
            "sources": info.get("sources"),  # resident, shared-mmap or streamed
            "sources_plan": self.raised_plan,  # None unless this recipe raised the worker's memory plan
            "attempts": self.attempts,
            "timings": self.timings,
        }
