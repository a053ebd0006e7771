"""Tensor naming per architecture: which tensors come before the layers, in each
layer, and after them, as mergekit 0.1.5 plans them.

A merge is planned over these names: `pre` tensors (embeddings) take their
inputs from the first slice, `layer` tensors from each slice's layers in turn,
`post` tensors (final norm, head) from the last slice. The names are templates
from mergekit's own architecture definitions (search/engine/mergekit_definitions.py
reads them): `${layer_index}` and `${num_layers}`, each optionally `+1` or `-1`.
So a tensor mergekit writes is a tensor we write, and one it leaves out (a tied
head) we leave out too.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache

_PLACEHOLDER = re.compile(r"\$\{(layer_index|num_layers)([+-]1)?\}")


def substitute(template: str, num_layers: int, layer: int | None = None) -> str:
    """A template with its placeholders filled in, as mergekit fills them."""
    if layer is not None:  # the common case first: planning fills in thousands of names per recipe
        template = template.replace("${layer_index}", str(layer))
    if "$" not in template:
        return template

    def value(m: re.Match) -> str:
        base = num_layers if m.group(1) == "num_layers" else layer
        if base is None:
            raise ValueError(f"{template}: ${{layer_index}} outside the layers")
        return str(base + int(m.group(2) or 0))

    return _PLACEHOLDER.sub(value, template)


@dataclass(frozen=True)
class WeightSpec:
    name: str  # a template (see substitute) until placed by `at`
    optional: bool = False  # may be absent from a checkpoint (a tied head, a layer kind's own tensors)
    aliases: tuple[str, ...] = ()  # other names the same tensor is stored under
    tied_names: tuple[str, ...] = ()  # where to read it from when absent (mergekit's tied_names)
    vocabulary_axis: int | None = None

    def at(self, num_layers: int, layer: int | None = None) -> "WeightSpec":
        """This weight in a model of `num_layers` layers (in layer `layer` for a layer template)."""

        def fill(s: str) -> str:
            return substitute(s, num_layers, layer)

        return WeightSpec(
            fill(self.name),
            self.optional,
            tuple(map(fill, self.aliases)),
            tuple(map(fill, self.tied_names)),
            self.vocabulary_axis,
        )

    def stored_names(self) -> tuple[str, ...]:
        """Where a checkpoint may hold this weight, in the order mergekit looks."""
        return (self.name, *self.aliases, *self.tied_names)


@dataclass(frozen=True, eq=False)  # one object per definition: compared (and cached) by identity
class Architecture:
    name: str  # the definition's model_type: llama, qwen3, gemma3_text, ...
    hf_architectures: tuple[str, ...]  # config.json "architectures" values it covers
    pre: tuple[WeightSpec, ...]
    layer: tuple[WeightSpec, ...]
    post: tuple[WeightSpec, ...]
    num_layers_key: str = "num_hidden_layers"  # dotted for a nested config (text_config.num_hidden_layers)
    definition: str = ""  # the mergekit file it comes from, e.g. qwen3.json

    def num_layers(self, config: dict) -> int:
        return int(config_value(config, self.num_layers_key))

    def pre_weights(self, num_layers: int) -> tuple[WeightSpec, ...]:
        return _placed(self, "pre", None, num_layers)

    def layer_weights(self, index: int, num_layers: int) -> tuple[WeightSpec, ...]:
        return _placed(self, "layer", index, num_layers)

    def post_weights(self, num_layers: int) -> tuple[WeightSpec, ...]:
        return _placed(self, "post", None, num_layers)

    def all_weights(self, num_layers: int) -> list[WeightSpec]:
        """Every weight of a model of `num_layers` layers, in the definition's order."""
        weights = list(self.pre_weights(num_layers))
        for i in range(num_layers):
            weights += self.layer_weights(i, num_layers)
        return weights + list(self.post_weights(num_layers))


@lru_cache(maxsize=1 << 14)
def _placed(arch: Architecture, part: str, layer: int | None, num_layers: int) -> tuple[WeightSpec, ...]:
    """A part's weights placed in a model (kept: every candidate of a search plans the same names)."""
    return tuple(w.at(num_layers, layer) for w in getattr(arch, part))


def config_value(config: dict, key: str):
    """config[a][b] for key "a.b"; KeyError when a part is missing."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def output_config(base_config: dict, arch: Architecture, num_layers: int, dtype: str | None) -> dict:
    """config.json of the merge, as mergekit writes it: the base's, with the new depth and dtype."""
    out = copy.deepcopy(base_config)
    *parents, last = arch.num_layers_key.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = num_layers
    # transformers 5 reads an old `torch_dtype` and writes it back as `dtype`.
    old = out.pop("torch_dtype", None)
    if dtype:
        out["dtype"] = dtype
    elif old is not None and "dtype" not in out:
        out["dtype"] = old
    return out
