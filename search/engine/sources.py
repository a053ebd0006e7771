"""Source models: a local HF folder read once into memory and kept there.

Only safetensors are read by default: a pickle checkpoint (`.bin`, `.pt`) can run
code when it is loaded, so it needs `allow_pickle=True`.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from search.engine.errors import UserError

_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


@dataclass
class SourceModel:
    name: str
    path: Path
    config: dict  # config.json contents
    tensors: dict[str, torch.Tensor]  # every stored tensor, resident on the device
    # The same tensors converted to another dtype, made once on first use (a recipe's `dtype:`).
    converted: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if dtype is None or t.dtype == dtype:
            return t
        cache = self.converted.setdefault(dtype, {})
        if name not in cache:
            cache[name] = convert_into(torch.empty(t.shape, dtype=dtype, device=t.device), t)
        return cache[name]


# Elements per piece of a conversion through float32: 1 MiB of float32, stays in cache.
CONVERT_PIECE = 1 << 18


def convert_into(out: torch.Tensor, t: torch.Tensor, piece: torch.Tensor | None = None) -> torch.Tensor:
    """out[...] = t.to(out.dtype), the same bits, faster from bfloat16 to float16.

    torch converts bfloat16 to float16 one element at a time on the CPU; through
    float32 (exact from bfloat16) both steps are vectorized: 4x faster here, and the
    same rounding, NaNs included (tests/test_sources.py checks the bits).
    piece: optional float32 scratch of at least CONVERT_PIECE elements."""
    if not (t.device.type == "cpu" and t.dtype == torch.bfloat16 and out.dtype == torch.float16):
        return out.copy_(t)
    src, dst = t.reshape(-1), out.view(-1)
    if piece is None:
        piece = torch.empty(min(src.numel(), CONVERT_PIECE), dtype=torch.float32)
    for start in range(0, src.numel(), CONVERT_PIECE):
        end = min(src.numel(), start + CONVERT_PIECE)
        f32 = piece[: end - start].copy_(src[start:end])
        dst[start:end].copy_(f32)
    return out


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


# safetensors header dtype names -> torch dtypes (search/engine/output.py writes headers with the inverse)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_config(name: str, path: Path) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise UserError(f"model {name}: {path} does not exist; check the path or --model-map")
    if not cfg.is_file():
        raise UserError(f"model {name}: {path} has no config.json; point it at a Hugging Face model folder")
    return _read_json(name, cfg)


def _read_json(name: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"model {name}: {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"model {name}: {path} is not UTF-8 text; re-download or re-save the model") from None


def _unreadable(name: str, file: Path, e: Exception) -> UserError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"model {name}: {file} is not a readable safetensors file ({reason}); re-download or re-save it")


def safetensors_files(name: str, path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a folder; UserError when there are none or only pickles."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(name, index).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"model {name}: shard {missing[0]} listed in {index.name} is missing; re-download the model")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose
    pickles = [p for p in _PICKLE_FILES if (path / p).exists()] + [p.name for p in sorted(path.glob("pytorch_model-*.bin"))]
    if pickles:
        if allow_pickle:
            return []
        raise UserError(
            f"model {name}: {path / pickles[0]} is a pickle checkpoint, which can run code when loaded; "
            "convert it to safetensors, or pass allow_pickle=True if you trust it"
        )
    raise UserError(f"model {name}: {path} holds no model.safetensors; point it at a folder with safetensors weights")


def read_tensor_infos(name: str, path: Path, allow_pickle: bool = False) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes from the safetensors headers, without reading any tensor."""
    files = safetensors_files(name, path, allow_pickle)
    if not files:  # a pickle the caller allowed: no header to read, so load it
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in _load_pickles(name, path).items()}
    infos = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    infos[key] = TensorInfo(tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32))
        except SafetensorError as e:
            raise _unreadable(name, f, e) from None
    return infos


def _load_pickles(name: str, path: Path) -> dict[str, torch.Tensor]:
    index = path / "pytorch_model.bin.index.json"
    files = sorted({path / f for f in _read_json(name, index).get("weight_map", {}).values()}) if index.is_file() else []
    files = files or [path / p for p in _PICKLE_FILES if (path / p).is_file() and p.endswith((".bin", ".pt", ".pth"))]
    out = {}
    for f in files:
        try:
            # weights_only: torch unpickles tensors and plain containers, and refuses anything else
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise UserError(
                f"model {name}: {f} was refused as unsafe: it holds objects other than tensors, which "
                "weights-only loading does not unpickle; convert it to safetensors from a copy you trust"
            ) from None
        except (RuntimeError, EOFError, KeyError, ValueError) as e:  # truncated or not a checkpoint at all
            raise UserError(f"model {name}: {f} is not a readable checkpoint ({type(e).__name__}); re-download it") from None
    return out


def load_source(name: str, path: Path, device: str = "cpu", allow_pickle: bool = False) -> SourceModel:
    path = Path(path)
    config = read_config(name, path)
    files = safetensors_files(name, path, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            try:
                tensors.update(load_file(f, device=device))
            except SafetensorError as e:
                raise _unreadable(name, f, e) from None
    else:
        tensors = {k: v.to(device) for k, v in _load_pickles(name, path).items()}
    return SourceModel(name=name, path=path, config=config, tensors=tensors)
