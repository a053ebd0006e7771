"""Benchmark: memory per worker on one node, sources read into each worker vs memory-mapped,
and the time of a streamed candidate against a resident one.

1. Four random Llama-shaped sources of ~230 MB each (bf16, hidden 1024, intermediate
   4096, 3 layers, vocabulary 32000) are written to a temporary folder. Two worker
   processes run at once, each loading the four sources and building one candidate
   that reads every tensor of every source (a linear merge, kept, as a worker keeps
   its candidate); with both holding it all, RSS, PSS and private memory (USS:
   Private_Clean + Private_Dirty) are read from /proc/PID/smaps_rollup. Loaders:
   "private copy" reads each file into the process (safetensors' load_file with
   backend="pread", what a read-into-memory loader holds); "load_file" is what
   load_source called before (safetensors 0.8's default backend already maps the
   file copy-on-write); "shared-mmap" is today's loader (search/engine/sources.py).
2. Candidate build time in one process, the modes side by side (interleaved, median):
   resident (shared-mmap) vs streamed (forced with a 1-byte memory limit; the mapped
   files read in place) vs streamed through the staging slots a GPU worker uses
   (`stage_sources=True`, the copies without a GPU), for a slerp in the sources' dtype
   and one with `dtype: float16` (resident keeps converted sources, streamed converts
   each time).

Run (results go to BENCHMARKS.md by hand):
    .venv/bin/python bench/bench_worker_memory.py [--candidates 5] [--threads N] [--part memory|time]
Needs about 3 GiB of free memory and 1 GiB of disk in $TMPDIR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from search.engine.materialize import Materializer
from search.engine.memory_plan import LIMIT_ENV
from search.engine.recipe import loads

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)

# One worker: load the sources ("copy": load_file into the process, the old loader), build a candidate
# that reads all of them, report, hold everything until stdin closes.
WORKER = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from search.engine.materialize import Materializer
from search.engine.recipe import loads
from search.engine.sources import SourceModel

how, paths = sys.argv[1], json.loads(sys.argv[2])
mat = Materializer(paths)
if how in ("private copy", "load_file"):
    backend = "pread" if how == "private copy" else "mmap"
    for name, path in paths.items():
        config = json.loads((Path(path) / "config.json").read_text())
        tensors = load_file(Path(path) / "model.safetensors", backend=backend)
        mat.add_source(SourceModel(name, Path(path), config, tensors))
recipe = "models:\\n" + "".join(f"  - model: {n}\\n    parameters: {{weight: 0.25}}\\n" for n in paths)
_, candidate = mat.state_dict(loads(recipe + "merge_method: linear\\n"))
print(json.dumps({"sources": how if how != "shared" else mat.memory_plan().mode}), flush=True)
sys.stdin.readline()
"""


def write_sources(root: Path, count: int) -> dict[str, str]:
    cfg = transformers.LlamaConfig(**CONFIG)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    paths = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        folder = root / f"src{i}"
        folder.mkdir()
        tensors = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for k, s in shapes.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        config = cfg.to_dict()
        config.update(dtype="bfloat16", architectures=["LlamaForCausalLM"])
        (folder / "config.json").write_text(json.dumps(config))
        paths[f"src{i}"] = str(folder)
    return paths


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0]) * 1024
    return out


def two_workers(how: str, paths: dict[str, str]) -> list[dict]:
    """Two workers at once; each one's memory once both hold sources and candidate."""
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, how, json.dumps(paths)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(2)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
        rows = []
        for p, r in zip(procs, reports):
            m = rollup(p.pid)
            rows.append({"sources": r["sources"], "rss": m["Rss"], "pss": m["Pss"],
                         "private": m["Private_Clean"] + m["Private_Dirty"]})
        return rows
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()


SLERP = """
models:
  - model: src0
  - model: src1
merge_method: slerp
base_model: src0
parameters:
  t:
    - filter: self_attn
      value: [{a}, {b}]
    - filter: mlp
      value: [{b}, {a}]
    - value: 0.5
"""


def build_times(paths: dict[str, str], candidates: int) -> dict[tuple[str, str], float]:
    """Median seconds per candidate for each (recipe, mode), the modes interleaved candidate by candidate."""
    two = {k: paths[k] for k in ("src0", "src1")}
    mats = {
        "resident (shared-mmap)": Materializer(two, memory_limit=1 << 50),
        "streamed (mapped, read in place)": Materializer(two, memory_limit=1),
        "streamed (staged copies, the GPU path)": Materializer(two, memory_limit=1, stage_sources=True),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for recipe, extra in (("slerp bf16", ""), ("slerp dtype: float16", "dtype: float16\n")):
        for k in range(candidates + 1):  # the first is warm-up: statistics, buffers, the live model
            text = SLERP.format(a=round(0.1 + 0.8 * k / (candidates + 1), 3), b=0.3) + extra
            for mode, mat in mats.items():
                t0 = time.perf_counter()
                mat.materialize(loads(text))
                if k:
                    times.setdefault((recipe, mode), []).append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--part", choices=["memory", "time"], default=None, help="run only one of the two parts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sources(Path(tmp), 4)
        total = sum(os.path.getsize(Path(p) / "model.safetensors") for p in paths.values())
        print(f"4 sources, {total / (1 << 20):.0f} MiB in all; 2 workers, each holding the sources and one candidate\n")
        if args.part != "time":
            memory_table(paths)
        if args.part != "memory":
            time_table(paths, args.candidates)


def memory_table(paths: dict[str, str]) -> None:
    """RSS, PSS and private memory of two workers at once, for each loader."""
    mib = 1 << 20
    print("| loader | worker | RSS MiB | PSS MiB | private (USS) MiB |")
    print("|---|---|---|---|---|")
    sums = {}
    for how in ("private copy", "load_file", "shared"):
        rows = two_workers(how, paths)
        for i, r in enumerate(rows):
            print(f"| {r['sources']} | w{i} | {r['rss'] / mib:.0f} | {r['pss'] / mib:.0f} | {r['private'] / mib:.0f} |")
        sums[rows[0]["sources"]] = (sum(r["pss"] for r in rows), sum(r["private"] for r in rows))
    for name, (pss, private) in sums.items():
        print(f"| {name} | both | | {pss / mib:.0f} | {private / mib:.0f} |")


def time_table(paths: dict[str, str], candidates: int) -> None:
    print("\n| candidate | mode | median s | vs resident |")
    print("|---|---|---|---|")
    times = build_times(paths, candidates)
    for (recipe, mode), s in times.items():
        base = times[(recipe, "resident (shared-mmap)")]
        print(f"| {recipe} | {mode} | {s:.3f} | {s / base:.2f}x |")


if __name__ == "__main__":
    main()
