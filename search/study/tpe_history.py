"""TPE's history, thinned: past a few hundred finished trials, TPE reads its good group whole and an
evenly spaced sample of the rest.

Optuna's TPE rereads and refits every finished trial on every proposal, in Python: an ask costs
~17 ms at 500 trials and 70-110 ms at 5000 (BENCHMARKS.md, "Driver: time per trial and scale"),
so a long run with many workers slows as it grows, the sampler and not the workers setting its
pace. TPE models two densities: l(x) from the good group (the best `gamma(n)` trials, 25 with the
default gamma once n >= 250) and g(x) from all the others. The good group is kept exactly as
Optuna picks it; g(x) is fitted to an evenly spaced sample (by trial number) of the others, an
unbiased thinning of the same set. Trials not finished (running ones, which the constant liar
counts) are all kept. What TPE then proposes costs what it costs at `history` trials, however
long the run.
"""

from __future__ import annotations

import heapq
from typing import Callable

from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def thin_history(trials: list[FrozenTrial], history: int, gamma: Callable[[int], int],
                 maximize: bool) -> list[FrozenTrial]:
    """At most `history` finished trials: the best gamma(n) complete ones, and the rest of the finished
    trials sampled evenly by number; other trials all kept; number order. Unchanged when there are
    `history` finished trials or fewer, or when the good group would reach into pruned trials."""
    finished = [t for t in trials if t.state in FINISHED]
    if len(finished) <= history:
        return trials
    n_good = gamma(len(finished))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if n_good >= history or len(complete) < n_good:
        return trials  # TPE ranks pruned trials into its good group: those are read whole
    pick = heapq.nlargest if maximize else heapq.nsmallest
    good = {id(t) for t in pick(n_good, complete, key=lambda t: t.values[0])}
    others = [t for t in finished if id(t) not in good]
    room = history - n_good
    kept = good | {id(others[i * len(others) // room]) for i in range(room)}
    return [t for t in trials if id(t) in kept or t.state not in FINISHED]
