"""Benchmark: `mergesearch merge` vs `mergekit-yaml`, end to end, per native merge method: time and peak memory.

Models (--model):
- smollm2: the real model, SmolLM2-135M-Instruct (tests/real_model.py; 30 layers, GQA, tied
  embeddings, bf16, 270 MB), and two seeded variants of it (bench/variants.py);
- tinyllama: a TinyLlama-1.1B-shaped random bf16 model (bench/tinyllama.py; 2.2 GB) and two variants.

Per method, one recipe over the base and its variants (`recipes`): linear, slerp (phigment6's
t-curves), task_arithmetic, ties, dare_ties, dare_linear (--random-seed 1 for both tools) and
passthrough (layers [0, 2n/3) of the base then [n/3, n) of a variant, as SOLAR stacks them).
Both tools run as fresh processes, alternating (the order flips every repeat), each run's output
folder removed and `sync`ed away first, the sources in the page cache for both. Peak memory is
each process's own peak resident set (GNU time's %M). After the runs both
outputs are compared tensor by tensor, bit for bit.

    .venv/bin/python bench/bench_merge_cli.py --model smollm2 [--methods ties dare_ties] [--repeats 3]
    .venv/bin/python bench/bench_merge_cli.py --model tinyllama --methods slerp --dtype seed

Not a test: tinyllama needs ~12 GB of disk and several GiB of memory, and takes many minutes.
Targets (issue 21): merge at least 5x faster than mergekit-yaml on the real model for every native
method, and never a higher peak resident set than mergekit-yaml's (both models).

The floor (printed with the table): what any tool that writes mergekit's bits must spend here too, so
the most a speed-up can be: a fresh process's `import torch` (mergekit's math is torch's, so are
DARE's draws), and for TIES mergekit's own sorts: one `torch.argsort(|delta| as float32,
descending=True)` per task vector and tensor, unstable, whose order among equal magnitudes decides
which elements are kept (search/engine/methods/magnitude_ranks.py) -- timed here one after the
other as mergekit runs them, and as two lanes would share them over this machine's cores.
"""

from __future__ import annotations

import argparse
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
from variants import smollm2_family, tinyllama_family

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seeds" / "phigment6-slerp.yml"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough")
RANDOM_SEED = 1


def recipes(base: Path, variants: list[Path], layers: int, dtype: str | None) -> dict[str, str]:
    """One recipe per method over `base` and its variants (mergekit's YAML)."""
    b, v1, v2 = str(base), str(variants[0]), str(variants[1])
    family = {"weights": [0.6, 0.4], "densities": [0.5, 0.3]}
    out = {
        "linear": {"models": [{"model": m, "parameters": {"weight": w}} for m, w in ((b, 0.5), (v1, 0.3), (v2, 0.2))],
                   "merge_method": "linear"},
        "slerp": _phigment_slerp(b, v1, layers),
        "passthrough": {"slices": [{"sources": [{"model": b, "layer_range": [0, 2 * layers // 3]}]},
                                   {"sources": [{"model": v1, "layer_range": [layers // 3, layers]}]}],
                        "merge_method": "passthrough"},
    }
    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        models = [{"model": b}]
        for m, w, d in zip((v1, v2), family["weights"], family["densities"]):
            params = {"weight": w} if method == "task_arithmetic" else {"weight": w, "density": d}
            models.append({"model": m, "parameters": params})
        out[method] = {"models": models, "merge_method": method, "base_model": b}
    for cfg in out.values():
        cfg.setdefault("dtype", dtype or "bfloat16")
    return {k: yaml.safe_dump(v, sort_keys=False) for k, v in out.items()}


def _phigment_slerp(a: str, b: str, layers: int) -> dict:
    """seeds/phigment6-slerp.yml with these models and their layer range; its t-curves unchanged."""
    cfg = yaml.safe_load(SEED.read_text())
    cfg["slices"][0]["sources"] = [{"model": a, "layer_range": [0, layers]}, {"model": b, "layer_range": [0, layers]}]
    cfg["base_model"] = a
    cfg.pop("dtype", None)
    return cfg


def timed(cmd: list, scratch: Path) -> tuple[float, int]:
    """(seconds, peak resident set in bytes) of one run of `cmd`.

    The peak is GNU time's (%M): a process's peak resident set counts what it held before it exec'd,
    so a tool forked straight from this process (torch imported: ~0.7 GiB) would start from ours;
    /usr/bin/time forks it from its own few MiB."""
    report = scratch / "peak-kib"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *[str(c) for c in cmd]], env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return elapsed, int(report.read_text().split()[-1]) * 1024


def loadavg() -> str:
    p = Path("/proc/loadavg")
    return p.read_text().split()[0] if p.exists() else "?"


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def same_tensors(x: Path, y: Path) -> tuple[int, int]:
    """(tensors compared, tensors whose bits differ) between two output folders."""
    a, b = read_folder(x), read_folder(y)
    if sorted(a) != sorted(b):
        sys.exit(f"the two outputs hold different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    differ = 0
    for k in a:
        p, q = a[k], b[k]
        if p.dtype != q.dtype or p.shape != q.shape or not torch.equal(p.reshape(-1).view(torch.uint8), q.reshape(-1).view(torch.uint8)):
            differ += 1
    return len(a), differ


def import_torch_seconds(repeats: int) -> float:
    """Median wall time of a fresh `python -c "import torch"`."""
    times = []
    for _ in range(max(3, repeats)):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=ENV, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ties_sort_seconds(base: Path, variants: list[Path]) -> float:
    """Seconds of the sorts TIES must run: mergekit's argsort of every task vector's magnitudes, tensor by tensor."""
    total = 0.0
    with safe_open(base / "model.safetensors", "pt") as fb:
        for v in variants:
            with safe_open(v / "model.safetensors", "pt") as fv:
                for name in fb.keys():
                    magnitudes = (fv.get_tensor(name) - fb.get_tensor(name)).abs().view(-1).float()
                    start = time.perf_counter()
                    torch.argsort(magnitudes, descending=True)
                    total += time.perf_counter() - start
    return total


def warm(paths: list[Path]) -> None:
    """Read the sources once, so that neither tool pays the first read from disk."""
    for p in paths:
        with open(p / "model.safetensors", "rb") as fh:
            while fh.read(1 << 26):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tinyllama"], default="smollm2")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--dtype", default="bfloat16", help="the recipes' dtype (default bfloat16, the models'); 'seed' gives slerp phigment6's float16")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both tools (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    root = args.out.resolve()
    if args.model == "smollm2":
        base, variants = smollm2_family(root / "smollm2")
        layers = 30
    else:
        base, variants = tinyllama_family(root / "models")
        layers = 22
    texts = recipes(base, variants, layers, None if args.dtype == "seed" else args.dtype)
    if args.dtype == "seed":
        texts["slerp"] = texts["slerp"].replace("dtype: bfloat16", "dtype: float16")
    warm([base, *variants])

    rows = []
    for method in args.methods:
        recipe = root / f"{args.model}-{method}.yml"
        recipe.write_text(texts[method])
        seed = ["--random-seed", str(RANDOM_SEED)] if method.startswith("dare") else []
        ours_out, theirs_out = root / f"merged-mergesearch-{method}", root / f"merged-mergekit-{method}"
        tools = [("mergesearch merge", [BIN / "mergesearch", "merge", recipe, ours_out, "-q", *seed], ours_out),
                 ("mergekit-yaml", [BIN / "mergekit-yaml", recipe, theirs_out, *seed], theirs_out)]
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in tools}
        loads = []
        for r in range(args.repeats):
            for name, cmd, out in (tools if r % 2 == 0 else tools[::-1]):
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                loads.append(loadavg())
                runs[name].append(timed(cmd, root))
                s, peak = runs[name][-1]
                print(f"{method:16s} run {r + 1}: {name:18s} {s:7.2f} s  peak RSS {peak / 2**30:.2f} GiB  (load before {loads[-1]})", flush=True)
        n, differ = same_tensors(ours_out, theirs_out)
        for _, _, out in tools:
            shutil.rmtree(out, ignore_errors=True)
        ours, theirs = runs["mergesearch merge"], runs["mergekit-yaml"]
        rows.append((method, ours, theirs, n, differ, f"{min(loads)}-{max(loads)}"))

    floor_import = import_torch_seconds(args.repeats)
    floor_sort = ties_sort_seconds(base, variants) if "ties" in args.methods else 0.0
    lanes = min(os.cpu_count() or 1, len(variants))

    print(f"\nmodel: {args.model} ({base}); recipes' dtype {args.dtype}; OMP_NUM_THREADS {ENV.get('OMP_NUM_THREADS', 'unset')}; "
          f"cpus {os.cpu_count()}; repeats {args.repeats}")
    print("| method | merge s (median) | mergekit-yaml s (median) | speed-up | merge peak RSS GiB (max) | mergekit peak RSS GiB (max) | peak ratio | bit-identical | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, ours, theirs, n, differ, load in rows:
        t_o, t_t = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in theirs)
        m_o, m_t = max(m for _, m in ours), max(m for _, m in theirs)
        print(f"| {method} | {t_o:.2f} ({', '.join(f'{s:.2f}' for s, _ in ours)}) | {t_t:.2f} ({', '.join(f'{s:.2f}' for s, _ in theirs)}) | "
              f"{t_t / t_o:.1f}x | {m_o / 2**30:.2f} | {m_t / 2**30:.2f} | {m_o / m_t:.2f} | {n - differ}/{n} | {load} |")
    print(f"\nfloor: a fresh `import torch` {floor_import:.2f} s (median)")
    for method, _, theirs, *_ in rows:
        t_t = statistics.median(s for s, _ in theirs)
        sorts = floor_sort / lanes if method == "ties" else 0.0
        what = f" + mergekit's TIES sorts {floor_sort:.2f} s in a row, {sorts:.2f} s over {lanes} lanes" if method == "ties" else ""
        print(f"  {method}: at least {floor_import + sorts:.2f} s (import torch{what}): "
              f"at most {t_t / (floor_import + sorts):.1f}x mergekit-yaml's {t_t:.2f} s")


if __name__ == "__main__":
    main()
