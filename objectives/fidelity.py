"""Fidelity stages: nested, fixed subsets of an evaluation set.

A trial is scored on the first 16 examples, then the first 64, then 256 (say),
and a pruner may stop it after any stage. The subsets are prefixes of one fixed
order of the examples, so they are nested (each stage extends the last) and the
same for every trial (scores of different trials compare). The fixed order is
the file's own order, or a permutation drawn once from `subset_seed` for data
sets stored sorted (by topic, by difficulty) whose prefixes would be biased.
"""

from __future__ import annotations

import random
from typing import Any

from search.engine.errors import UserError


def check_fidelities(value: Any, where: str) -> list[int] | None:
    """None, or a strictly increasing list of positive integers."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        or any(a >= b for a, b in zip(value, value[1:]))
    ):
        raise UserError(f"{where}.fidelities: expected increasing positive integers like [16, 64, 256], got {value!r}")
    return list(value)


def example_order(n_examples: int, subset_seed: int | None) -> list[int]:
    """The fixed order whose prefixes are the stages: file order, or a seeded permutation."""
    order = list(range(n_examples))
    if subset_seed is not None:
        random.Random(subset_seed).shuffle(order)
    return order


def nested_subset(n_examples: int, size: int | None, subset_seed: int | None = None) -> list[int]:
    """Indices of the examples a stage of `size` scores (all of them when size is None), ascending."""
    order = example_order(n_examples, subset_seed)
    return sorted(order if size is None else order[:size])
