"""OpenMP threads that sleep when idle, set before torch starts them.

A merge pass runs its piece loops in lanes (search/engine/methods/lanes.py) and its whole-tensor
sums on the calling thread with torch's own threads. By default libgomp's idle threads spin for a
while after every parallel region: on the cores the lanes need. Measured on the real model (2 cores):
a DARE-TIES candidate in a worker took 10-11 s with spinning threads, 6 s with sleeping ones
(OMP_WAIT_POLICY=PASSIVE), the same bits. libgomp reads the setting once, when torch loads it, so
this must run before the first `import torch` of the process; a value the user set is kept.
"""

from __future__ import annotations

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def sleep_when_idle() -> None:
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")
