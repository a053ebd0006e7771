"""Source models: a local HF folder, loaded once and kept.

On the CPU a safetensors source is not read into the process: each tensor is a view
of a private (copy-on-write) memory mapping of its file, so its pages are the page
cache's, read on first use and shared by every worker on the node that maps the same
file. Nothing writes into a source tensor (a write would copy the page into this
process and change the source for later candidates). On a GPU the mapped tensors are
copied to the device once ("resident"), or stay mapped and are streamed
(search/engine/memory_plan.py).

Only safetensors are read by default: a pickle checkpoint (`.bin`, `.pt`) can run
code when it is loaded, so it needs `allow_pickle=True`; it is loaded into the process.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from search.engine.errors import UserError
from search.engine.weight_files import PICKLE_FILES, read_json, safetensors_files



@dataclass
class SourceModel:
    name: str
    path: Path
    config: dict  # config.json contents
    tensors: dict[str, torch.Tensor]  # every stored tensor: on the device, or views of the mapped files
    # The same tensors converted to another dtype, made once on first use (a recipe's `dtype:`).
    converted: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    # name -> (mapping, byte offset, byte length) of the tensors that are views of a mapped file
    regions: dict[str, tuple[mmap.mmap, int, int]] = field(default_factory=dict, repr=False)

    @property
    def mapped(self) -> bool:
        return bool(self.regions)

    def read_ahead(self, names) -> None:
        """Ask the kernel to start reading these tensors' pages from disk (streamed sources: the
        next pass's inputs load while this one computes). A hint: nothing waits for it."""
        for name in names:
            region = self.regions.get(name)
            if region is None:
                continue
            mm, start, length = region
            aligned = start - start % mmap.PAGESIZE
            try:
                mm.madvise(mmap.MADV_WILLNEED, aligned, length + start - aligned)
            except (OSError, ValueError, AttributeError):  # a platform without madvise: reads fault pages in
                return

    def release(self, names) -> None:
        """Let go of these tensors' pages (streamed sources, one-shot builds: a job's inputs once it is done).
        The mapping is private and never written, so its pages are the page cache's: dropping them
        from this process costs a re-read from the page cache if a tensor is read again, never data."""
        for name in names:
            region = self.regions.get(name)
            if region is None:
                continue
            mm, start, length = region
            aligned = start - start % mmap.PAGESIZE
            try:
                mm.madvise(mmap.MADV_DONTNEED, aligned, length + start - aligned)
            except (OSError, ValueError, AttributeError):  # no madvise here: the pages stay until the kernel wants them
                return

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

    @property
    def numel_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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
    return read_json(name, cfg)


def _unreadable(name: str, file: Path, e: Exception) -> UserError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"model {name}: {file} is not a readable safetensors file ({reason}); re-download or re-save it")


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
    files = sorted({path / f for f in read_json(name, index).get("weight_map", {}).values()}) if index.is_file() else []
    files = files or [path / p for p in PICKLE_FILES if (path / p).is_file() and p.endswith((".bin", ".pt", ".pth"))]
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
    """The model at `path`: safetensors mapped (on the CPU) or mapped and copied to `device`."""
    path = Path(path)
    config = read_config(name, path)
    files = safetensors_files(name, path, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    regions: dict[str, tuple[mmap.mmap, int, int]] = {}
    if files:
        for f in files:
            mapped = map_safetensors(name, f)
            if mapped is None:  # a dtype or byte order a view cannot express: read it as before
                try:
                    tensors.update(load_file(f, device=device))
                except SafetensorError as e:
                    raise _unreadable(name, f, e) from None
                continue
            for key, (t, region) in mapped.items():
                if device == "cpu":
                    tensors[key] = t
                    if region is not None:
                        regions[key] = region
                else:  # one tensor at a time: the host holds no more than the page cache does
                    tensors[key] = t.to(device)
    else:
        tensors = {k: v.to(device) for k, v in _load_pickles(name, path).items()}
    return SourceModel(name=name, path=path, config=config, tensors=tensors, regions=regions)


def map_safetensors(name: str, file: Path) -> dict[str, tuple[torch.Tensor, tuple[mmap.mmap, int, int] | None]] | None:
    """Each tensor of a safetensors file as a view of one copy-on-write mapping of the file, with its
    region; None when a tensor's dtype has no torch equivalent here or the host is big-endian."""
    try:
        with safe_open(file, framework="pt"):  # the header checks load_file makes, and its messages
            pass
    except SafetensorError as e:
        raise _unreadable(name, file, e) from None
    if sys.byteorder != "little":  # safetensors is little-endian: views would read swapped bytes
        return None
    with open(file, "rb") as fh:
        # ACCESS_COPY (MAP_PRIVATE): pages are the page cache's until written; a write (none is
        # made) would copy the page into this process, never reach the file or another worker.
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8 : 8 + header_len])
    data_start = 8 + header_len
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        numel = math.prod(shape)
        offset = data_start + begin
        if numel == 0:
            out[key] = (torch.empty(shape, dtype=dtype), None)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=offset).view(shape)
        if offset % t.element_size():  # a writer that did not align its tensors: a copy keeps kernels aligned
            out[key] = (t.clone(), None)
            continue
        out[key] = (t, (mm, offset, end - begin))
    return out


def source_bytes(name: str, path: Path, allow_pickle: bool = False) -> int:
    """Bytes of a source's weight files (what it takes in memory, give or take the headers)."""
    path = Path(path)
    files = safetensors_files(name, path, allow_pickle)
    if not files:  # pickles the caller allowed
        files = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    return sum(os.path.getsize(f) for f in files)
