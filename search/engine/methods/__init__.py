"""Merge methods by name, as recipes spell them in `merge_method:`.

Built in (native torch, bit-exact with mergekit 0.1.5): linear, slerp,
task_arithmetic, ties, dare_ties, dare_linear, passthrough. Any other method
mergekit knows runs through mergekit's in-memory API when mergekit is installed.
"""

from __future__ import annotations

from search.engine.errors import UserError
from search.engine.methods import dare, linear, passthrough, slerp, task_arithmetic, ties
from search.engine.methods.base import Context, Inputs, Method, StatCache
from search.engine.methods.delegated import delegated_method, mergekit_method_names

BUILT_IN: dict[str, Method] = {
    m.name: m
    for m in (
        linear.METHOD,
        slerp.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_TIES,
        dare.DARE_LINEAR,
        passthrough.METHOD,
    )
}

_DELEGATED: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """The method a recipe's `merge_method:` names; UserError naming the choices otherwise."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if name in _DELEGATED:
        return _DELEGATED[name]
    others = mergekit_method_names()
    if others is not None and name in others:
        _DELEGATED[name] = delegated_method(name)
        return _DELEGATED[name]
    known = ", ".join(sorted(BUILT_IN))
    if others is None:
        raise UserError(
            f"merge_method: {name!r} is not built in (built in: {known}); "
            "install mergekit==0.1.5 to run mergekit's other methods, or use a built-in one"
        )
    extra = ", ".join(n for n in others if n not in BUILT_IN)
    raise UserError(f"merge_method: unknown method {name!r}; use one of {known} (or, through mergekit: {extra})")


__all__ = ["BUILT_IN", "Context", "Inputs", "Method", "StatCache", "get_method"]
