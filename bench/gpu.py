"""GPU benchmark: a 7B merge search worker's costs on one device, against the device's own copy speed.

One run, in this order, printing progress as it goes (under 5 minutes on one H100/H200):

1. Sources: three 7B-shaped random bf16 Llama models (hidden 4096, intermediate 14336,
   32 layers, 32 heads, 8 KV heads, vocab 32000) made directly on the device: a base
   and two "fine-tunes" (base + small noise, so merges are not degenerate).
2. Copy bandwidth: `dst.copy_(src)` of a large buffer, bytes read + written per second.
3. Candidates built in place by the Materializer (search/engine/materialize.py) into
   one resident model, timed per candidate after warm-up, device synchronized:
   slerp (per-layer t curves), ties and dare_ties (three models, new weights and
   densities each candidate; the first candidate computes what the others reuse: TIES's
   ranks, DARE's draws) and passthrough (layers 0-15 of one model + 16-31 of another:
   aliased, nothing copied). Effective bandwidth counts the bytes a candidate must read
   and write (slerp: two inputs and one output per tensor; ties: three and one), as a
   fraction of the copy bandwidth. For ties and dare_ties also the peak memory of their
   candidates (torch.cuda.max_memory_allocated; on a CPU the peak resident set) against
   the Materializer's memory estimate (search/engine/memory_estimate.py).
4. Streamed candidate: the same slerp with the sources kept on the host
   (`Materializer(sources="streamed")`, search/engine/memory_plan.py): each candidate
   copies the source tensors to the device job by job, overlapping copy and merge.
5. Evaluation: the lmeval objective (objectives/lmeval.py, token-budget batches) on the
   toy zoo's four tasks, tokens/s of its forward passes against a bare forward pass
   over the same batches of the same tokens.

Targets (issue 13): slerp >= 50% of copy bandwidth and ready <= 100 ms at 7B;
streamed <= 4x resident; evaluation >= 0.8x the bare forward pass. Issue 21: peak memory of
the density candidates at most 1.2x the estimate.

    python bench/gpu.py                # the 7B shapes on the first CUDA device
    python bench/gpu.py --small        # hidden 512, 4 layers, vocab 8000: a minute on a free CPU, to try the script
    python bench/gpu.py --json out.json

Needs torch, transformers, lm-eval and safetensors (Triton, when present, is tried for
the fused pass); no network, no files but a temporary task folder. Exits 1 with one
line per failed section (the others still run and print).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FULL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=8000)
TARGETS = {"slerp_fraction": 0.5, "ready_ms": 100.0, "streamed_ratio": 4.0, "eval_ratio": 0.8}
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


# --- sources -------------------------------------------------------------------------------


def llama_config(shape: dict) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **shape,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "dtype": "bfloat16",
    }  # fmt: skip


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures", "dtype")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_sources(config: dict, device: torch.device):
    """base, ft1, ft2 as SourceModels on `device`: base ~ N(0, 0.02), fine-tunes base + N(0, 0.002)."""
    from search.engine.sources import SourceModel

    shapes = tensor_shapes(config)
    g = torch.Generator(device=device).manual_seed(0)
    models = {name: {} for name in ("base", "ft1", "ft2")}
    for k, shape in shapes.items():
        base = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g)
        models["base"][k] = base
        for name in ("ft1", "ft2"):
            noise = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.002, generator=g)
            models[name][k] = noise.add_(base)
    sync(device)
    return {name: SourceModel(name, Path(f"<random {name}>"), dict(config), tensors) for name, tensors in models.items()}


def model_bytes(source) -> int:
    return sum(t.numel() * t.element_size() for t in source.tensors.values())


# --- recipes -------------------------------------------------------------------------------


def slerp_recipe(layers: int, rng: random.Random) -> str:
    curve = lambda: [round(rng.uniform(0.05, 0.95), 3) for _ in range(5)]  # noqa: E731 (never 0 or 1: every tensor computed)
    return f"""
slices:
  - sources:
      - model: base
        layer_range: [0, {layers}]
      - model: ft1
        layer_range: [0, {layers}]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: {curve()}
    - filter: mlp
      value: {curve()}
    - value: {round(rng.uniform(0.05, 0.95), 3)}
dtype: bfloat16
"""


def density_recipe(method: str, rng: random.Random) -> str:
    """ties / dare_ties over base + ft1 + ft2, with new weights and densities."""
    def params():
        return f"{{weight: {round(rng.uniform(0.2, 0.8), 3)}, density: {round(rng.uniform(0.3, 0.7), 3)}}}"

    return f"""
merge_method: {method}
base_model: base
models:
  - model: ft1
    parameters: {params()}
  - model: ft2
    parameters: {params()}
dtype: bfloat16
"""


def passthrough_recipe(layers: int, rng: random.Random) -> str:
    cut = rng.randint(1, layers - 1)
    return f"""
slices:
  - sources:
      - model: ft1
        layer_range: [0, {cut}]
  - sources:
      - model: ft2
        layer_range: [{cut}, {layers}]
merge_method: passthrough
dtype: bfloat16
"""


# --- measurements --------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by dst.copy_(src) into an already touched buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = [timed(device, lambda: dst.copy_(src)) for _ in range(repeats)]
    del src, dst
    return 2 * nbytes / statistics.median(times)


def candidate_times(device, materializer, recipes: list, warmup: int = 2) -> tuple[float, list[float], object]:
    """(first candidate's seconds, later candidates' seconds, the last model)."""
    from search.engine.recipe import loads

    plans = [loads(r) for r in recipes]
    model = None

    def build(plan):
        nonlocal model
        model = materializer.materialize(plan)

    first = timed(device, lambda: build(plans[0]))
    for plan in plans[1:warmup]:
        timed(device, lambda: build(plan))
    return first, [timed(device, lambda p=p: build(p)) for p in plans[warmup:]], model


def bench_merges(args, device, sources, copy_bw: float, rows: list, results: dict) -> object:
    from search.engine.materialize import Materializer

    rng = random.Random(0)
    layers = sources["base"].config["num_hidden_layers"]
    size = model_bytes(sources["base"])
    mat = Materializer({}, device=str(device))
    for s in sources.values():
        mat.add_source(s)

    log("slerp: warm-up (pair statistics, resident model), then timed candidates")
    first, times, model = candidate_times(device, mat, [slerp_recipe(layers, rng) for _ in range(2 + args.candidates)])
    slerp_s = statistics.median(times)
    fraction = 3 * size / slerp_s / copy_bw
    results["slerp"] = {"first_s": first, "median_s": slerp_s, "times_s": times, "fraction_of_copy": fraction}
    rows.append(("slerp candidate, ready", f"{slerp_s * 1e3:.1f} ms", f"<= {TARGETS['ready_ms']:.0f} ms (7B)",
                 _met(slerp_s * 1e3 <= TARGETS["ready_ms"]) if not args.small else "n/a (small)"))
    rows.append(("slerp effective bandwidth", f"{3 * size / slerp_s / 1e9:.0f} GB/s = {fraction:.0%} of copy",
                 f">= {TARGETS['slerp_fraction']:.0%} of copy", _met(fraction >= TARGETS["slerp_fraction"])))
    rows.append(("slerp first candidate (warm-up)", f"{first * 1e3:.0f} ms", "", ""))
    log(f"slerp: {slerp_s * 1e3:.1f} ms per candidate ({fraction:.0%} of copy bandwidth)")

    for method in ("ties", "dare_ties"):
        bench_density(args, device, mat, method, size, copy_bw, rng, rows, results)

    log("passthrough: timed candidates")
    first, times, _ = candidate_times(device, mat, [passthrough_recipe(layers, rng) for _ in range(2 + args.candidates)])
    pass_s = statistics.median(times)
    results["passthrough"] = {"first_s": first, "median_s": pass_s, "times_s": times}
    rows.append(("passthrough candidate (aliased layers)", f"{pass_s * 1e3:.1f} ms", "", ""))

    from search.engine.methods import fused_triton

    results["fused_pass"] = fused_triton.status()
    used = [k for k, v in results["fused_pass"].items() if k != "unavailable" and v]
    if device.type == "cpu":
        kind = "CPU: eager ops in cache-sized pieces, or Inductor-compiled once that pays back (fused.py)"
    else:
        kind = "fused Triton kernel (bit-checked on this device)" if used else "eager torch ops (mul, mul, add)"
    rows.append(("slerp combine pass", kind, "", ""))
    # the slerp candidate stays resident for the evaluation section
    return mat.materialize(loads_first(slerp_recipe(layers, random.Random(1)))), slerp_s


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_density(args, device, mat, method: str, size: int, copy_bw: float, rng, rows: list, results: dict) -> None:
    """A density method's candidates: the first (ranks or draws made), then the timed ones; peak memory vs estimate."""
    from search.engine.recipe import loads

    recipes = [density_recipe(method, rng) for _ in range(1 + max(2, args.candidates // 2))]
    seed = 1 if method.startswith("dare") else None
    estimate = mat.memory_plan(mat.plan(loads(recipes[0]))).total_bytes
    log(f"{method}: first candidate (computes what later ones reuse), then timed candidates; estimate {estimate / 2**30:.2f} GiB")
    reset_peak(device)
    first = timed(device, lambda: mat.materialize(loads(recipes[0]), seed=seed))
    times = [timed(device, lambda r=r: mat.materialize(loads(r), seed=seed)) for r in recipes[1:]]
    peak = peak_bytes(device)
    estimate = mat.memory_plan().total_bytes  # as raised by the recipes, if they needed more
    median = statistics.median(times)
    fraction = 4 * size / median / copy_bw
    results[method] = {"first_s": first, "median_s": median, "times_s": times, "fraction_of_copy": fraction,
                       "peak_bytes": peak, "estimate_bytes": estimate, "plan": mat.memory_plan().describe()}
    rows.append((f"{method} candidate (3 models)", f"{median * 1e3:.0f} ms = {fraction:.0%} of copy; first {first:.1f} s", "", ""))
    rows.append((f"{method} peak memory ({'CUDA allocated' if device.type == 'cuda' else 'resident set'})",
                 f"{peak / 2**30:.2f} GiB = {peak / estimate:.2f}x the estimate ({estimate / 2**30:.2f} GiB)", "<= 1.2x estimate",
                 _met(peak <= 1.2 * estimate)))
    log(f"{method}: {median * 1e3:.0f} ms per candidate, peak {peak / 2**30:.2f} GiB of an estimated {estimate / 2**30:.2f} GiB")


def loads_first(text: str):
    from search.engine.recipe import loads

    return loads(text)


def bench_streamed(args, device, sources, resident_s: float, rows: list, results: dict) -> None:
    import inspect

    from search.engine.materialize import Materializer
    from search.engine.sources import SourceModel

    rng = random.Random(2)
    layers = sources["base"].config["num_hidden_layers"]
    log("streamed: sources copied to the host")
    host = {n: SourceModel(n, Path(f"<host {n}>"), s.config, {k: v.to("cpu") for k, v in s.tensors.items()})
            for n, s in sources.items() if n in ("base", "ft1")}
    params = inspect.signature(Materializer).parameters
    if "sources" in params:
        kwargs = {"sources": "streamed"}
        if "stage_sources" in params:
            kwargs["stage_sources"] = True  # on a CPU: the GPU's copy-to-device path, run without one
        mat = Materializer({}, device=str(device), **kwargs)
        for s in host.values():
            mat.add_source(s)
        log("streamed: warm-up, then timed candidates")
        first, times, _ = candidate_times(device, mat, [slerp_recipe(layers, rng) for _ in range(2 + max(2, args.candidates // 2))])
        mode = getattr(mat, "memory_plan", lambda: None)()
        label = f"streamed slerp ({getattr(mode, 'mode', 'streamed')})"
    else:  # no streamed mode in this checkout: a proxy, said so in the table
        size = model_bytes(sources["base"])
        staging = torch.empty(2 * size // 2, dtype=torch.bfloat16, device=device)

        def proxy():
            offset = 0
            for s in host.values():
                for t in s.tensors.values():
                    staging[offset : offset + t.numel()].copy_(t.view(-1), non_blocking=True)
                    offset += t.numel()

        first = timed(device, proxy)
        times = [timed(device, proxy) + resident_s for _ in range(2)]
        label = "streamed PROXY (host->device copy + resident slerp)"
    streamed_s = statistics.median(times)
    ratio = streamed_s / resident_s
    results["streamed"] = {"first_s": first, "median_s": streamed_s, "times_s": times, "vs_resident": ratio, "label": label}
    rows.append((label, f"{streamed_s * 1e3:.0f} ms = {ratio:.1f}x resident", f"<= {TARGETS['streamed_ratio']:.0f}x resident",
                 _met(ratio <= TARGETS["streamed_ratio"])))
    log(f"streamed: {streamed_s * 1e3:.0f} ms per candidate ({ratio:.1f}x resident)")
    del host
    gc.collect()


def bench_eval(args, device, model, rows: list, results: dict) -> None:
    from objectives import build_objectives
    from objectives.token_batches import default_batch_tokens, token_batches
    from objectives.zoo.skills import SKILLS, eval_split
    from objectives.zoo.tasks import write_task_folder
    from objectives.zoo.tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    n = args.eval_examples
    budget = default_batch_tokens(device.type)
    with tempfile.TemporaryDirectory() as tmp:
        rng, seen = random.Random(0), set()
        skills = ["fst", "nxt", "cnt", "max"]
        for skill in skills:
            write_task_folder(Path(tmp) / skill, skill, {"search": eval_split(SKILLS[skill], rng, n, seen)}, Path(tmp) / skill)
        spec = {"kind": "lmeval", "include_path": tmp, "tasks": [f"{s}_search" for s in skills], "num_fewshot": args.fewshot}
        objective = build_objectives([spec], Path(tmp))[0]
        log(f"eval: lmeval objective, {len(skills)} tasks x {n} examples, {args.fewshot}-shot, batches of {budget} tokens")
        with torch.inference_mode():
            objective.task_scores(model, tokenizer)  # builds requests and encodings once, as a worker does
            encoded = list(objective._encodings[tokenizer].values())  # (context, continuation) tokens of every request
            inputs = [(ctx + cont)[:-1] for ctx, cont in encoded]
            conts = [cont for _, cont in encoded]
            tokens = sum(len(x) for x in inputs)
            batches = token_batches([len(x) for x in inputs], budget)
            padded = [_padded(inputs, conts, b, device) for b in batches]

            def bare():
                for ids, targets, mask in padded:
                    greedy = model(input_ids=ids).logits.argmax(-1)
                    ((greedy == targets) | ~mask).all(dim=1).sum()

            bare()  # warm-up
            objective_times, bare_times = [], []
            for _ in range(args.eval_repeats):  # interleaved: both see the same machine
                objective_times.append(timed(device, lambda: objective.task_scores(model, tokenizer)))
                bare_times.append(timed(device, bare))
    obj_tps, bare_tps = tokens / statistics.median(objective_times), tokens / statistics.median(bare_times)
    ratio = obj_tps / bare_tps
    results["eval"] = {"tokens": tokens, "requests": len(inputs), "batches": len(batches), "budget": budget,
                       "objective_s": objective_times, "bare_s": bare_times, "ratio": ratio}
    rows.append((f"eval tokens/s ({len(inputs)} requests, {tokens} tokens)", f"objective {obj_tps:,.0f} vs bare {bare_tps:,.0f} = {ratio:.2f}x",
                 f">= {TARGETS['eval_ratio']}x bare", _met(ratio >= TARGETS["eval_ratio"])))
    log(f"eval: objective {obj_tps:,.0f} tokens/s, bare forward {bare_tps:,.0f} tokens/s")


def _padded(inputs, conts, batch, device):
    """Right-padded input ids, the continuation's target ids at their positions, and their mask."""
    width = max(len(inputs[i]) for i in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.zeros_like(ids)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, i in enumerate(batch):
        x, cont = inputs[i], conts[i]
        ids[row, : len(x)] = torch.tensor(x)
        start = len(x) - len(cont)
        targets[row, start : len(x)] = torch.tensor(cont)
        mask[row, start : len(x)] = True
    return ids.to(device), targets.to(device), mask.to(device)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_table(device_label: str, shape: str, rows: list) -> None:
    widths = [max(len(r[i]) for r in rows + [("measure", "result", "target", "met?")]) for i in range(4)]
    print()
    print(f"bench/gpu.py on {device_label}")
    print(f"shapes: {shape}")
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format("measure", "result", "target", "met?"))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="hidden 512, 4 layers: to try the script on a CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--candidates", type=int, default=None, help="timed candidates per method (default 5; 2 with --small)")
    parser.add_argument("--eval-examples", type=int, default=None, help="examples per task (default 512; 16 with --small)")
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--fewshot", type=int, default=None, help="few-shot examples per prompt, for longer contexts (default 4; 0 with --small)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 4096 MiB; 256 with --small)")
    parser.add_argument("--skip-streamed", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on a CPU (default 1: on a shared machine more threads wait on each other's barriers)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.candidates = args.candidates or (2 if args.small else 5)
    args.eval_examples = args.eval_examples or (16 if args.small else 512)
    args.fewshot = (0 if args.small else 4) if args.fewshot is None else args.fewshot
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = SMALL if args.small else FULL
    config = llama_config(shape)
    label = device_name(device)
    log(f"device: {label}")
    rows: list[tuple[str, str, str, str]] = []
    results: dict = {"device": label, "shape": shape}
    failures: list[str] = []

    def section(name: str, fn):
        try:
            return fn()
        except Exception as e:  # one line, then the other sections still run
            message = f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"FAILED {message}")
            rows.append((name, "FAILED", "", ""))
            failures.append(message)
            return None

    log("making random bf16 sources on the device")
    sources = section("sources", lambda: random_sources(config, device))
    if sources is None:
        print(f"bench/gpu.py: failed: {failures[0]}", file=sys.stderr)
        return 1
    size = model_bytes(sources["base"])
    params = sum(t.numel() for t in sources["base"].tensors.values())
    shape_label = ", ".join(f"{k.replace('_size', '').replace('num_', '')} {v}" for k, v in shape.items())
    shape_label += f"; {params / 1e9:.2f}B params, {size / 2**30:.2f} GiB per model (bf16)"
    log(f"sources ready: {shape_label}")

    copy_mib = args.copy_mib or (256 if args.small else 4096)
    copy_bw = section("copy bandwidth", lambda: copy_bandwidth(device, copy_mib << 20))
    if copy_bw is None:
        copy_bw = float("nan")
    else:
        rows.append(("copy bandwidth (read + write)", f"{copy_bw / 1e9:.0f} GB/s", "", ""))
        results["copy_bandwidth"] = copy_bw
        log(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    merged = section("merges", lambda: bench_merges(args, device, sources, copy_bw, rows, results))
    model, slerp_s = merged if merged is not None else (None, None)
    if not args.skip_streamed and slerp_s:
        section("streamed", lambda: bench_streamed(args, device, sources, slerp_s, rows, results))
    if model is not None:
        for name in ("ft2",):  # make room for evaluation: ties' third model is no longer needed
            sources.pop(name, None)
        gc.collect()
        section("eval", lambda: bench_eval(args, device, model, rows, results))
    print_table(label, shape_label, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    log("done")
    if failures:
        print(f"bench/gpu.py: failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/gpu.py: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # anything outside the sections: one line
        print(f"bench/gpu.py: failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
