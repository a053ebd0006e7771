"""Model families for the engine benchmarks: a base model folder and seeded variants of it.

A density method (TIES, DARE) needs a base and fine-tunes of it. No fine-tune can be downloaded
here, so each variant is the base plus a small deterministic random delta: per tensor, Gaussian
noise at `scale` times the tensor's RMS, added in float32 and rounded to the tensor's dtype (the
deltas of a real bf16 fine-tune are likewise a few units in the last place of most weights, and
many are exactly 0). Same seed, same bytes.

- `smollm2_family`: the real model (SmolLM2-135M-Instruct, tests/real_model.py) and variants;
- `tinyllama_family`: the TinyLlama-1.1B-shaped random model of bench/tinyllama.py and variants.
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
SCALE = 0.02
_BESIDE_WEIGHTS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def variant(base: Path, folder: Path, seed: int, scale: float = SCALE) -> Path:
    """base + seeded noise (scale x each tensor's RMS), written once into `folder`."""
    if (folder / "model.safetensors").is_file():
        return folder
    print(f"writing {folder} ...", flush=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    tmp.rename(folder)
    return folder


def smollm2_family(root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """(SmolLM2-135M-Instruct's folder, `count` variant folders under root), made on first use."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_model import smollm2_folder

    base = smollm2_folder()
    return base, [variant(base, root / f"smollm2-variant-{i + 1}", seed=1000 + i) for i in range(count)]


def tinyllama_family(root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """(the TinyLlama-1.1B-shaped random model's folder, `count` variant folders under root)."""
    from tinyllama import TINYLLAMA, tinyllama_tensors

    base = root / "tinyllama-a"
    if not (base / "model.safetensors").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from standins import make_tokenizer

        print(f"writing {base} ...", flush=True)
        base.mkdir(parents=True, exist_ok=True)
        save_file(tinyllama_tensors(1), base / "model.safetensors", metadata={"format": "pt"})
        (base / "config.json").write_text(json.dumps(TINYLLAMA, indent=2))
        make_tokenizer().save_pretrained(base)
    return base, [variant(base, root / f"tinyllama-variant-{i + 1}", seed=2000 + i) for i in range(count)]
