"""LoRA adapters on source models, read as mergekit 0.1.5 reads them: `model: base+adapter` in a recipe.

mergekit merges the adapter into its model with PEFT (`merge_and_unload`) before merging; lora_merge.py
does the same arithmetic in memory, once per worker. This file reads an adapter folder (a PEFT
adapter_config.json and adapter_model.safetensors) and says what it changes, without torch, so a run's
driver can check its adapters before any worker starts.

An adapter's weights say which tensors of its model it changes (`base_model.model.` + the module name):
- `<module>.lora_A.weight` / `.lora_B.weight`: a LoRA on a linear layer: W + (B @ A) * scaling;
- `<module>.lora_embedding_A` / `.lora_embedding_B`: a LoRA on an embedding: W + (B @ A)^T * scaling;
- `<module>.base_layer.weight`: the module's weight replaced (PEFT saves embeddings so), before its LoRA;
- `<module>.weight` / `.bias` of a module in `modules_to_save`: replaced (a fully trained head, say).
scaling = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha per module from rank_pattern and
alpha_pattern as PEFT matches them (the first pattern the module name ends with). PEFT variants that merge
otherwise (DoRA, LoRA biases, fan_in_fan_out, ...) are refused by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from search.engine.errors import UserError
from search.engine.weight_files import read_json

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# adapter_config.json settings PEFT merges in a way this engine does not (any true / non-empty value)
UNSUPPORTED = (
    "use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "target_parameters", "trainable_token_indices",
    "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config", "monteclora_config",
    "mica", "kasa_config",
)


def split_adapter(name: str) -> tuple[str, str | None]:
    """mergekit's `model+adapter` (a name with no `+` has no adapter)."""
    parts = name.split("+")
    if len(parts) == 1:
        return name, None
    if len(parts) != 2 or not all(parts):
        raise UserError(f"model {name}: expected MODEL or MODEL+ADAPTER (one '+'), as mergekit reads model names")
    return parts[0], parts[1]


@dataclass(frozen=True)
class LoraTarget:
    """One tensor of the model a LoRA changes: tensor += delta of lora_A / lora_B (adapter tensor names)."""

    tensor: str
    kind: str  # "linear" or "embedding"
    lora_a: str
    lora_b: str
    scaling: float


@dataclass
class Adapter:
    name: str
    path: Path
    file: Path  # the adapter's weights
    loras: dict[str, LoraTarget] = field(default_factory=dict)  # model tensor -> its LoRA
    replaced: dict[str, str] = field(default_factory=dict)  # model tensor -> the adapter tensor that replaces it


def adapter_file(name: str, path: Path, allow_pickle: bool) -> Path:
    """The adapter folder's weights file; UserError for a missing folder, a missing file or an unallowed pickle."""
    if not path.is_dir():
        raise UserError(f"adapter {name}: {path} does not exist; check the path or --model-map")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"adapter {name}: {path} has no {ADAPTER_CONFIG}; point it at a PEFT LoRA adapter folder")
    if (path / SAFETENSORS).is_file():
        return path / SAFETENSORS
    if (path / PICKLE).is_file():
        if allow_pickle:
            return path / PICKLE
        raise UserError(
            f"adapter {name}: {path / PICKLE} is a pickle checkpoint, which can run code when loaded; convert it "
            "to safetensors, or pass allow_pickle=True if you trust it"
        )
    raise UserError(f"adapter {name}: {path} holds no {SAFETENSORS}; point it at a PEFT LoRA adapter folder")


def read_adapter(name: str, path: Path, shapes: dict[str, tuple[int, ...]], allow_pickle: bool = False) -> Adapter:
    """What the adapter at `path` changes. shapes: its weights' shapes by tensor name (from the file's
    header). UserError for an adapter this engine (or mergekit) cannot merge."""
    path = Path(path)
    file = adapter_file(name, path, allow_pickle)
    config = read_json(f"{name} (adapter)", path / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {name}: it is a {config.get('peft_type')} adapter; mergesearch merges LoRA adapters only")
    for key in UNSUPPORTED:
        if config.get(key):
            raise UserError(f"adapter {name}: {ADAPTER_CONFIG} sets {key}, which mergesearch does not merge; "
                            "merge the adapter into its model with PEFT first")
    if config.get("bias", "none") != "none":
        raise UserError(f"adapter {name}: {ADAPTER_CONFIG} sets bias {config['bias']!r}, which mergesearch does not "
                        "merge; merge the adapter into its model with PEFT first")
    adapter = Adapter(name, path, file)
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        if not key.startswith(PREFIX):
            raise UserError(f"adapter {name}: tensor {key} does not start with {PREFIX!r}; is this a PEFT adapter?")
        rest = key[len(PREFIX):]
        for suffix, (kind, part) in _LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                pairs.setdefault(rest[: -len(suffix)], {"kind": kind})[part] = key
                break
        else:
            target = _replaced_tensor(rest, config)
            if target is None:
                raise UserError(f"adapter {name}: tensor {key} is neither a LoRA weight nor of a module in "
                                "modules_to_save; mergesearch does not know what it changes")
            adapter.replaced[target] = key
    for module, pair in pairs.items():
        if "A" not in pair or "B" not in pair:
            raise UserError(f"adapter {name}: {module} has lora_A or lora_B but not both; re-save the adapter")
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        rows = shapes[pair["A"]][0]
        if rows != r:
            raise UserError(f"adapter {name}: {ADAPTER_CONFIG} gives {module} rank {r} but its lora_A has {rows} rows; "
                            "fix r / rank_pattern")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        adapter.loras[f"{module}.weight"] = LoraTarget(f"{module}.weight", pair["kind"], pair["A"], pair["B"], scaling)
    return adapter


_LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


def _replaced_tensor(rest: str, config: dict) -> str | None:
    """The model tensor an adapter tensor replaces: a base layer PEFT saved, or a module to save."""
    if rest.endswith(".base_layer.weight"):
        return rest.removesuffix(".base_layer.weight") + ".weight"
    module, _, param = rest.rpartition(".")
    to_save = config.get("modules_to_save") or []
    if param in ("weight", "bias") and any(module == m or module.endswith(f".{m}") for m in to_save):
        return rest
    return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key the module name ends with (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_fits(adapter: Adapter, shapes: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]], model: str) -> None:
    """The adapter's tensors fit the model's (`base`: tensor -> shape); UserError naming the first that does not."""

    def missing(tensor: str) -> UserError:
        if tensor.startswith("lm_head."):
            return UserError(f"adapter {adapter.name}: it changes {tensor}, but model {model} ties its head to its "
                             "embeddings; mergesearch does not merge an adapter on a tied head")
        return UserError(f"adapter {adapter.name}: it changes {tensor}, which model {model} does not have; "
                         "it is an adapter for another model")

    def wrong(what: str, got, tensor: str, expected) -> UserError:
        return UserError(f"adapter {adapter.name}: {what} is {list(got)} but {tensor} of model {model} is "
                         f"{list(expected)}; it is an adapter for a model of another shape")

    for tensor, key in adapter.replaced.items():
        if tensor not in base:
            raise missing(tensor)
        if tuple(shapes[key]) != tuple(base[tensor]):
            raise wrong(key, shapes[key], tensor, base[tensor])
    for tensor, lora in adapter.loras.items():
        if tensor not in base:
            raise missing(tensor)
        a, b, w = shapes[lora.lora_a], shapes[lora.lora_b], base[tensor]
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            raise wrong(lora.lora_a, a, tensor, w)
        # linear: W [out, in] = B [out, r] @ A [r, in]; embedding: W [tokens, dim] = (B [dim, r] @ A [r, tokens])^T
        out, inp = (w[0], w[1]) if lora.kind == "linear" else (w[1], w[0])
        if a[1] != inp:
            raise wrong(lora.lora_a, a, tensor, w)
        if (b[0], b[1]) != (out, a[0]):
            raise wrong(lora.lora_b, b, tensor, w)
