"""A recipe seen layer by layer: what each output layer is made of, for the report's pictures.

- `parameter_rows`: a merge (slerp, linear, ties, ...) as rows of values over its
  output layers, e.g. `t [self_attn]` or `weight · fst`, resolved as mergekit
  resolves them (search/engine/parameters.py: layer i of a slice of n sits at
  i/(n-1) on a gradient; the first filter that matches wins).
- `layer_map`: a passthrough stack as (output layer, source model, source layer,
  scale), scale from the `scale` parameter block expansion writes (0: the new block
  adds nothing, an identity).

Depths come from the recipe where it says them (slices) and otherwise from the
models' config.json (the run's `model_paths`); an intermediate stage of a
multi-stage recipe is as deep as its output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from search.engine.parameters import ParamSpec, evaluate_setting, layer_position
from search.engine.recipe import Conditional, MergeRecipe, MoERecipe, Recipe

DepthOf = Callable[[str], "int | None"]


class UnknownDepth(Exception):
    """A model's depth is not in the run folder's reach (no config.json where run.json says)."""


def config_depth(path: str | Path) -> int | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def depth_resolver(stages: list[Recipe], model_paths: dict[str, str]) -> DepthOf:
    """name -> layers: an earlier stage's output, or a model whose folder has a config.json."""
    by_name = {s.name: s for s in stages if s.name}

    def depth_of(name: str) -> int:
        if name in by_name:
            return output_depth(by_name[name], depth_of)
        depth = config_depth(model_paths.get(name, name))
        if depth is None:
            raise UnknownDepth(f"the depth of {name} is unknown (no config.json at {model_paths.get(name, name)})")
        return depth

    return depth_of


def output_depth(stage: Recipe, depth_of: DepthOf) -> int:
    if isinstance(stage, MoERecipe):
        return depth_of(stage.base_model)
    if stage.slices:
        return sum(s.num_layers for s in stage.slices)
    return depth_of(stage.base_model or stage.models[0].model)


# ---- merges: parameters per layer ----------------------------------------------------


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _filtered(setting: Any) -> list[tuple[str | None, Any]]:
    """(filter label, value) per entry of a filter list; one unlabelled entry otherwise."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional) for c in setting):
        return [(c.filter if c.filter not in (None, "*") else "rest", c.value) for c in setting]
    return [(None, setting)]


def _at(name: str, value: Any, pos: float) -> float | None:
    """A scalar or gradient at one position, or None when it is not a number (a bool, a label)."""
    if _numeric(value) or (isinstance(value, list) and value and all(_numeric(v) for v in value)):
        return float(evaluate_setting("", value, pos, ParamSpec(name)))
    return None


@dataclass
class _Level:
    """One `parameters:` block and whose it is (a model's, or shared by all)."""

    params: dict[str, Any] | None
    model: str | None


def _blocks(stage: MergeRecipe, depth_of: DepthOf) -> list[tuple[int, list[_Level]]]:
    """(layers, parameter blocks) per slice of output layers; a `models:` recipe is one slice."""
    shared = _Level(stage.parameters, None)
    if stage.models:
        n = depth_of(stage.base_model or stage.models[0].model)
        return [(n, [shared] + [_Level(m.parameters, m.model) for m in stage.models])]
    return [
        (s.num_layers, [shared, _Level(s.parameters, None)] + [_Level(src.parameters, src.model) for src in s.sources])
        for s in stage.slices
    ]


def parameter_rows(stage: MergeRecipe, depth_of: DepthOf) -> dict[str, list[float | None]]:
    """label -> value at each output layer (None where that block does not set it). Labels: the parameter,
    `· model` for a model's own, `[filter]` for an entry of a filter list."""
    blocks = _blocks(stage, depth_of)
    total = sum(n for n, _ in blocks)
    rows: dict[str, list[float | None]] = {}
    start = 0
    for n, levels in blocks:
        for level in levels:
            for name, setting in (level.params or {}).items():
                for flt, value in _filtered(setting):
                    label = name + (f" · {level.model}" if level.model else "") + (f" [{flt}]" if flt else "")
                    for i in range(n):
                        v = _at(name, value, layer_position(i, n))
                        if v is not None:
                            rows.setdefault(label, [None] * total)[start + i] = v
        start += n
    return rows


def slerp_curves(stages: list[Recipe], depth_of: DepthOf) -> dict[str, list[float | None]]:
    """`stage: t [filter]` -> t at each layer, for every slerp stage of a recipe."""
    out = {}
    for k, stage in enumerate(stages):
        if isinstance(stage, MergeRecipe) and stage.merge_method == "slerp":
            where = stage.name or f"stage {k + 1}"
            for label, values in parameter_rows(stage, depth_of).items():
                if label == "t" or label.startswith("t "):
                    out[f"{where}: {label}" if len(stages) > 1 else label] = values
    return out


# ---- passthrough stacks: where each layer comes from ------------------------------------


@dataclass
class MappedLayer:
    out_layer: int
    model: str
    layer: int
    scale: float  # 1.0 unless a `scale` parameter changes the block's residual outputs


def _scale(levels: list[dict | None], pos: float) -> float:
    """The block's scale: the value other than 1 its `scale` filters give (o_proj/down_proj), else 1."""
    for params in levels:
        if params and "scale" in params:
            values = [_at("scale", value, pos) for _, value in _filtered(params["scale"])]
            changed = [v for v in values if v is not None and v != 1.0]
            return min(changed) if changed else 1.0
    return 1.0


def layer_map(stage: MergeRecipe) -> list[MappedLayer]:
    """Each output layer of a passthrough stack: its source model and layer, and its scale."""
    out = []
    for s in stage.slices or []:
        src = s.sources[0]  # passthrough takes exactly one source per slice
        start, _ = src.layer_range
        for i in range(s.num_layers):
            scale = _scale([src.parameters, s.parameters, stage.parameters], layer_position(i, s.num_layers))
            out.append(MappedLayer(len(out), src.model, start + i, scale))
    return out
