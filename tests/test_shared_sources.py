"""Two workers on one node share their source models: the pages are the files' page cache, not a copy each.

Two real processes each load the same 4 sources and build a candidate that reads every
tensor of every source (a linear merge), then wait; the test reads their memory from
/proc/PID/smaps (per mapping) and smaps_rollup while both hold the sources.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from standins import make_standin

from search.engine.memory_plan import LIMIT_ENV, SHARED_MMAP

REPO = Path(__file__).resolve().parents[1]

# A worker's share of the job: load the sources, build one candidate that reads all of them,
# report, and hold everything until told to exit (a line on stdin).
WORKER = """
import json, sys
from pathlib import Path
from search.engine.materialize import Materializer
from search.engine.recipe import loads

def private_bytes():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) * 1024 for k in ("Private_Clean", "Private_Dirty"))

paths = json.loads(sys.argv[1])
recipe = "models:\\n" + "".join(f"  - model: {n}\\n    parameters: {{weight: 0.25}}\\n" for n in paths)
recipe += "merge_method: linear\\n"
before = private_bytes()
mat = Materializer(paths)
mat.state_dict(loads(recipe))
print(json.dumps({"mode": mat.memory_plan().mode, "private_before": before}), flush=True)
sys.stdin.readline()
"""


def smaps_fields(text: str) -> dict[str, int]:
    """'Rss:  123 kB' lines -> {'Rss': 125952} (bytes)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = out.get(key, 0) + int(parts[0]) * 1024
    return out


def mapped_file_memory(pid: int, folder: Path) -> dict[str, int]:
    """Rss, Pss, Private_Clean, Private_Dirty summed over the process's mappings of files under `folder`."""
    totals: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms offset dev inode path
            inside = len(head) >= 6 and head[5].startswith(str(folder))
            continue
        if inside:
            for k, v in smaps_fields(line).items():
                totals[k] = totals.get(k, 0) + v
    return totals


@pytest.fixture(scope="module")
def four_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-sources")
    paths = {f"src{i}": make_standin(root / f"src{i}", "llama", 4, seed=100 + i, hidden=512, dtype=torch.float32)
             for i in range(4)}
    size = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
    return root, {k: str(v) for k, v in paths.items()}, size


def test_two_workers_share_the_sources_pages(four_sources):
    root, paths, total = four_sources
    assert total > 100 << 20  # sources large enough to dominate what a process holds otherwise
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(paths)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for _ in range(2)
    ]
    try:
        reports = [json.loads(w.stdout.readline() or "{}") for w in workers]  # both hold their sources now
        # read once both hold the sources: a page only one process maps counts as private to it
        mapped = [mapped_file_memory(w.pid, root) for w in workers]
        rollups = [smaps_fields(Path(f"/proc/{w.pid}/smaps_rollup").read_text()) for w in workers]
    finally:
        for w in workers:
            w.stdin.close()  # the worker's readline returns: it exits
            w.wait()
    assert [r.get("mode") for r in reports] == [SHARED_MMAP, SHARED_MMAP], reports
    for m, r, rollup in zip(mapped, reports, rollups):
        assert m["Rss"] >= 0.9 * total, m  # each worker reads every source through the mapping
        assert m["Private_Dirty"] == 0, m  # nothing wrote into a source page
        assert m["Private_Clean"] + m["Private_Dirty"] <= 0.05 * total, m  # the pages are the other worker's too
        # all a worker allocated to load the sources and build (and drop) a candidate: far below a copy of them
        grown = rollup["Private_Clean"] + rollup["Private_Dirty"] - r["private_before"]
        assert grown < 0.5 * total, (grown, total)
    assert sum(m["Pss"] for m in mapped) <= 1.05 * total, mapped  # one copy on the node, not two
