"""PEFT LoRA adapter folders for tests, written directly: adapter_config.json and adapter_model.safetensors
(or .bin), as PEFT saves them, with seeded random weights sized from a stand-in's tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


def write_lora(
    path: str | Path,
    model: str | Path,
    seed: int,
    *,
    linear: dict[str, int] = (),
    embedding: dict[str, int] = (),
    replaced: list[str] = (),
    config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    pickle: bool = False,
) -> Path:
    """An adapter for `model`: LoRAs of the given ranks on the linear modules (module name -> r) and the
    embeddings, `replaced` tensors (modules_to_save, base layers) as seeded perturbations of the model's,
    and adapter_config.json (`config` over PEFT's defaults for r / alpha)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    base = load_file(Path(model) / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) * 0.05).to(dtype)

    tensors = {}
    for module, r in dict(linear).items():
        out, inp = base[f"{module}.weight"].shape
        tensors[f"{PREFIX}{module}.lora_A.weight"] = rnd(r, inp)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = rnd(out, r)
    for module, r in dict(embedding).items():
        tokens, dim = base[f"{module}.weight"].shape
        tensors[f"{PREFIX}{module}.lora_embedding_A"] = rnd(r, tokens)
        tensors[f"{PREFIX}{module}.lora_embedding_B"] = rnd(dim, r)
    for key in replaced:
        name = key.replace(".base_layer.weight", ".weight")
        tensors[PREFIX + key] = base[name] + rnd(*base[name].shape).to(base[name].dtype)
    if pickle:
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model), "r": 8,
        "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "target_modules": sorted({m.rpartition(".")[2] for m in [*dict(linear), *dict(embedding)]}),
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        **(config or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    return path
