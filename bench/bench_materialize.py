"""Benchmark: in-memory materialization (the path search workers use), side by side with
mergekit's in-memory API and with a plain copy of the same bytes.

1. A TinyLlama-1.1B-shaped random pair (hidden 2048, intermediate 5632, 22 layers,
   32 heads, 4 KV heads, vocab 32000, bf16), merged with seeds/phigment6-slerp.yml's
   t-curves (its self_attn / mlp filters match llama names too) at several different
   curves: ours (`Materializer.materialize`, per candidate after warm-up) vs
   `mergekit.merge_methods.api.merge_state_dicts` given the same per-tensor t vs
   `dst.copy_(src)` of every tensor into preallocated, already touched buffers.
   Bandwidth counts bytes read + written: slerp reads two tensors and writes one,
   a copy reads one and writes one.
2. The SOLAR layout (seeds/solar-depth-upscale.yml: layers [0, 24] + [8, 32] of one
   32-layer Mistral) materialized at two widths: aliasing makes its time independent
   of the width.
3. Per merge method (--methods), a model family from disk (--model: smollm2, the real model
   SmolLM2-135M-Instruct and two seeded variants of it; tinyllama, the 1.1B-shaped model and
   two variants; bench/variants.py), mapped as a worker maps its sources: a new candidate per call
   (new weights, densities or t), ours per candidate after one warm-up candidate (the one that
   computes what later candidates reuse: TIES's ranks, DARE's draws, slerp's statistics) vs
   `merge_state_dicts` given the same per-tensor parameters vs a plain copy of one model's bytes.

Run (results go to BENCHMARKS.md by hand), under flock on a shared machine:
    .venv/bin/python bench/bench_materialize.py [--candidates 8] [--skip-mergekit] [--threads N] [--only slerp|solar]
    .venv/bin/python bench/bench_materialize.py --only family --model smollm2 [--methods ties dare_ties ...]
    .venv/bin/python bench/bench_materialize.py --only family --model tinyllama --methods ties --mergekit-runs 1
Needs about 12 GiB of free memory (the tinyllama family: ~10 GiB with TIES's ranks).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

# The steady state of a long search: a worker compiles the fused pass once it pays back
# (search/engine/methods/fused.py); here it compiles at once, so the warm-up holds the compile.
os.environ.setdefault("MERGESEARCH_COMPILE", "1")

from search.engine.materialize import Materializer  # noqa: E402
from search.engine.recipe import load, loads  # noqa: E402
from search.engine.sources import SourceModel  # noqa: E402
from tinyllama import TINYLLAMA  # noqa: E402
from variants import smollm2_family, tinyllama_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILY_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear")

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

def random_model(name: str, config: transformers.PretrainedConfig, seed: int, dtype=torch.bfloat16) -> SourceModel:
    """Random weights of a config's shapes, without building a model (faster, less memory)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        t.normal_(0, 0.02, generator=g)
        tensors[k] = t
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return SourceModel(name=name, path=Path(f"<random {name}>"), config=cfg, tensors=tensors)


def phigment_curve_recipe(a: str, b: str, attn: list[float], mlp: list[float], rest: float, layers: int) -> str:
    return f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, {layers}]
      - model: {b}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: {attn}
    - filter: mlp
      value: {mlp}
    - value: {rest}
dtype: bfloat16
"""


def t_curves(n: int) -> list[tuple[list[float], list[float], float]]:
    """phigment6's own curves, a random curve, the phigment curves swapped, more random ones."""
    seed = load(SEEDS / "phigment6-slerp.yml")[0]
    attn, mlp, rest = (c.value for c in seed.parameters["t"])
    curves = [(attn, mlp, rest), ([0.2, 0.45, 0.35, 0.6, 0.8], [0.75, 0.5, 0.6, 0.4, 0.25], 0.45), (mlp, attn, rest)]
    g = torch.Generator().manual_seed(0)
    while len(curves) < n:
        curves.append(
            ([round(x, 3) for x in torch.rand(5, generator=g).tolist()], [round(x, 3) for x in torch.rand(5, generator=g).tolist()], round(float(torch.rand(1, generator=g)), 3))
        )
    return curves[:n]


def timed(fn, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_slerp(args) -> None:
    config = transformers.LlamaConfig(**{k: v for k, v in TINYLLAMA.items() if k not in ("model_type", "torch_dtype")})
    t0 = time.perf_counter()
    a, b = random_model("tiny-a", config, 1), random_model("tiny-b", config, 2)
    total = sum(t.numel() * t.element_size() for t in a.tensors.values())
    print(f"pair built in {time.perf_counter() - t0:.1f}s: {sum(t.numel() for t in a.tensors.values()) / 1e9:.3f}B params, {total / 2**30:.2f} GiB per model, torch threads {torch.get_num_threads()}")

    mat = Materializer({})
    mat.add_source(a)
    mat.add_source(b)
    recipes = [loads(phigment_curve_recipe("tiny-a", "tiny-b", *c, layers=22)) for c in t_curves(args.candidates)]

    # --- ours -----------------------------------------------------------------
    source_ptrs = {t.data_ptr() for m in (a, b) for t in m.tensors.values()}

    def computed_bytes(model) -> int:
        """Bytes of the parameters this candidate computed (the rest alias a source: t = 0 or 1)."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in source_ptrs)

    # The same bytes, plainly copied into already touched buffers: timed right after each
    # candidate, so that both see the same load on a shared machine.
    dst = {k: torch.empty_like(v) for k, v in a.tensors.items()}
    for v in dst.values():
        v.zero_()

    def copy_all():
        for k, v in a.tensors.items():
            dst[k].copy_(v)

    # Warm-up: the first call builds the resident model, the pair statistics and compiles
    # the pass; the second (curves without 0/1 endpoints) touches every owned buffer once.
    warmup = [timed(lambda: mat.materialize(r))[0] for r in recipes[:2]]
    per_candidate, moved, copies = [], [], []
    for r in recipes[2:]:
        per_candidate += timed(lambda: mat.materialize(r))
        copies += timed(copy_all)
        moved.append(3 * computed_bytes(mat.materialize(r)))
    ours = statistics.median(per_candidate)
    ours_bw = 3 * total / ours / 1e9
    real_bw = statistics.median(m / t for m, t in zip(moved, per_candidate)) / 1e9
    copy_t = statistics.median(copies)
    copy_bw = 2 * total / copy_t / 1e9
    ratio = statistics.median((3 * total / t) / (2 * total / c) for t, c in zip(per_candidate, copies))
    print(
        f"ours: warm-up calls {warmup[0]:.2f}s (resident model, pair statistics, compiling the pass), {warmup[1]:.2f}s; "
        f"per candidate median {ours:.3f}s over {len(per_candidate)} curves ({', '.join(f'{t:.3f}' for t in per_candidate)}) "
        f"= {ours_bw:.1f} GB/s counting every output tensor as two reads + one write; "
        f"{real_bw:.1f} GB/s (median) counting only tensors computed, not aliased "
        f"(computed share per candidate: {', '.join(f'{100 * m / (3 * total):.0f}%' for m in moved)})"
    )
    print(
        f"plain copy (after each candidate): median {copy_t:.3f}s ({', '.join(f'{c:.3f}' for c in copies)}) = {copy_bw:.1f} GB/s read+written; "
        f"ours reaches {100 * ours_bw / copy_bw:.0f}% of it (median of per-candidate ratios {100 * ratio:.0f}%)"
    )
    del dst
    gc.collect()

    # --- mergekit's in-memory API, same per-tensor t ---------------------------
    if not args.skip_mergekit:
        from mergekit.merge_methods.api import merge_state_dicts
        from mergekit.merge_methods.base import PerGroupValues

        mk_times = []
        for r in recipes[2 : 2 + args.mergekit_runs]:
            (plan,) = mat.plan(r)
            ts = {j.name: j.shared["t"] for j in plan.jobs}
            order = list(a.tensors)
            params = {"t": PerGroupValues([ts[k] for k in order])}

            def run():
                out = merge_state_dicts({"a": a.tensors, "b": b.tensors}, "slerp", parameters=params, base="a")
                del out

            mk_times += timed(run)
        mk = statistics.median(mk_times)
        print(f"mergekit merge_state_dicts: median {mk:.3f}s over {len(mk_times)} = {3 * total / mk / 1e9:.1f} GB/s; ours is {mk / ours:.1f}x faster")
    del mat, a, b
    gc.collect()


def bench_solar(args) -> None:
    seed = load(SEEDS / "solar-depth-upscale.yml")
    name = seed[0].referenced_models()[0]
    for hidden in args.solar_widths:
        config = transformers.MistralConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=hidden * 7 // 2,
            num_hidden_layers=32,
            num_attention_heads=hidden // 128,
            num_key_value_heads=max(1, hidden // 512),
            tie_word_embeddings=False,
        )
        src = random_model(name, config, 3)
        src.config["architectures"] = ["MistralForCausalLM"]
        size = sum(t.numel() * t.element_size() for t in src.tensors.values())
        mat = Materializer({})
        mat.add_source(src)
        first = timed(lambda: mat.materialize(seed))[0]
        warm = statistics.median(timed(lambda: mat.materialize(seed), repeat=7))
        sd = statistics.median(timed(lambda: mat.state_dict(seed), repeat=7))
        print(
            f"SOLAR layout, hidden {hidden}: source {size / 2**30:.2f} GiB, output 48 layers; "
            f"materialize first {first:.2f}s, then median {warm * 1000:.1f} ms; state_dict median {sd * 1000:.1f} ms"
        )
        del mat, src
        gc.collect()


def family_recipe(method: str, k: int, layers: int, dtype: str = "bfloat16") -> str:
    """Candidate k of a method over base + v1 + v2: new weights, densities or t-curves each time."""
    g = torch.Generator().manual_seed(100 + k)

    def r(lo: float, hi: float) -> float:
        return round(lo + (hi - lo) * float(torch.rand(1, generator=g)), 3)

    if method == "slerp":
        attn, mlp = [r(0.05, 0.95) for _ in range(5)], [r(0.05, 0.95) for _ in range(5)]
        return phigment_curve_recipe("base", "v1", attn, mlp, r(0.05, 0.95), layers)
    if method == "linear":
        return "models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: {r(0.1, 1)}}}\n" for m in ("base", "v1", "v2")) + f"merge_method: linear\ndtype: {dtype}\n"
    lines = ["models:", "  - model: base"]
    for m in ("v1", "v2"):
        params = f"weight: {r(0.2, 1)}" + ("" if method == "task_arithmetic" else f", density: {r(0.2, 0.9)}")
        lines += [f"  - model: {m}", f"    parameters: {{{params}}}"]
    return "\n".join(lines + [f"merge_method: {method}", "base_model: base", f"dtype: {dtype}", ""])


def mergekit_parameters(plan) -> dict:
    """The plan's per-tensor parameters as merge_state_dicts takes them (PerGroupValues over the tensors)."""
    from mergekit.merge_methods.base import PerGroupValues

    jobs = plan.jobs
    out = {}
    for name in jobs[0].shared:
        out[name] = PerGroupValues([j.shared[name] for j in jobs])
    for name in {k for j in jobs for p in j.per_input for k in p}:
        out[name] = PerGroupValues([{m: p[name] for m, p in zip(j.models, j.per_input) if name in p} for j in jobs])
    return out


def bench_family(args) -> None:
    """Per method, candidates built in memory from a mapped model family: ours vs merge_state_dicts vs a copy."""
    if args.model == "smollm2":
        base, variants = smollm2_family(REPO / "bench" / "out" / "smollm2")
        layers = 30
    else:
        base, variants = tinyllama_family(REPO / "bench" / "out" / "models")
        layers = 22
    paths = {"base": base, "v1": variants[0], "v2": variants[1]}
    for folder in paths.values():  # in the page cache before anything is timed (a worker's sources are, after its first candidate)
        with open(Path(folder) / "model.safetensors", "rb") as fh:
            while fh.read(1 << 26):
                pass
    print(f"model family: {args.model} ({base}); recipes' dtype {args.dtype}; torch threads {torch.get_num_threads()}; load before {os.getloadavg()[0]:.2f}")
    print("| method | first candidate s | per candidate s (median) | GB/s (inputs read + output written) | copy GB/s | vs copy | cache kept GiB | mergekit s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods:
        mat = Materializer(paths, memory_limit=1 << 50)
        seed = 1 if method.startswith("dare") else None
        recipes = [loads(family_recipe(method, k, layers, args.dtype)) for k in range(args.candidates)]
        first = timed(lambda: mat.materialize(recipes[0], seed=seed))[0]
        work = getattr(torch, args.dtype)  # bytes moved and the copy compared with: in the recipe's dtype
        src = {k: v.to(work) for k, v in mat.source("base").tensors.items()}
        model_bytes = sum(t.numel() * t.element_size() for t in src.values())
        inputs = 2 if method == "slerp" else 3
        dst = {k: torch.empty_like(v) for k, v in src.items()}
        for v in dst.values():
            v.zero_()

        def copy_all():
            for k, v in src.items():
                dst[k].copy_(v)

        ours, copies = [], []
        for r in recipes[1:]:
            ours += timed(lambda: mat.materialize(r, seed=seed))
            copies += timed(copy_all)
        del dst
        t, c = statistics.median(ours), statistics.median(copies)
        bw, copy_bw = (inputs + 1) * model_bytes / t / 1e9, 2 * model_bytes / c / 1e9
        mk_cell, speed = "skipped", ""
        if not args.skip_mergekit:
            from mergekit.merge_methods.api import merge_state_dicts

            mk = []
            for r in recipes[1 : 1 + args.mergekit_runs]:
                (plan,) = mat.plan(r)
                models = {m: {k: v.to(work) for k, v in mat.source(m).tensors.items()} for m in plan.jobs[0].models}  # in the recipe's dtype
                params = mergekit_parameters(plan)
                if seed is not None:
                    torch.manual_seed(seed)
                mk += timed(lambda: merge_state_dicts(models, method, parameters=params, base=plan.jobs[0].models[plan.jobs[0].base_index] if plan.jobs[0].base_index is not None else None))
            mk_cell, speed = f"{statistics.median(mk):.2f}", f"{statistics.median(mk) / t:.1f}x"
        print(f"| {method} | {first:.2f} | {t:.3f} ({', '.join(f'{x:.2f}' for x in ours)}) | {bw:.1f} | {copy_bw:.1f} | {100 * bw / copy_bw:.0f}% | "
              f"{mat.cache.bytes / 2**30:.2f} | {mk_cell} | {speed} |", flush=True)
        del mat
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=8, help="t-curves to build; the first two are warm-up")
    p.add_argument("--mergekit-runs", type=int, default=2)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--solar-widths", type=int, nargs=2, default=[512, 2048])
    p.add_argument("--only", choices=["slerp", "solar", "family"])
    p.add_argument("--model", choices=["smollm2", "tinyllama"], default="smollm2", help="the family of --only family")
    p.add_argument("--methods", nargs="+", choices=FAMILY_METHODS, default=list(FAMILY_METHODS))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the family recipes' dtype (the sources are bfloat16; another dtype is a conversion kept by the worker)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only in (None, "slerp"):
        bench_slerp(args)
    if args.only in (None, "solar"):
        bench_solar(args)
    if args.only in (None, "family"):
        bench_family(args)


if __name__ == "__main__":
    main()
