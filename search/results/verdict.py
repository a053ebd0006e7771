"""The run's verdict: its winner against the best baseline, on held-out, with a paired 95% interval.

The winner is the trial export picks (best held-out among the top by search score);
the best baseline is the best of the run's hand-written merges on the same split.
The interval comes from the per-example results of both on the same examples
(search/study/paired_stats.py), where the objective keeps them (lmeval); otherwise only the
difference is given. A search that did not beat its baselines is said so plainly.
"""

from __future__ import annotations

from typing import Any

from search.results import winner
from search.study.paired_stats import margin


def winner_vs_baselines(recs: list[dict], directions: list[str], baselines: dict[str, dict],
                        heldout_examples: dict[str, Any]) -> dict | None:
    """None without a winner or a baseline, or with several objectives (a Pareto front has no single winner)."""
    if len(directions) != 1 or not baselines:
        return None
    top, direction = winner.winner(recs, directions), directions[0]
    if top is None:
        return None
    split = "held-out" if top.get("heldout") and all(b.get("heldout") for b in baselines.values()) else "search"

    def score(r: dict) -> float:
        return (r["heldout"] if split == "held-out" else r["values"])[0]

    sign = 1 if direction == "maximize" else -1
    name, best = max(baselines.items(), key=lambda item: sign * score(item[1]))
    out = {
        "winner": top["trial"],
        "winner_score": score(top),
        "best_baseline": name,
        "baseline_score": score(best),
        "split": split,
        "difference": sign * (score(top) - score(best)),  # positive: the winner is better
        "ci95": None,
    }
    if split == "held-out":
        paired = margin(heldout_examples.get(str(top["trial"])) or {}, best.get("heldout_examples") or {}, direction)
        if paired is not None:
            out["ci95"], out["examples"] = paired["ci95"], paired["examples"]
    out["beats"] = out["difference"] > 0 and (out["ci95"] is None or out["ci95"][0] > 0)
    return out


def verdict_line(v: dict | None) -> str | None:
    """One sentence a user reads first: did the search beat the merges they would have written?"""
    if v is None:
        return None
    scores = f"{v['winner_score']:.4g} vs {v['baseline_score']:.4g} on {v['split']}, {v['difference']:+.4g}"
    if v["ci95"] is not None:
        scores += f" (95% CI {v['ci95'][0]:+.4g} to {v['ci95'][1]:+.4g})"
    who = f"the winner (trial {v['winner']})"
    if v["beats"]:
        return f"{who} beats the best baseline ({v['best_baseline']}): {scores}"
    if v["difference"] > 0:
        return f"{who} is ahead of the best baseline ({v['best_baseline']}) but not significantly: {scores}"
    return f"the search did not beat the best baseline ({v['best_baseline']}): {scores}"
