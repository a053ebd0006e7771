"""The one place a run's trials are ranked and its winner picked: what best.yaml, the summary, the
report and the verdict all name.

The search's COMPLETE trials (not baselines, not duplicates) ranked by the first objective: by
held-out score when any trial has one (those re-scored first), else by the search score. Ties (TIE_RULE):
equal held-out scores go to the better search score, and equal scores to the earlier trial. With several
objectives the winner is the first of the Pareto front in that order.
"""

from __future__ import annotations

from typing import Any

from search.engine.errors import UserError, short


# how `rank` orders trials of equal held-out score: what the summary and the report say when it decided
TIE_RULE = "equal held-out scores go to the better search score, then to the earlier trial"


def _sign(direction: str) -> int:
    return 1 if direction == "maximize" else -1


def all_numbers(values: Any) -> bool:
    return isinstance(values, list) and bool(values) and all(isinstance(v, (int, float)) for v in values)


def complete(recs: list[dict]) -> list[dict]:
    """The search's COMPLETE trials, each recipe once: baselines (search/run/baselines.py) are what they are
    compared with, and a duplicate (search/run/trial_loop.py) only repeats its original's result."""
    # a value that was not finite is stored as null: such a trial cannot be ranked
    return [r for r in recs if r["state"] == "COMPLETE" and r.get("recipe") and all_numbers(r.get("values"))
            and not r.get("baseline") and r.get("duplicate_of") is None]


def rank(recs: list[dict], directions: list[str], by_heldout: bool | None = None) -> list[dict]:
    """COMPLETE trials, best first, by the first objective. By held-out score when any trial has one
    (those re-scored come first, in held-out order), else by the search score."""
    pool = complete(recs)
    if by_heldout is None:
        by_heldout = any(all_numbers(r.get("heldout")) for r in pool)
    sign = _sign(directions[0])

    def key(r):
        search = -sign * r["values"][0]
        if by_heldout:
            h = r.get("heldout")
            return (0, -sign * h[0], search, r["trial"]) if all_numbers(h) else (1, 0, search, r["trial"])
        return (0, 0, search, r["trial"])

    return sorted(pool, key=key)


def heldout_ties(recs: list[dict], directions: list[str]) -> list[dict]:
    """The trials whose held-out score equals the winner's (the winner first), when there are several:
    TIE_RULE picked among them. Empty when the pick went by held-out score without a tie."""
    ranked = rank(pareto(recs, directions) if len(directions) > 1 else recs, directions)
    if not ranked or not all_numbers(ranked[0].get("heldout")):
        return []
    tied = [r for r in ranked if all_numbers(r.get("heldout")) and r["heldout"][0] == ranked[0]["heldout"][0]]
    return tied if len(tied) > 1 else []


def winner(recs: list[dict], directions: list[str]) -> dict | None:
    """The run's winner, what best.yaml holds: the first of `rank` (by held-out score when the run has one);
    with several objectives, the Pareto front's first by that order."""
    pool = pareto(recs, directions) if len(directions) > 1 else recs
    ranked = rank(pool, directions)
    return ranked[0] if ranked else None


def pareto(recs: list[dict], directions: list[str]) -> list[dict]:
    """Trials no other trial beats on every objective (Optuna's definition), by trial number."""
    pool = complete(recs)
    signs = [_sign(d) for d in directions]

    def dominates(a, b):
        va = [s * v for s, v in zip(signs, a["values"])]
        vb = [s * v for s, v in zip(signs, b["values"])]
        return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))

    return [r for r in pool if not any(dominates(o, r) for o in pool if o is not r)]


def find_trial(recs: list[dict], number: int) -> dict:
    """Trial `number`, if it has a recipe worth exporting: one that completed, or was pruned (its
    recipe is whole; its score is a stage's)."""
    r = next((r for r in recs if r["trial"] == number), None)
    if r is None:
        raise UserError(f"--trial {number}: no such trial in this run; see trials.jsonl for the numbers")
    if r["state"] == "FAIL":
        raise UserError(
            f"--trial {number}: that trial failed ({short(r.get('reason'), 160)}), so it has no score; "
            "pick a trial that completed or was pruned"
        )
    if r["state"] not in ("COMPLETE", "PRUNED"):
        raise UserError(f"--trial {number}: that trial did not finish ({r['state']}); pick one that completed")
    if not r.get("recipe"):
        raise UserError(f"--trial {number}: that trial has no recipe ({short(r.get('reason'))}); pick another")
    return r
