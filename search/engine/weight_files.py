"""Which files of a model folder hold its weights: torch-free, so the driver can check a run's models
(search/spec/model_check.py) without importing torch (seconds on a small machine, which Ray's start and the
workers' imports need at the same moment)."""

from __future__ import annotations

import json
from pathlib import Path

from search.engine.errors import UserError

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


def read_json(name: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"model {name}: {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"model {name}: {path} is not UTF-8 text; re-download or re-save the model") from None


def safetensors_files(name: str, path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a folder; UserError when there are none or only pickles."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(name, index).get("weight_map", {})
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
    pickles = [p for p in PICKLE_FILES if (path / p).exists()] + [p.name for p in sorted(path.glob("pytorch_model-*.bin"))]
    if pickles:
        if allow_pickle:
            return []
        raise UserError(
            f"model {name}: {path / pickles[0]} is a pickle checkpoint, which can run code when loaded; "
            "convert it to safetensors, or pass allow_pickle=True if you trust it"
        )
    raise UserError(f"model {name}: {path} holds no model.safetensors; point it at a folder with safetensors weights")
