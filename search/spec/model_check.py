"""The run's model files, checked on the driver before Ray starts or the study exists.

Only the safetensors headers are read (a few KB per file, no tensor), so a broken
download or a pickle-only folder is one line at once instead of a failure in every
trial. Workers load the same files later through search/engine/sources.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from search.engine.errors import UserError
from search.engine.lora import adapter_file, check_fits, read_adapter
from search.engine.weight_files import safetensors_files  # torch-free: the driver never imports torch

# safetensors refuses headers above 100 MB; a larger length field is a garbage or hostile file
MAX_HEADER_BYTES = 100_000_000


def check_models(models: dict[str, str], used: list[str], allow_pickle: bool,
                 vocab_sizes: dict[str, int | None] | None = None, sets_tokenizer: bool = False,
                 adapters: dict[str, str] | None = None) -> None:
    """Every model the space merges has readable weight files, and tensors of one name agree in shape;
    an adapter (alias -> its folder) fits its model.

    vocab_sizes: alias -> config vocab_size. A tensor indexed by token (first dimension its model's
    vocab_size) may differ in that dimension when the space sets a tokenizer (the merge re-indexes it
    onto one vocabulary); without one, the error says to set it."""
    seen: dict[str, tuple[tuple[int, ...], str, Path]] = {}  # tensor -> (shape, alias, file) of its first model
    for alias in used:
        shapes = model_shapes(alias, Path(models[alias]), allow_pickle)
        if alias in (adapters or {}):
            check_adapter(alias, Path(adapters[alias]), {n: shape for n, (shape, _) in shapes.items()}, allow_pickle)
        for name, (shape, file) in shapes.items():
            first = seen.setdefault(name, (shape, alias, file))
            if first[0] == shape:
                continue
            vocabulary = _vocabulary_rows_only(first[0], first[1], shape, alias, vocab_sizes or {})
            if vocabulary and sets_tokenizer:
                continue
            fix = "the space merges them, so use models of the same size"
            if vocabulary:
                fix = "the vocabularies differ: set `tokenizer_source: union` (or base, or a model) in the space"
            raise UserError(
                f"models.{alias}: {file}: tensor {name} has shape {list(shape)} but models.{first[1]} has "
                f"{list(first[0])} ({first[2]}); {fix}"
            )


def check_adapter(alias: str, folder: Path, model: dict[str, tuple[int, ...]], allow_pickle: bool) -> None:
    """A LoRA adapter mergesearch can merge, whose tensors fit its model's (shapes from the headers)."""
    try:
        file = adapter_file(f"models.{alias}.lora", folder, allow_pickle)
        if file.suffix != ".safetensors" or not model:
            return  # a pickle the spec allows (or a pickled model): the workers read and check it
        shapes = read_header(alias, file)
        check_fits(read_adapter(f"models.{alias}.lora", folder, shapes, allow_pickle), shapes, model, alias)
    except UserError as e:  # the engine says "adapter NAME: ..."; the spec names the field
        raise UserError(str(e).removeprefix("adapter ").replace(
            "pass allow_pickle=True", "add `allow_pickle: true` to the run spec")) from None


def _vocabulary_rows_only(a: tuple, alias_a: str, b: tuple, alias_b: str, vocab_sizes: dict) -> bool:
    if not a or not b or a[1:] != b[1:]:
        return False
    return a[0] == vocab_sizes.get(alias_a) and b[0] == vocab_sizes.get(alias_b)


def writes_tokenizer(space: dict) -> bool:
    """Whether a space spec (any stage of it) sets `tokenizer_source`."""
    if isinstance(space, dict):
        return space.get("tokenizer_source") is not None or any(writes_tokenizer(v) for v in space.values())
    if isinstance(space, list):
        return any(writes_tokenizer(v) for v in space)
    return False


def model_shapes(alias: str, folder: Path, allow_pickle: bool) -> dict[str, tuple[tuple[int, ...], Path]]:
    """tensor -> (shape, file) from the folder's safetensors headers; {} for an allowed pickle checkpoint."""
    try:
        files = safetensors_files(alias, folder, allow_pickle=True)
    except UserError as e:  # the engine names the model its own way: name it as the spec does
        raise UserError(f"models.{alias}: {str(e).removeprefix(f'model {alias}: ')}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"models.{alias}: {folder / 'model.safetensors.index.json'} is not valid JSON; "
                        "re-download the model") from None
    if not files:
        if allow_pickle:
            return {}  # no header to read without unpickling; the workers load it
        pickle = min(p for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
        raise UserError(
            f"models.{alias}: {pickle} is a pickle checkpoint, which can run code when loaded, and the folder has "
            "no safetensors; convert it to safetensors, or add `allow_pickle: true` to the run spec if you trust it"
        )
    shapes = {}
    for file in files:
        shapes.update({name: (shape, file) for name, shape in read_header(alias, file).items()})
    return shapes


def read_header(alias: str, file: Path) -> dict[str, tuple[int, ...]]:
    """tensor -> shape from one safetensors header; UserError if the file is not whole safetensors."""

    def bad(what: str) -> UserError:
        return UserError(f"models.{alias}: {file}: {what}; re-download or re-save the model")

    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes is too short for a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"not a safetensors file (its header length field says {length} bytes, the file has {size})")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise bad("not a safetensors file (its header is not JSON)")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2):
            raise bad(f"not a safetensors file (tensor {name!r} has no shape or data_offsets)")
        shapes[name] = tuple(shape)
        end = max(end, offsets[1])
    data = size - 8 - length
    if end > data:
        raise bad(f"truncated: its tensors need {end} bytes of data but the file holds {data}")
    return shapes


def _ints(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)
