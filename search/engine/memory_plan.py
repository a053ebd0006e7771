"""Where a worker keeps its source models, decided from the memory it needs: on its device, or streamed.

A worker needs its runtime, its sources, one candidate, the merge's temporaries, room to
evaluate and a cache (memory_estimate.py has the parts). When all but the cache fit in the
memory its device has free, the sources stay there ("resident" on a GPU; "shared-mmap" on the
CPU, where they are read-only views of the files' page cache, one copy per node whichever number
of workers reads them). When they do not fit, the sources stay memory-mapped on the host and each
merge pass reads (CPU) or copies (GPU, one job ahead on a side stream) only the tensors it works
on, and lets go of them after: "streamed". Both give the same bits; streaming costs the copies.
The cache gets a share of what is left (memory_estimate.cache_bound), never a fixed size.

MERGESEARCH_MEMORY_LIMIT (bytes, or with a K/M/G/T suffix) replaces the memory the
device reports: a small limit forces streaming, a large one keeps sources resident.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from search.engine.errors import UserError
from search.engine.memory_estimate import ALLOCATOR_SLACK, MemoryNeed, cache_bound, gib

RESIDENT = "resident"  # sources copied once onto the worker's GPU
SHARED_MMAP = "shared-mmap"  # CPU: sources are views of the files' page cache, shared by the node's workers
STREAMED = "streamed"  # sources stay mapped on the host; each pass reads or copies what it needs
MODES = (RESIDENT, SHARED_MMAP, STREAMED)

LIMIT_ENV = "MERGESEARCH_MEMORY_LIMIT"


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    need: MemoryNeed  # the parts, sources as this mode keeps them
    cache_bytes: int  # the statistics cache's bound
    available_bytes: int
    limit_from: str  # where available_bytes comes from: the device, the host, or MERGESEARCH_MEMORY_LIMIT

    @property
    def total_bytes(self) -> int:
        """The estimate: every part, the cache at its bound."""
        return self.need.required + self.cache_bytes

    @property
    def source_bytes(self) -> int:
        return self.need.sources

    @property
    def candidate_bytes(self) -> int:
        return self.need.candidate

    def describe(self) -> str:
        n = self.need
        relation = "<=" if self.total_bytes <= self.available_bytes else ">"
        sources = f"sources {gib(n.sources)}" + (" (the jobs in flight)" if self.mode == STREAMED else "")
        return (
            f"sources {self.mode}: runtime {gib(n.runtime)} + {sources} + candidate {gib(n.candidate)} + "
            f"merge temporaries {gib(n.temporaries)} + evaluation {gib(n.evaluation)} + allocator {gib(ALLOCATOR_SLACK)} + "
            f"cache {gib(self.cache_bytes)} (of {gib(n.cache_useful)} usable) = {gib(self.total_bytes)} "
            f"{relation} {gib(self.available_bytes)} available ({self.limit_from})"
        )


def choose_sources_mode(need: MemoryNeed, available_bytes: int, device_type: str) -> str:
    """The mode for this need: on the device when all but the cache fits, else streamed."""
    if need.required > available_bytes:
        return STREAMED
    return SHARED_MMAP if device_type == "cpu" else RESIDENT


def plan_memory(need: MemoryNeed, device: str, limit: int | None = None, mode: str | None = None) -> MemoryPlan:
    """The plan for `device`: `limit` (else MERGESEARCH_MEMORY_LIMIT, else what the device has free);
    `mode` forces the mode (a forced or an earlier decision) instead of choosing it."""
    device_type = device.split(":")[0]
    if limit is None:
        limit = memory_limit_from_env()
        limit_from = LIMIT_ENV
    else:
        limit_from = "limit given"
    if limit is None:
        free, limit_from = available_memory(device)
        limit = free + need.runtime  # the runtime is in memory already: what is free comes on top of it
    mode = mode or choose_sources_mode(need, limit, device_type)
    kept = need.streamed() if mode == STREAMED else need
    return MemoryPlan(mode, kept, cache_bound(limit, kept), limit, limit_from)


def forced_mode(mode: str, device: str) -> str:
    """A mode asked for by name: "resident" or "streamed" ("resident" on the CPU is "shared-mmap")."""
    if mode not in MODES:
        raise UserError(f"sources: {mode!r} is not a mode; use resident or streamed")
    if mode == STREAMED:
        return STREAMED
    return SHARED_MMAP if device.split(":")[0] == "cpu" else RESIDENT


_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, where: str = LIMIT_ENV) -> int:
    """'2000000', '512M', '8G', '1.5T' (binary units, an optional trailing B or iB) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise UserError(f"{where}: {text!r} is not a size; write bytes, or a number with K, M, G or T (e.g. 8G)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def memory_limit_from_env(environ=os.environ) -> int | None:
    text = environ.get(LIMIT_ENV, "").strip()
    return parse_bytes(text) if text else None


def available_memory(device: str) -> tuple[int, str]:
    """(bytes free for this worker, where the figure comes from): the GPU's free memory, or the host's."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "GPU free memory"
    return host_available_memory()


def host_available_memory() -> tuple[int, str]:
    """MemAvailable (free memory plus the page cache the kernel can drop), capped by the cgroup's room."""
    available = _meminfo_available()
    room = _cgroup_room()
    if room is not None and room < available:
        return room, "cgroup limit"
    return available, "MemAvailable"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its usage (v2, else v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 says "no limit" with a huge number
            return None
        return max(0, int(limit) - usage)
    return None
