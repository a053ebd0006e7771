"""Two candidates compared on the same examples: the difference of their scores and its standard error.

Every candidate is scored on the same examples, so the difference of two scores is
estimated from the per-example differences, which cancels most of the noise that two
independent scores would carry. The score is a weighted mean over tasks of each
task's aggregate of its examples: their mean (acc, exact_match, ...) or lm-eval's
perplexity, exp(-mean log-likelihood); the standard error is the delta method's.

Used by the paired pruner (is a trial significantly worse than the best so far?) and
by the run's summary (the winner against the best baseline on held-out, with a 95%
confidence interval).
"""

from __future__ import annotations

import math

import numpy as np

# task -> {"aggregation": "mean" | "perplexity", "weight": w, "values": {example id: value}}
ExampleValues = dict[str, dict]
Z95 = 1.959964  # two-sided 95% normal quantile


def paired_difference(current: ExampleValues, reference: ExampleValues) -> tuple[float, float, int]:
    """score(current) - score(reference) over the examples both scored, its standard error, and
    the number of paired examples. Tasks with fewer than 2 shared examples are left out."""
    diff = var = 0.0
    n = 0
    for task, cur in current.items():
        ref = reference.get(task, {}).get("values", {})
        docs = [d for d in cur["values"] if d in ref]
        if len(docs) < 2:
            continue
        x = np.array([cur["values"][d] for d in docs], dtype=float)
        y = np.array([ref[d] for d in docs], dtype=float)
        w = cur["weight"]
        if cur["aggregation"] == "perplexity":  # exp(-mean ll): slope -exp(-m) between the two means
            diff += w * (math.exp(-x.mean()) - math.exp(-y.mean()))
            slope = -w * math.exp(-(x.mean() + y.mean()) / 2)
        else:
            diff += w * (x.mean() - y.mean())
            slope = w
        var += slope**2 * float(np.var(x - y, ddof=1)) / len(docs)
        n += len(docs)
    return diff, math.sqrt(var), n


def margin(winner: ExampleValues, baseline: ExampleValues, direction: str) -> dict | None:
    """How much better the winner scores than the baseline (positive: better, whichever the direction),
    with a paired 95% confidence interval; None when they share no examples."""
    diff, se, n = paired_difference(winner, baseline)
    if n == 0:
        return None
    better = diff if direction == "maximize" else -diff
    low, high = better - Z95 * se, better + Z95 * se
    return {"difference": better, "ci95": [low, high], "examples": n, "significant": low > 0}
