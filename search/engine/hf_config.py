"""A config.json dict as the transformers config object that from_pretrained reads from the file.

transformers writes floats JSON cannot hold (a Mamba layer's time_step_limit of infinity) as
`{"__float__": "Infinity"}` and decodes them when it reads the file; a dict read with plain
json keeps the tags, so they are decoded here before the config object is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers

_SPECIAL_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def decode_special_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def hf_config(config: dict) -> "transformers.PretrainedConfig":
    import transformers

    return transformers.CONFIG_MAPPING[config["model_type"]].from_dict(decode_special_floats(config))
