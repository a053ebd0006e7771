"""Benchmark: `mergesearch merge` vs `mergekit-yaml`, end to end, on a TinyLlama-1.1B-shaped pair.

Two random bf16 models shaped like TinyLlama-1.1B (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 KV heads, vocab 32000) are written once as safetensors under
bench/out/, then merged with seeds/phigment6-slerp.yml's t-curves (its layer range
set to the pair's 22 layers) by both tools, alternating, each run a fresh process.
Both outputs are checked to hold the same tensors, bit for bit.

    .venv/bin/python bench/bench_merge_cli.py [--repeats 3] [--out bench/out]

Not a test: it needs ~10 GiB of disk and several GiB of memory, and takes minutes.
Target (issue 2): mergesearch at least 3x faster than mergekit-yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tinyllama import TINYLLAMA, tinyllama_tensors

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seeds" / "phigment6-slerp.yml"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

def make_pair(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from standins import make_tokenizer

    folders = []
    for name, seed in (("tinyllama-a", 1), ("tinyllama-b", 2)):
        folder = root / name
        if not (folder / "model.safetensors").exists():
            print(f"writing {folder} ...", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tinyllama_tensors(seed), folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(TINYLLAMA, indent=2))
            make_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def recipe_for(a: Path, b: Path, dtype: str | None) -> str:
    """phigment6-slerp.yml with the pair's paths and 22-layer range; its t-curves unchanged.

    dtype: the recipe's `dtype:`; None keeps the seed's own (float16, which makes both
    tools convert the bf16 pair), else e.g. bfloat16, the pair's dtype."""
    cfg = yaml.safe_load(SEED.read_text())
    if dtype:
        cfg["dtype"] = dtype
    n = TINYLLAMA["num_hidden_layers"]
    cfg["slices"][0]["sources"] = [
        {"model": str(a), "layer_range": [0, n]},
        {"model": str(b), "layer_range": [0, n]},
    ]
    cfg["base_model"] = str(a)
    return yaml.safe_dump(cfg, sort_keys=False)


def timed(cmd: list) -> float:
    start = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    return elapsed


def _loadavg() -> str:
    p = Path("/proc/loadavg")
    return p.read_text().split()[0] if p.exists() else "?"


def same_tensors(x: Path, y: Path) -> tuple[int, int]:
    """(tensors compared, tensors whose bits differ) between two single-file outputs."""
    differ = 0
    with safe_open(x / "model.safetensors", "pt") as fx, safe_open(y / "model.safetensors", "pt") as fy:
        names = sorted(fx.keys())
        if names != sorted(fy.keys()):
            sys.exit("the two outputs hold different tensor names")
        for k in names:
            a, b = fx.get_tensor(k), fy.get_tensor(k)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)):
                differ += 1
    return len(names), differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--dtype", default="bfloat16", help="the recipe's dtype (default bfloat16, the pair's); 'seed' keeps float16")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both tools (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    root = args.out.resolve()
    a, b = make_pair(root / "models")
    dtype = None if args.dtype == "seed" else args.dtype
    recipe = root / f"tinyllama-slerp-{dtype or 'seed'}.yml"
    recipe.write_text(recipe_for(a, b, dtype))
    ours_out, theirs_out = root / "merged-mergesearch", root / "merged-mergekit"

    ours_cmd = [BIN / "mergesearch", "merge", recipe, ours_out, "-q"]
    theirs_cmd = [BIN / "mergekit-yaml", recipe, theirs_out]
    # warm the page cache with the sources so neither tool pays the first read
    for f in (a, b):
        with open(f / "model.safetensors", "rb") as fh:
            while fh.read(1 << 26):
                pass

    load_before = _loadavg()
    times: dict[str, list[float]] = {"mergesearch merge": [], "mergekit-yaml": []}
    for r in range(args.repeats):
        order = [("mergesearch merge", ours_cmd, ours_out), ("mergekit-yaml", theirs_cmd, theirs_out)]
        if r % 2:
            order.reverse()
        for name, cmd, out in order:
            shutil.rmtree(out, ignore_errors=True)  # each run starts with no output folder
            os.sync()  # and with no dirty pages of the previous run still being written back
            load = _loadavg()
            times[name].append(timed(cmd))
            print(f"run {r + 1}: {name:18s} {times[name][-1]:6.2f} s   (1-min load average before: {load})", flush=True)

    n, differ = same_tensors(ours_out, theirs_out)
    ours, theirs = statistics.median(times["mergesearch merge"]), statistics.median(times["mergekit-yaml"])
    print()
    print(f"pair: TinyLlama-1.1B-shaped, bf16; recipe {recipe}")
    print(f"recipe dtype: {yaml.safe_load(recipe.read_text())['dtype']}; OMP_NUM_THREADS: {ENV.get('OMP_NUM_THREADS', 'unset')} (torch default here: {torch.get_num_threads()}); cpus: {os.cpu_count()}; load average before: {load_before}")
    print(f"{'tool':20s} {'median s':>9s} {'min s':>7s}   runs")
    for name, ts in times.items():
        print(f"{name:20s} {statistics.median(ts):9.2f} {min(ts):7.2f}   {', '.join(f'{t:.2f}' for t in ts)}")
    print(f"speed-up (median): {theirs / ours:.1f}x   (target >= 3x)")
    print(f"outputs: {n} tensors compared, {differ} differ in any bit")


if __name__ == "__main__":
    main()
