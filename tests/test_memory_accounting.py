"""Every byte a worker keeps is in its estimate: measured resident sets against the memory plan, on stand-ins.

Each check runs in its own process (a fresh interpreter: nothing else in it), which resets its peak
resident set (/proc/self/clear_refs) and reads it back (VmHWM) around the work measured. The
stand-ins are Llama-shaped with a large vocabulary (4M-element embeddings: the tensor a pass's
temporaries scale with) so that the parts estimated, not the interpreter, make the difference:
each check compares what the work added to the process with what the estimate adds to the
runtime it measured, from above (at most 1.2x, issue 21) and from below (an estimate many times
the use would stream sources that fit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=688,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=16384,
              max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=3, dtype="bfloat16")


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v, kv = 256, 688, 16384, 128

    def rand(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": 1 + rand(h), "lm_head.weight": rand(v, h)}
    for n in range(2):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": 1 + rand(h), p + "post_attention_layernorm.weight": 1 + rand(h),
                  p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                  p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                  p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                  p + "mlp.down_proj.weight": rand(h, i)})
    return t


@pytest.fixture(scope="module")
def big_vocab_family(tmp_path_factory) -> dict[str, str]:
    """base and two fine-tunes of it (small deltas, many of them exactly 0, as bf16 fine-tunes have)."""
    from standins import make_tokenizer

    root = tmp_path_factory.mktemp("bigvocab")
    base = _tensors(0)
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        folder = root / name
        folder.mkdir()
        if seed is None:
            tensors = base
        else:
            g = torch.Generator().manual_seed(seed)
            tensors = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.0005).to(v.dtype) for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
        make_tokenizer().save_pretrained(folder)
        paths[name] = str(folder)
    return paths


# Measured in a fresh interpreter: the Materializer's (or Worker's) plan, then the peak resident set of the work.
_MEASURE = """
import json, sys
from pathlib import Path
import torch

def vm(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from search.engine.recipe import loads
if args["kind"] == "worker":
    from search.workers.worker import Worker
    worker = Worker("w0", args["paths"], args["objectives"], args["base_dir"], seed=1)
    plan = worker.materializer.memory_plan()
else:
    if args["kind"] == "live":  # what a worker imports before it plans (search/workers/worker.py)
        import transformers.models.llama.modeling_llama
    from search.engine.materialize import Materializer
    mat = Materializer(args["paths"], memory_limit=args.get("limit"), one_shot=args["kind"] == "one-shot")
    plan = mat.memory_plan(mat.plan(loads(args["recipes"][0])))
Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
for k, text in enumerate(args["recipes"]):
    if args["kind"] == "worker":
        result = worker.begin(k, text, [(0, None)])
        assert result["ok"], result
        plan = worker.materializer.memory_plan()
    elif args["kind"] == "live":
        model = mat.materialize(loads(text), seed=1)
    else:
        _, out = mat.state_dict(loads(text), seed=1)
        del out
print(json.dumps({"runtime": plan.need.runtime, "total": plan.total_bytes, "mode": plan.mode, "sources": plan.need.sources,
                  "candidate": plan.need.candidate, "temporaries": plan.need.temporaries, "evaluation": plan.need.evaluation,
                  "cache": plan.cache_bytes, "peak": vm("VmHWM")}))
"""


def measure(kind: str, paths: dict, recipes: list[str], threads: int = 1, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MERGESEARCH_MEMORY_LIMIT"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS=str(threads))
    args = {"kind": kind, "paths": paths, "recipes": recipes, "threads": threads, **extra}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return m


def family_recipe(method: str, density: float, dtype: str = "bfloat16") -> str:
    params = "{weight: 0.6}" if method == "task_arithmetic" else f"{{weight: 0.6, density: {density}}}"
    return (f"models:\n  - model: base\n  - model: a\n    parameters: {params}\n  - model: b\n    parameters: {params}\n"
            f"merge_method: {method}\nbase_model: base\ndtype: {dtype}\n")


def assert_within_estimate(m: dict, low: float = 0.4) -> None:
    """What the work added beyond the runtime is at most 1.2x what the estimate adds, and not a small part of it."""
    used, estimated = m["peak"] - m["runtime"], m["total"] - m["runtime"]
    assert used <= 1.2 * estimated, f"measured {used / 2**20:.0f} MiB beyond the runtime, estimated {estimated / 2**20:.0f} MiB: {m}"
    assert used >= low * estimated, f"estimated {estimated / 2**20:.0f} MiB, only {used / 2**20:.0f} MiB used: {m}"


@pytest.mark.parametrize("method,dtype", [("ties", "bfloat16"), ("dare_ties", "bfloat16"), ("dare_ties", "float16")])
def test_live_candidates_stay_within_the_estimate(method, dtype, big_vocab_family):
    """Three candidates of the methods with the largest temporaries and cache (TIES's sorts and ranks, DARE's
    draws: kept whole for float16's float32 densities), two lanes: the worker's live model, sources (and
    their float16 copy), temporaries and a filled cache, as estimated."""
    recipes = [family_recipe(method, d, dtype) for d in (0.31, 0.52, 0.74)]
    assert_within_estimate(measure("live", big_vocab_family, recipes, threads=2, limit=8 << 30))


def test_streamed_sources_hold_only_the_jobs_in_flight(big_vocab_family):
    """Streamed (a limit the sources do not fit in): their pages are let go job by job, so the process never
    holds them all; the estimate counts the jobs in flight instead, and holds."""
    recipes = [family_recipe("task_arithmetic", 1.0)] * 2
    m = measure("live", big_vocab_family, recipes, limit=1)
    assert m["mode"] == "streamed"
    sources = sum((Path(p) / "model.safetensors").stat().st_size for p in big_vocab_family.values())
    assert m["peak"] - m["runtime"] < sources + 2 * (Path(big_vocab_family["base"]) / "model.safetensors").stat().st_size
    assert m["peak"] <= 1.2 * m["total"]


def test_a_one_shot_build_keeps_nothing_for_a_next_candidate(big_vocab_family):
    """`mergesearch merge`'s Materializer: no cache in the plan, sources let go of job by job."""
    m = measure("one-shot", big_vocab_family, [family_recipe("ties", 0.4)], threads=2)
    assert m["cache"] == 0
    assert m["peak"] <= 1.2 * m["total"]


def test_a_worker_scoring_candidates_stays_within_the_estimate_it_prints(big_vocab_family, tmp_path):
    """The whole worker, evaluation included: perplexity in batches of 1024 tokens over a 16384-token
    vocabulary (logits of 1024 x 16384: the evaluation's part of the estimate)."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text" for i in range(3000)))
    objectives = [{"kind": "perplexity", "path": str(text), "tokens": 2048, "context": 512, "batch_size": 2}]
    recipes = [family_recipe("ties", d) for d in (0.3, 0.6)]
    m = measure("worker", big_vocab_family, recipes, objectives=objectives, base_dir=str(tmp_path))
    assert_within_estimate(m, low=0.3)


def test_a_one_shot_build_sorts_its_largest_tensors_one_at_a_time(big_vocab_family, monkeypatch):
    """mergekit sorts one task vector at a time; `mergesearch merge` sorts side by side only where that
    holds no more than one sort of the stage's largest tensor (12 bytes an element) or the output's
    size (here the first: a large vocabulary), while a search worker sorts one per lane (its estimate
    counts them)."""
    from search.engine.materialize import Materializer
    from search.engine.methods import ties
    from search.engine.recipe import loads

    at_once = {}  # (one-shot?, elements of the tensor) -> the sorts allowed at once
    map_in_lanes = ties.map_in_lanes

    def spy(fn, items, device, at_most):
        ranks = map_in_lanes(fn, items, device, at_most)
        at_once[(one_shot, ranks[0].numel())] = at_most
        return ranks

    monkeypatch.setattr(ties, "map_in_lanes", spy)
    for one_shot in (True, False):
        Materializer(big_vocab_family, one_shot=one_shot).state_dict(loads(family_recipe("ties", 0.4)))
    largest, small = 16384 * 256, 256 * 256
    assert at_once[(True, largest)] == 1 and at_once[(True, small)] >= 2
    assert at_once[(False, largest)] == 2
