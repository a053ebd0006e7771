"""Where workers fit: Ray places an actor on one node, whole, so room is counted node by node.

A cluster-wide sum misleads: three nodes of one CPU hold three actors of 1 CPU, but
not a fourth, and after one node leaves only two. An actor Ray cannot place waits
for ever (Ray keeps it pending), so the pool asks these functions first: the share of
a CPU each worker takes at start, and whether a replacement has a node with room.
Pure functions over {node id: {resource: amount}}.
"""

from __future__ import annotations

import math

# Ray keeps resource amounts to 4 decimals: a share is rounded down to that, and compared with this slack
_PRECISION = 10_000
_SLACK = 1e-6
_UNBOUNDED = 1 << 30  # an actor that needs nothing fits any number of times


def demand(actor_options: dict) -> dict[str, float]:
    """The resources one worker takes, in Ray's names, from its actor options."""
    need = {"CPU": actor_options.get("num_cpus", 0) or 0, "GPU": actor_options.get("num_gpus", 0) or 0}
    return {k: float(v) for k, v in need.items() if v > 0}


def describe(need: dict[str, float]) -> str:
    """'1 CPU', '1 GPU and 0.5 CPU': what a worker needs, for a message."""
    return " and ".join(f"{v:g} {k}" for k, v in sorted(need.items(), key=lambda kv: kv[0] != "GPU")) or "nothing"


def actors_that_fit(nodes: dict[str, dict[str, float]], need: dict[str, float]) -> int:
    """How many actors each taking `need` the nodes hold, each actor whole on one node."""
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        return _UNBOUNDED
    return sum(min(int((free.get(k, 0.0) + _SLACK) // v) for k, v in need.items()) for free in nodes.values())


def cpu_share(nodes: dict[str, dict[str, float]], workers: int, need: dict[str, float]) -> float | None:
    """The largest share of a CPU, at most one, with which `workers` actors (each also taking `need`)
    fit the nodes; None when no share does. The shares tried are each node's CPUs split evenly."""
    shares = {
        min(1.0, math.floor(free.get("CPU", 0.0) / m * _PRECISION) / _PRECISION)
        for free in nodes.values()
        for m in range(1, workers + 1)
    }
    for share in sorted((s for s in shares if s > 0), reverse=True):
        if actors_that_fit(nodes, {**need, "CPU": share}) >= workers:
            return share
    return None


def free_after(nodes: dict[str, dict[str, float]], held: list[str | None], need: dict[str, float]) -> tuple[dict, int]:
    """The nodes' resources less what the workers in `held` take (each: the node it sits on, or None while
    Ray has not placed it yet), and how many of them are not placed yet (they will take room somewhere).
    A worker on a node not in `nodes` (gone) holds nothing."""
    free = {node: dict(res) for node, res in nodes.items()}
    unplaced = 0
    for node in held:
        if node is None:
            unplaced += 1
        elif node in free:
            for k, v in need.items():
                free[node][k] = free[node].get(k, 0.0) - v
    return free, unplaced
