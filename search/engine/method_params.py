"""The parameters each built-in merge method reads, with mergekit 0.1.5's defaults.

Torch-free, so that what reads recipes without merging them (the spaces, the driver's
baselines) resolves a parameter exactly as the engine's planner does; the methods in
search/engine/methods/ take their ParamSpecs from here.
"""

from __future__ import annotations

from typing import Optional

from search.engine.parameters import ParamSpec


def _task_arithmetic_family(default_normalize: bool, default_rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("int8_mask", bool, "shared", False),
        ParamSpec("normalize", bool, "shared", default_normalize),
        ParamSpec("rescale", bool, "shared", default_rescale),
        ParamSpec("lambda", float, "shared", 1.0),
        ParamSpec("weight", float, "non_base"),
        ParamSpec("density", float, "non_base", 1.0),
    )


PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    "linear": (ParamSpec("weight", float, "input"), ParamSpec("normalize", bool, "shared", True)),
    "slerp": (ParamSpec("t", float, "shared"),),
    "task_arithmetic": _task_arithmetic_family(default_normalize=False, default_rescale=False),
    "ties": _task_arithmetic_family(default_normalize=True, default_rescale=False),
    "dare_ties": _task_arithmetic_family(default_normalize=False, default_rescale=True),
    "dare_linear": _task_arithmetic_family(default_normalize=False, default_rescale=True),
    "passthrough": (ParamSpec("scale", Optional[float], "input", None),),
}


def param_spec(method: str, name: str) -> ParamSpec | None:
    """`name` as built-in `method` reads it; None for another method or a parameter it does not read."""
    return next((p for p in PARAMS.get(method, ()) if p.name == name), None)
