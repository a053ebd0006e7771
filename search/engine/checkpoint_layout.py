"""Checkpoints whose tensor names are not the ones a definition plans, read as mergekit 0.1.5 reads them.

transformers 5 holds a Mixtral's or a Qwen3-MoE's experts fused per layer
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and
mergekit's definitions name those fused tensors; but checkpoints store one tensor
per expert (`block_sparse_moe.experts.N.w1.weight`, `mlp.experts.N.gate_proj.weight`),
which is also what transformers 5 saves. Where a planned name is absent, mergekit
asks transformers' own checkpoint conversion mapping for it; so do we, once per
model: renamed tensors are the stored ones under a new name (no copy), fused
tensors stack the experts in expert order (gate rows over up rows, the pattern
order) — a copy, exact by construction.

Only what the mapping of a supported architecture uses is read here: renamings
and stacks of module lists, optionally concatenated; a mapping with anything else
is left alone, and a tensor it alone could provide is reported missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from search.engine.errors import UserError
from search.engine.mergekit_definitions import find_definition
from search.engine.sources import TensorInfo


@dataclass(frozen=True)
class Fused:
    """A tensor made of stored ones: per source pattern, its tensors stacked along `stack_dim`
    (expert order), the stacks concatenated along `cat_dim`. One part, no stack: a renaming."""

    parts: tuple[tuple[str, ...], ...]
    stack_dim: int | None
    cat_dim: int | None


def _natural_order(key: str) -> tuple:
    # experts 2, 10 in numeric order, as mergekit walks a checkpoint's keys
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"([0-9]+)", key))


def _stack_and_cat(operations) -> tuple[int, int | None] | None:
    from transformers.core_model_loading import Concatenate, MergeModulelist

    kinds = [type(op) for op in operations]
    if kinds == [MergeModulelist]:
        return operations[0].dim, None
    if kinds == [MergeModulelist, Concatenate]:
        return operations[0].dim, operations[1].dim
    return None


def conversions(model_type: str | None, names: list[str]) -> dict[str, Fused]:
    """name -> how to make it, for every name transformers' mapping of `model_type` gives these stored
    tensors that is not stored itself; {} for an architecture without a mapping."""
    if not model_type:
        return {}
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    current = {n: n for n in names}  # name after the renamings so far -> stored name
    fused: dict[str, Fused] = {}
    for transform in transforms:
        if isinstance(transform, WeightRenaming):
            current = {transform.rename_source_key(k)[0]: stored for k, stored in current.items()}
            continue
        how = _stack_and_cat(transform.operations) if isinstance(transform, WeightConverter) else None
        if how is None:
            continue
        groups: dict[str, dict[str, list[str]]] = {}
        for key in sorted(current, key=_natural_order):
            target, pattern = transform.rename_source_key(key)
            if pattern is not None:
                groups.setdefault(target, {}).setdefault(pattern, []).append(current.pop(key))
        for target, by_pattern in groups.items():
            parts = tuple(tuple(by_pattern[p]) for p in transform.source_patterns if p in by_pattern)
            fused[target] = Fused(parts, *how)
    renamed = {k: Fused(((stored,),), None, None) for k, stored in current.items() if k != stored}
    stored = set(names)
    return {k: v for k, v in {**renamed, **fused}.items() if k not in stored}


def fused_info(f: Fused, infos: dict[str, TensorInfo]) -> TensorInfo:
    stacks = []
    for part in f.parts:
        shape = list(infos[part[0]].shape)
        if f.stack_dim is not None:
            shape.insert(f.stack_dim, len(part))
        stacks.append(shape)
    shape = stacks[0]
    if f.cat_dim is not None:
        shape[f.cat_dim] = sum(s[f.cat_dim] for s in stacks)
    dtype = infos[f.parts[0][0]].dtype
    for part in f.parts:
        for name in part:
            dtype = torch.promote_types(dtype, infos[name].dtype)
    return TensorInfo(tuple(shape), dtype)


def fused_tensor(f: Fused, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if f.stack_dim is None:
        return tensors[f.parts[0][0]]  # a renaming: the stored tensor itself
    stacks = [torch.stack([tensors[n] for n in part], dim=f.stack_dim) for part in f.parts]
    return stacks[0] if f.cat_dim is None else torch.cat(stacks, dim=f.cat_dim)


def _lacks_planned_tensors(config: dict, names) -> bool:
    """Whether a tensor the model's definition requires is not stored under any of its names: only
    then is transformers' mapping consulted (importing it costs seconds, and most models never need it)."""
    try:
        arch = find_definition(config)
        num_layers = arch.num_layers(config)
    except (UserError, KeyError, TypeError, ValueError):
        return False  # planning says what is wrong with the config
    stored = set(names)
    return any(not w.optional and not any(n in stored for n in w.stored_names()) for w in arch.all_weights(num_layers))


def converted_infos(config: dict, infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """A checkpoint's headers as the model's tensors: converted ones in place of those they are made of."""
    if not _lacks_planned_tensors(config, infos):
        return infos
    extra = conversions(config.get("model_type"), list(infos))
    used = {n for f in extra.values() for part in f.parts for n in part}
    return {**{k: v for k, v in infos.items() if k not in used}, **{k: fused_info(f, infos) for k, f in extra.items()}}


def convert_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Turn a checkpoint's tensors into the model's, in place: each converted tensor is made (once)
    and the stored ones it is made of are dropped as it is, so that a device holds each weight once
    and, while converting, no more than one converted tensor's worth beside."""
    if not _lacks_planned_tensors(config, tensors):
        return
    for name, f in conversions(config.get("model_type"), list(tensors)).items():
        tensors[name] = fused_tensor(f, tensors)
        for part in f.parts:
            for stored in part:
                del tensors[stored]
