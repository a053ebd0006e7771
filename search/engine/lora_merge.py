"""A LoRA adapter merged into its model's tensors, bit for bit as mergekit 0.1.5 gets them from PEFT.

mergekit loads the model in its own dtype, lets PEFT merge the adapter (`merge_and_unload`) and saves the
result. PEFT keeps LoRA weights in float32 when the model is in bfloat16 or float16 (else in the model's
dtype), then, per changed tensor W (lora.py says which):
    linear:     W += (B @ A) * scaling                  (the float32 delta added into W, in W's dtype)
    embedding:  W += ((B @ A)^T * scaling).to(W.dtype)  (the delta rounded to W's dtype first)
    replaced:   W = the adapter's tensor, in W's dtype  (before W's own LoRA, if it has one)
Done once per worker on the CPU (where mergekit does it), so every device gives mergekit's bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from search.engine.errors import UserError
from search.engine.lora import Adapter, adapter_file, read_adapter
from search.engine.sources import SourceModel

_HALF = (torch.bfloat16, torch.float16)


def load_adapter(name: str, path: Path, allow_pickle: bool = False) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The adapter at `path` and its weights (small: read whole, into memory)."""
    file = adapter_file(name, Path(path), allow_pickle)
    try:
        if file.suffix == ".safetensors":
            weights = load_file(file)
        else:  # weights only: torch unpickles tensors and plain containers, and refuses anything else
            weights = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"adapter {name}: {file} is not a readable adapter file ({reason}); re-save the adapter") from None
    return read_adapter(name, Path(path), {k: tuple(v.shape) for k, v in weights.items()}, allow_pickle), weights


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's delta of a linear LoRA: (B @ A) * scaling, in the LoRA weights' dtype."""
    return (lora_b @ lora_a) * scaling


def merged_tensors(tensors: dict[str, torch.Tensor], adapter: Adapter, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors with the adapter merged in; tensors it leaves alone are the same objects."""
    out = dict(tensors)
    for tensor, key in adapter.replaced.items():
        out[tensor] = weights[key].to(tensors[tensor].dtype).clone()
    for tensor, lora in adapter.loras.items():
        w = out[tensor]
        lora_dtype = torch.float32 if w.dtype in _HALF else w.dtype  # PEFT's autocast of adapter weights
        a, b = weights[lora.lora_a].to(lora_dtype), weights[lora.lora_b].to(lora_dtype)
        merged = w.clone()
        if lora.kind == "linear":
            merged += lora_delta(a, b, lora.scaling)
        else:
            merged += ((b @ a).T * lora.scaling).to(w.dtype)
        out[tensor] = merged
    return out


def with_adapter(source: SourceModel, adapter: Adapter, weights: dict[str, torch.Tensor], device: str) -> SourceModel:
    """`source` (loaded on the CPU) with the adapter merged in, its tensors on `device`."""
    tensors = merged_tensors(source.tensors, adapter, weights)
    kept = {k: r for k, r in source.regions.items() if tensors[k] is source.tensors[k]}  # still views of the file
    if device != "cpu":
        tensors, kept = {k: v.to(device) for k, v in tensors.items()}, {}
    return SourceModel(name=source.name, path=source.path, config=source.config, tensors=tensors, regions=kept)
