"""Model families for the engine benchmarks: a base model folder and seeded variants of it.

A density method (TIES, DARE) needs a base and fine-tunes of it. No fine-tune can be downloaded
here, so each variant is the base plus a small deterministic random delta: per tensor, Gaussian
noise at `scale` times the tensor's RMS, added in float32 and rounded to the tensor's dtype (the
deltas of a real bf16 fine-tune are likewise a few units in the last place of most weights, and
many are exactly 0). Same seed, same bytes.

- `smollm2_family`: the real model (SmolLM2-135M-Instruct, tests/real_model.py) and variants;
- `tinyllama_family`: the TinyLlama-1.1B-shaped random model of bench/tinyllama.py and variants;
- `seven_b_family`: a random model of Llama-2-7B's widths (hidden 4096, intermediate 11008,
  vocab 32000) at a chosen depth, and variants, written tensor by tensor (a 32-layer one is 13.5 GB:
  never whole in memory).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real model and the stand-ins' tokenizer live with the tests
from real_model import build_once, smollm2_folder  # noqa: E402
SCALE = 0.02
_BESIDE_WEIGHTS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def variant(base: Path, folder: Path, seed: int, scale: float = SCALE) -> Path:
    """base + seeded noise (scale x each tensor's RMS), written once into `folder`."""
    if (folder / "model.safetensors").is_file():
        return folder
    print(f"writing {folder} ...", flush=True)

    def write(tmp: Path) -> None:
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        with safe_open(base / "model.safetensors", "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                x = t.float()
                rms = x.pow(2).mean().sqrt()
                tensors[name] = (x + torch.randn(x.shape, generator=gen) * (scale * rms)).to(t.dtype)
                del x
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in _BESIDE_WEIGHTS:
            if (base / f).is_file():
                shutil.copyfile(base / f, tmp / f)

    return build_once(folder, write)


SEVEN_B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
               rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               rope_theta=10000.0, dtype="bfloat16")


def _seven_b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, v = SEVEN_B["hidden_size"], SEVEN_B["intermediate_size"], SEVEN_B["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def _write_streamed(folder: Path, config: dict, shapes: dict, fill) -> Path:
    """A model folder whose single safetensors file is written tensor by tensor through a mapping
    (search/engine/output.py's MappedShards): fill(name, out) writes each tensor."""
    from search.engine.output import MappedShards

    if (folder / "model.safetensors").is_file():
        return folder
    print(f"writing {folder} ...", flush=True)
    from standins import make_tokenizer

    def write(tmp: Path) -> None:
        with MappedShards(tmp, {n: (s, torch.bfloat16) for n, s in shapes.items()}, max_shard_size=1 << 62) as shards:
            for name in shapes:
                fill(name, shards.tensors[name])
                shards.release(name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        make_tokenizer().save_pretrained(tmp)

    return build_once(folder, write)


def seven_b_family(root: Path, layers: int = 32, count: int = 1) -> tuple[Path, list[Path]]:
    """(a random model of 7B widths with `layers` layers, `count` variants of it), under root."""
    config = dict(SEVEN_B, num_hidden_layers=layers)
    shapes = _seven_b_shapes(layers)
    gen = torch.Generator()

    def base_fill(name: str, out: torch.Tensor) -> None:
        gen.manual_seed(_stable_seed(name))
        flat = out.view(-1)
        for start in range(0, flat.numel(), 1 << 24):  # float32 in 64 MiB pieces
            piece = flat[start : start + (1 << 24)]
            noise = torch.randn(piece.numel(), generator=gen) * 0.02
            if name.endswith("norm.weight"):
                noise += 1
            piece.copy_(noise)

    base = _write_streamed(root / f"7b-{layers}l-base", config, shapes, base_fill)
    variants = []
    for k in range(count):
        mapped = {}

        def variant_fill(name: str, out: torch.Tensor, k=k) -> None:
            if not mapped:
                from search.engine.sources import load_source

                mapped["base"] = load_source("base", base)
            src = mapped["base"].tensors[name].view(-1)
            gen.manual_seed(_stable_seed(name) + 1000 * (k + 1))
            flat = out.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                x = src[start : start + (1 << 24)].float()
                flat[start : start + x.numel()].copy_(x + torch.randn(x.numel(), generator=gen) * (SCALE * 0.02))
            mapped["base"].release([name])

        variants.append(_write_streamed(root / f"7b-{layers}l-variant-{k + 1}", config, shapes, variant_fill))
    return base, variants


def _stable_seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def smollm2_family(root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """(SmolLM2-135M-Instruct's folder, `count` variant folders under root), made on first use."""
    base = smollm2_folder()
    return base, [variant(base, root / f"smollm2-variant-{i + 1}", seed=1000 + i) for i in range(count)]


def tinyllama_family(root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """(the TinyLlama-1.1B-shaped random model's folder, `count` variant folders under root)."""
    from tinyllama import TINYLLAMA, tinyllama_tensors

    base = root / "tinyllama-a"
    if not (base / "model.safetensors").is_file():
        from standins import make_tokenizer

        print(f"writing {base} ...", flush=True)
        base.mkdir(parents=True, exist_ok=True)
        save_file(tinyllama_tensors(1), base / "model.safetensors", metadata={"format": "pt"})
        (base / "config.json").write_text(json.dumps(TINYLLAMA, indent=2))
        make_tokenizer().save_pretrained(base)
    return base, [variant(base, root / f"tinyllama-variant-{i + 1}", seed=2000 + i) for i in range(count)]
