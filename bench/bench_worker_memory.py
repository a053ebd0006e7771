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

3. (--part real) A search worker on the real model, per merge method and per space: SmolLM2-135M-Instruct
   and two seeded variants of it (bench/variants.py) as sources; one worker process per case
   (search/workers/worker.py's Worker, as a run starts it), scoring perplexity in batches of 1024
   tokens (the CPU's default batch of the lmeval objective); candidates sampled from the space by
   Optuna's RandomSampler. Printed per case: the estimate the worker prints (its memory plan, raised
   if a recipe needed more) and the measured peaks of its resident set (VmHWM) and private memory
   (USS = Private_Clean + Private_Dirty of /proc/self/smaps_rollup, sampled every 20 ms), each over
   the estimate (issue 21's bound: 1.2). --limit sets the workers' memory limit (a small one streams
   the sources); --family 7b takes random models of Llama-2-7B's widths instead (bench/variants.py).

Run (results go to BENCHMARKS.md by hand), under flock on a shared machine:
    .venv/bin/python bench/bench_worker_memory.py [--candidates 5] [--threads N] [--part memory|time]
    .venv/bin/python bench/bench_worker_memory.py --part real [--cases ties slerp ...] [--trials 3] [--limit 1]
    .venv/bin/python bench/bench_worker_memory.py --part real --family 7b --layers 8 --limit 10G --trials 2
Needs about 3 GiB of free memory and 1 GiB of disk in $TMPDIR (--part real: 4 GiB, the real model's family;
--family 7b: 4 GB of disk per 8 layers and model, three models, and the limit's memory).
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


# One search worker on the real model: its plan, then trials, while a thread samples its private memory.
REAL_WORKER = """
import json, sys, threading, time
from pathlib import Path
from search.workers.worker import Worker

args = json.loads(sys.argv[1])

def rollup():
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0]) * 1024
    return out

peak = {"uss": 0}
def sample():
    while True:
        r = rollup()
        peak["uss"] = max(peak["uss"], r["Private_Clean"] + r["Private_Dirty"])
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
worker = Worker("w0", args["models"], args["objectives"], args["base_dir"], seed=1)
plans = [worker.info()["sources_plan"]]
seconds = []
for k, text in enumerate(args["recipes"]):
    result = worker.begin(k, text, [(0, None)])
    if not result["ok"]:
        print(json.dumps({"error": result["error"], "traceback": result.get("traceback")}), flush=True)
        sys.exit(1)
    plans += [result["sources_plan"]] if "sources_plan" in result else []
    seconds.append(round(result["materialize_s"], 2))
    worker.release()
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("Vm")}
plan = worker.materializer.memory_plan()
print(json.dumps({"plans": plans, "estimate": plan.total_bytes, "mode": plan.mode, "peak_rss": status["VmHWM"],
                  "peak_uss": max(peak["uss"], rollup()["Private_Clean"] + rollup()["Private_Dirty"]),
                  "materialize_s": seconds}), flush=True)
"""

# case -> the space it samples (over base, v1, v2: a model and its two variants), for models of 30 layers
REAL_CASES = {
    "linear": {"kind": "weights", "method": "linear", "models": ["base", "v1", "v2"], "dtype": "bfloat16"},
    "task_arithmetic": {"kind": "weights", "method": "task_arithmetic", "models": ["v1", "v2"], "base": "base", "dtype": "bfloat16"},
    "ties": {"kind": "weights", "method": "ties", "models": ["v1", "v2"], "base": "base", "dtype": "bfloat16"},
    "dare_ties": {"kind": "weights", "method": "dare_ties", "models": ["v1", "v2"], "base": "base", "dtype": "bfloat16"},
    "dare_linear": {"kind": "weights", "method": "dare_linear", "models": ["v1", "v2"], "base": "base", "dtype": "bfloat16"},
    "weights-groups": {"kind": "weights", "method": ["task_arithmetic", "ties", "dare_ties"], "models": ["v1", "v2"],
                       "base": "base", "groups": 3, "dtype": "bfloat16"},
    "slerp": {"kind": "slerp", "models": ["base", "v1"], "dtype": "bfloat16"},
    "layout (passthrough)": {"kind": "layout", "mode": "dus", "models": ["base", "v1"], "m": [4, 12]},
    "expansion (passthrough, scale)": {"kind": "expansion", "model": "base", "placement": ["end", "every"], "count": [2, 6], "every": [4, 8]},
    "moe": {"kind": "moe", "base": "base", "models": ["v1", "v2"], "gate_mode": ["hidden", "random"],
            "prompts": {"v1": ["Write a poem", "Tell a story"], "v2": ["Solve for x", "Compute the sum"]}},
    "compose (slerp, then layout)": {"kind": "compose", "stages": [
        {"name": "blend", "kind": "slerp", "models": ["base", "v1"]},
        {"kind": "layout", "mode": "dus", "models": ["blend"], "m": [6, 10]}]},
}


def for_depth(spec: dict, layers: int) -> dict:
    """A case's space for models of `layers` layers (REAL_CASES' layer counts are for 30)."""
    text = json.dumps(spec)
    if layers != 30:
        text = text.replace('"m": [4, 12]', f'"m": [{max(1, layers // 8)}, {max(1, layers // 3)}]')
        text = text.replace('"m": [6, 10]', f'"m": [{max(1, layers // 5)}, {max(1, layers // 3)}]')
        text = text.replace('"every": [4, 8]', f'"every": [{max(2, layers // 4)}, {max(2, layers // 2)}]')
    return json.loads(text)


def sampled_recipes(spec: dict, paths: dict[str, str], trials: int, seed: int = 0) -> list[str]:
    """`trials` candidates of the space (RandomSampler; pruned ones skipped), as recipe YAML."""
    import optuna

    from search.engine.recipe import as_stages, dump_stages
    from spaces import build_space, read_model_infos

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = build_space(spec, read_model_infos(paths))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    while len(out) < trials:
        trial = study.ask()
        try:
            out.append(dump_stages(as_stages(space.suggest(trial))))
            study.tell(trial, 0.0)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return out


def real_table(cases: list[str], trials: int, limit: str | None, threads: int | None, family: str, layers: int) -> None:
    """Per case, one worker process on a model family: its estimate against its measured peaks."""
    sys.path.insert(0, str(REPO / "bench"))
    from variants import seven_b_family, smollm2_family

    if family == "smollm2":
        base, variants = smollm2_family(REPO / "bench" / "out" / "smollm2")
        # perplexity of English text in batches of 2 x 512 tokens (the lmeval objective's CPU batch: 1024 tokens)
        objective = {"tokens": 2048, "context": 512, "batch_size": 2}
    else:
        base, variants = seven_b_family(REPO / "bench" / "out" / "7b", layers=layers, count=2)
        objective = {"tokens": 64, "context": 64, "batch_size": 1}  # a forward pass of 7B widths costs minutes per 1000 tokens here
    paths = {"base": str(base), "v1": str(variants[0]), "v2": str(variants[1])}
    text = REPO / "README.md"  # English text to score perplexity on
    objectives = [{"kind": "perplexity", "path": str(text), **objective}]
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if limit:
        env[LIMIT_ENV] = limit
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    gib = 1 << 30
    print(f"sources: {base} + 2 variants; objective: perplexity, batches of {objective['batch_size']} x {objective['context']} tokens; "
          f"{trials} candidates per case; memory limit {limit or 'none (what the machine has)'}; load before {os.getloadavg()[0]:.2f}\n")
    print("| case | mode | estimate GiB | peak RSS GiB | RSS / estimate | peak USS GiB | USS / estimate | materialize s per candidate | the worker's plan (last) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        recipes = sampled_recipes(for_depth(REAL_CASES[case], 30 if family == "smollm2" else layers), paths, trials)
        args = {"models": paths, "objectives": objectives, "base_dir": str(REPO), "recipes": recipes}
        proc = subprocess.run([sys.executable, "-c", REAL_WORKER, json.dumps(args)], capture_output=True, text=True, env=env, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"| {case} | failed: {(lines[-1] if lines else proc.stderr[-2000:])} |")
            continue
        r = json.loads(lines[-1])
        e = r["estimate"]
        print(f"| {case} | {r['mode']} | {e / gib:.2f} | {r['peak_rss'] / gib:.2f} | {r['peak_rss'] / e:.2f} | {r['peak_uss'] / gib:.2f} | "
              f"{r['peak_uss'] / e:.2f} | {', '.join(map(str, r['materialize_s']))} | {r['plans'][-1]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--part", choices=["memory", "time", "real"], default=None, help="run only one of the parts")
    ap.add_argument("--cases", nargs="+", choices=list(REAL_CASES), default=list(REAL_CASES), help="--part real: which cases")
    ap.add_argument("--trials", type=int, default=3, help="--part real: candidates per worker")
    ap.add_argument("--limit", default=None, help="--part real: MERGESEARCH_MEMORY_LIMIT for the workers (1: streamed, no cache)")
    ap.add_argument("--family", choices=["smollm2", "7b"], default="smollm2", help="--part real: the sources")
    ap.add_argument("--layers", type=int, default=8, help="--family 7b: layers of the 7B-wide models")
    args = ap.parse_args()
    if args.part == "real":
        real_table(args.cases, args.trials, args.limit, args.threads, args.family, args.layers)
        return
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
