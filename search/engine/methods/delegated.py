"""Methods we do not implement ourselves, run by mergekit's in-memory API when mergekit is installed."""

from __future__ import annotations

import typing

import torch

from search.engine.errors import UserError
from search.engine.methods.base import Context, Inputs, Method
from search.engine.parameters import REQUIRED, ParamSpec


def mergekit_method_names() -> list[str] | None:
    """Names mergekit registers, or None when mergekit is not installed."""
    try:
        from mergekit import merge_methods
    except ImportError:
        return None
    return sorted(m.spec.name for m in merge_methods.registered_methods())


def delegated_method(name: str) -> Method:
    from mergekit import merge_methods
    from mergekit.merge_methods.base import MISSING, BasePolicy, OptionalTensorPolicy

    mk = merge_methods.get(name)
    params = []
    for p in mk.spec.parameters:
        value_type = p.value_type
        try:
            ParamSpec("probe", value_type)
        except Exception:
            value_type = typing.Any
        params.append(
            ParamSpec(p.name, value_type, p.scope.value, REQUIRED if p.default is MISSING else p.default)
        )
    contract = mk.spec.contract

    def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
        from mergekit.merge_methods.api import merge_tensors

        ids = [str(i) for i in range(len(inputs.tensors))]
        parameters = dict(shared)
        for p in mk.spec.input_parameters:
            parameters[p.name] = {ids[i]: per_input[i][p.name] for i in range(len(ids)) if p.name in per_input[i]}
        base_index = inputs.base_index if contract.base != BasePolicy.IGNORED else None
        try:
            return merge_tensors(inputs.tensors, mk, parameters=parameters, ids=ids, base_index=base_index, name=inputs.name)
        except (ValueError, TypeError) as e:
            raise UserError(f"merge_method {name} (run by mergekit) failed on {inputs.name}: {e}") from None

    return Method(
        name=name,
        params=tuple(params),
        merge=merge,
        base=contract.base.value if contract.base.value in ("required", "optional") else "ignored",
        min_inputs=contract.min_inputs,
        max_inputs=contract.max_inputs,
        passthrough_singleton=mk.spec.optional_tensor_policy == OptionalTensorPolicy.PASSTHROUGH_SINGLETON,
        randomized=True,  # some (della, ...) draw from torch's global stream: keep mergekit's order
        native=False,
    )
