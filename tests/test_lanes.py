"""Piece loops in lanes (search/engine/methods/lanes.py): every piece once, and a forked child still runs them."""

from __future__ import annotations

import os
import signal

import torch

from search.engine.methods.lanes import lane_count, map_in_lanes, run_pieces


def test_every_piece_runs_once_in_a_lane_of_one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        run_pieces(1000, 64, lambda start, end, lane: seen.append((start, end, lane, torch.get_num_threads())))
        assert sorted((s, e) for s, e, _, _ in seen) == [(s, min(1000, s + 64)) for s in range(0, 1000, 64)]
        assert {lane for _, _, lane, _ in seen} <= {0, 1} and {t for *_, t in seen} == {1}
        assert torch.get_num_threads() == 2  # the caller keeps its own count
        assert map_in_lanes(lambda x: (x, lane_count()), [1, 2, 3]) == [(1, 1), (2, 1), (3, 1)]  # no lanes inside a lane
    finally:
        torch.set_num_threads(before)


def test_a_forked_child_makes_its_own_lanes():
    """The parent's pool threads do not exist in a child: it must not wait on them forever."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_pieces(10, 2, lambda start, end, lane: None)  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a child waiting on threads it does not have dies instead of hanging the test
            seen = []
            run_pieces(10, 2, lambda start, end, lane: seen.append(start))
            os._exit(0 if sorted(seen) == [0, 2, 4, 6, 8] else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)
