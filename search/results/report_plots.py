"""The report's pictures: one function per plot, each returning a matplotlib Figure.

Each takes a RunView (search/results/report.py) and either draws a figure with a title,
axis labels and a legend (or a colour bar), or raises NotApplicable with the
reason the run has nothing to show there (one objective has no Pareto front, a
run without stages no stage scores ...), so no empty picture is ever written.
Figures are drawn with the Agg backend: no display is needed.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from search.results import importance as importance_  # noqa: E402
from search.results import recipe_layers  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402

TOP_CURVES = 5  # trials drawn in the t-curve plot
COLORS = plt.get_cmap("tab10").colors


class NotApplicable(Exception):
    """The run has nothing to draw for this plot; the message says why."""


def _better(direction: str) -> str:
    return "higher is better" if direction == "maximize" else "lower is better"


def _axis_label(view, i: int) -> str:
    return f"{view.objectives[i]} ({_better(view.directions[i])})"


def _score(r: dict, i: int) -> float | None:
    values = r.get("values") or []
    return values[i] if i < len(values) else None


# ---- optimization history ------------------------------------------------------------


BASELINES_IN_VIEW = 3  # the best baselines the history's scale always shows; the others may fall off it
MARGIN = 0.08  # of the scale's span, above and below what it must show


def history_scale(must_show: list[float]) -> tuple[float, float]:
    """The score axis of the history: every complete trial, held-out re-score and best baseline, with a margin.
    Far-off points (weak pruned trials, a baseline far below the rest) do not squeeze the trials into a line."""
    lo, hi = min(must_show), max(must_show)
    pad = MARGIN * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def history(view) -> plt.Figure:
    """Each trial's score in order, the best so far, held-out re-scores and the best baselines in one view.

    The scale covers the complete trials, the held-out re-scores and the best BASELINES_IN_VIEW baselines;
    a point beyond it (a weak pruned trial, a far-off baseline) is drawn on the edge as a triangle pointing
    to where it is, and a baseline off the scale says so in the legend with its score."""
    if not any(r.get("values") and r["state"] in ("COMPLETE", "PRUNED") for r in view.trials):
        raise NotApplicable("no trial has a score yet (trials.jsonl says why each failed)")
    n = len(view.objectives)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.6 * n + 0.9), squeeze=False, sharex=True)
    for i, ax in enumerate(axes[:, 0]):
        sign = 1 if view.directions[i] == "maximize" else -1
        done = [r for r in view.trials if r["state"] == "COMPLETE" and _score(r, i) is not None]
        pruned = [r for r in view.trials if r["state"] == "PRUNED" and _score(r, i) is not None]
        failed = [r for r in view.trials if r["state"] == "FAIL"]
        held = [r for r in done if r.get("heldout") and i < len(r["heldout"])]
        scored = [(b, _score(b, i)) for b in view.baselines if _score(b, i) is not None]
        scored.sort(key=lambda item: -sign * item[1])  # best first
        must_show = ([_score(r, i) for r in done] + [r["heldout"][i] for r in held]
                     + [v for _, v in scored[:BASELINES_IN_VIEW]])
        lo, hi = history_scale(must_show or [_score(r, i) for r in pruned])

        ax.scatter([r["trial"] for r in done], [_score(r, i) for r in done], s=22, color=COLORS[0],
                   label=f"complete ({len(done)})", zorder=3)
        inside = [r for r in pruned if lo <= _score(r, i) <= hi]
        if inside:
            ax.scatter([r["trial"] for r in inside], [_score(r, i) for r in inside], s=22, marker="x",
                       color="0.55", label=f"pruned ({len(inside)}), at the stage it stopped", zorder=2)
        for edge, marker, beyond in ((hi, "^", lambda v: v > hi), (lo, "v", lambda v: v < lo)):
            off = [r["trial"] for r in pruned if beyond(_score(r, i))]
            if off:  # drawn on the edge they are beyond, pointing where they are
                ax.scatter(off, [edge] * len(off), s=30, marker=marker, color="0.55", clip_on=False, zorder=2,
                           label=f"pruned ({len(off)}), off the scale {'above' if edge == hi else 'below'}")
        if done:
            xs, best, running = [], [], None
            for r in sorted(done, key=lambda r: r["trial"]):
                v = _score(r, i)
                running = v if running is None else (max if sign > 0 else min)(running, v)
                xs.append(r["trial"])
                best.append(running)
            xs.append(max(r["trial"] for r in view.trials))
            best.append(best[-1])
            alone = " (this objective alone)" if n > 1 else ""
            ax.step(xs, best, where="post", color=COLORS[1], lw=2, label=f"best so far{alone}", zorder=4)
        if held:
            ax.scatter([r["trial"] for r in held], [r["heldout"][i] for r in held], s=60, marker="D",
                       facecolors="none", edgecolors=COLORS[2], lw=1.6, label="held-out score (re-scored)", zorder=5)
        if view.winner and len(view.objectives) == 1:
            w = view.winner
            how = "picked by held-out score" if w.get("heldout") else "best score"
            ax.scatter(w["trial"], _score(w, i), marker="*", s=240, color="gold", edgecolors="black", zorder=6,
                       label=f"winner: trial {w['trial']} ({how})")
        for k, (b, v) in enumerate(scored):
            if lo <= v <= hi:
                ax.axhline(v, ls="--", lw=1.3, color=COLORS[(4 + k) % 10],
                           label=f"baseline: {b['baseline']} ({v:.4g})", zorder=1)
            else:  # named, with its score, but not drawn: it would squeeze the trials into a line
                ax.plot([], [], ls=":", lw=1.0, color="0.6",
                        label=f"baseline: {b['baseline']} ({v:.4g}, off the scale {'above' if v > hi else 'below'})")
        if failed:
            # failed trials have no score: ticks on the bottom edge show when they happened
            ax.plot([r["trial"] for r in failed], [0.0] * len(failed), "|", ms=12, mew=2, color="tab:red",
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f"failed ({len(failed)}), no score")
        ax.set_ylim(lo, hi)
        ax.set_ylabel(_axis_label(view, i))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: hides no point
    axes[-1, 0].set_xlabel("trial number")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{view.name}: score of every trial, and the best so far")
    fig.tight_layout()
    return fig


# ---- parameter importances ---------------------------------------------------------------


MAX_BARS = 25  # parameters drawn in the importance plot; the others are named under it


def importances(view) -> plt.Figure:
    """How much each parameter explains the score (fANOVA, or rank correlation without the study)."""
    if not any(r["params"] for r in view.trials):
        raise NotApplicable("the trials have no parameters (every trial is the same recipe)")
    try:
        imp = importance_.compute(view.run_dir, view.meta, view.trials)
    except ValueError as e:
        raise NotApplicable(str(e)) from None
    ranked = list(dict.fromkeys(p for per in imp.values.values() for p in per))
    params = ranked[:MAX_BARS]
    left = {**imp.left_out, **{p: f"below the {MAX_BARS} most important" for p in ranked[MAX_BARS:]}}
    view.notes["importance"] = imp.method + "".join(f". Not drawn: {p}: {why}" for p, why in left.items())
    if len(params) < 2:
        why = "".join(f"; {p}: {reason}" for p, reason in left.items())
        raise NotApplicable(f"only one parameter ({', '.join(params) or 'none'}) varies: it explains everything{why}")
    params.sort(key=lambda p: max(per.get(p, 0.0) for per in imp.values.values()))
    names = list(imp.values)
    fig, ax = plt.subplots(figsize=(9, max(3.2, 1.2 + 0.32 * len(params) * max(1, len(names) * 0.7))))
    height = 0.8 / len(names)
    y = np.arange(len(params))
    for k, name in enumerate(names):
        ax.barh(y + (k - (len(names) - 1) / 2) * height, [imp.values[name].get(p, 0.0) for p in params],
                height=height, color=COLORS[k], label=f"for {name}")
    ax.set_yticks(y, params, fontsize=8)
    fanova = imp.method.startswith("fANOVA")
    ax.set_xlabel("importance: share of the score's variance it explains (sums to 1)" if fanova
                  else "importance: |rank correlation| with the score, scaled to sum to 1")
    ax.set_ylabel("parameter")
    method = "fANOVA on the study" if fanova else "rank correlation, from trials.jsonl"
    ax.set_title(f"{view.name}: parameter importance ({method})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# ---- stages and pruning ------------------------------------------------------------------


def stages(view) -> plt.Figure:
    """Each trial's score after every fidelity stage; where the pruner stopped trials."""
    steps = [s for s in view.meta.get("stages") or [] if s is not None]
    if len(view.objectives) > 1:
        raise NotApplicable("several objectives: each trial is scored once, at its last fidelity (no stages)")
    if len(steps) < 2:
        raise NotApplicable("the objective has no fidelity stages: each trial was scored once")
    name = view.objectives[0]
    x_of = {s: k for k, s in enumerate(steps)}
    fig, ax = plt.subplots(figsize=(9, 5))
    winner = view.winner["trial"] if view.winner else None
    pruned_at: dict[int, int] = {}
    for r in view.trials:
        points = [(x_of[s["step"]], s["scores"].get(name)) for s in r.get("stages") or []
                  if s.get("step") in x_of and s["scores"].get(name) is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        if r["state"] == "PRUNED":
            ax.plot(xs, ys, color="0.6", lw=1, alpha=0.7, zorder=2)
            ax.scatter(xs[-1], ys[-1], marker="x", s=40, color="tab:red", zorder=3)
            pruned_at[xs[-1]] = pruned_at.get(xs[-1], 0) + 1
        elif r["trial"] == winner:
            ax.plot(xs, ys, color=COLORS[1], lw=2.5, marker="o", zorder=5)
        else:
            ax.plot(xs, ys, color=COLORS[0], lw=1, alpha=0.6, marker=".", zorder=4)
    ax.set_xticks(range(len(steps)), [f"stage {k + 1}\n(fidelity {s})" for k, s in enumerate(steps)])
    ax.set_xlabel("fidelity stage")
    ax.set_ylabel(f"{name} at that stage ({_better(view.directions[0])})")
    where = ", ".join(f"{n} after stage {k + 1}" for k, n in sorted(pruned_at.items())) or "none"
    handles = [
        Line2D([], [], color=COLORS[0], marker=".", label="complete trial"),
        Line2D([], [], color="0.6", label="pruned trial"),
        Line2D([], [], color="tab:red", marker="x", ls="", label=f"where it was pruned ({where})"),
    ]
    if winner is not None:
        handles.insert(1, Line2D([], [], color=COLORS[1], lw=2.5, marker="o", label=f"winner (trial {winner})"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title(f"{view.name}: score after each stage, and where the pruner stopped trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- slerp t-curves ----------------------------------------------------------------------------


def t_curves(view) -> plt.Figure:
    """The top trials' slerp t against layer index, one panel per filter."""
    if not view.top:
        raise NotApplicable("no trial completed")
    curves = []  # (trial record, {label: values per layer})
    for r in view.top[:TOP_CURVES]:
        stages_ = recipes.loads(r["recipe"], where=f"trial {r['trial']}")
        try:
            found = recipe_layers.slerp_curves(stages_, view.depth_resolver(stages_))
        except recipe_layers.UnknownDepth as e:
            raise NotApplicable(str(e)) from None
        if found:
            curves.append((r, found))
    if not curves:
        raise NotApplicable("no slerp stage in the top trials' recipes (t-curves are drawn for slerp merges)")
    labels = list(dict.fromkeys(label for _, found in curves for label in found))
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.6, 3.4 * rows + 1.2), squeeze=False, sharey=True)
    for ax, label in zip(axes.flat, labels):
        for k, (r, found) in enumerate(curves):
            values = found.get(label)
            if values is None:
                continue
            winner = view.winner is not None and r["trial"] == view.winner["trial"]
            ax.plot(range(len(values)), values, marker="o", ms=3.5, lw=2.6 if winner else 1.2,
                    color=COLORS[k % 10], zorder=5 if winner else 3,
                    label=f"trial {r['trial']}" + (" (winner)" if winner else ""))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.03, 1.03)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"t (0 = {view.slerp_ends[0]}, 1 = {view.slerp_ends[1]})" if view.slerp_ends else "t")
    for ax in list(axes.flat)[len(labels):]:
        ax.remove()
    # one legend for all panels, beside them, so no curve is hidden under it
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"{view.name}: slerp t per layer, per filter ([rest]: every other tensor), top {len(curves)} trials")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(handles, names, loc="center right", fontsize=8, title="trial", title_fontsize=8)
    return fig


# ---- the winner's layers -----------------------------------------------------------------------


def layer_map(view) -> plt.Figure:
    """The winner stage by stage: a passthrough stack as output layer -> source layer; another merge as
    its parameters per layer."""
    if view.winner is None:
        raise NotApplicable("no trial completed, so there is no winner to draw")
    stages_ = recipes.loads(view.winner["recipe"], where=f"trial {view.winner['trial']}")
    depth_of = view.depth_resolver(stages_)
    panels = []
    for k, stage in enumerate(stages_):
        where = f"stage {k + 1}" + (f" ({stage.name})" if stage.name else "") if len(stages_) > 1 else "winner"
        if isinstance(stage, recipes.MoERecipe):
            continue  # experts, not layers: the YAML below the plots lists them
        if stage.merge_method == "passthrough":
            panels.append((where, stage, None))
        else:
            try:
                panels.append((where, stage, recipe_layers.parameter_rows(stage, depth_of)))
            except recipe_layers.UnknownDepth as e:
                raise NotApplicable(str(e)) from None
    if not panels:
        raise NotApplicable("the winner is a mixture of experts: its experts are listed in the YAML, not by layer")
    heights = [3.8 if rows is None else 1.6 + 0.42 * len(rows) for _, _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    names = {s.name for s in stages_ if s.name}
    for ax, (where, stage, rows) in zip(axes[:, 0], panels):
        if rows is None:
            _draw_stack(ax, where, stage, names)
        else:
            _draw_parameters(fig, ax, where, stage, rows)
    fig.suptitle(f"{view.name}: the winner (trial {view.winner['trial']}), layer by layer")
    fig.tight_layout()
    return fig


def _draw_stack(ax, where: str, stage, stage_names: set[str]) -> None:
    layers = recipe_layers.layer_map(stage)
    models = list(dict.fromkeys(m.model for m in layers))
    for m, model in enumerate(models):
        label = f"{model} (an earlier stage's output)" if model in stage_names else model
        ax.scatter([], [], color=COLORS[m % 10], label=f"layer of {label}")
    # each slice as one run of points: contiguous layers read as a line
    start = 0
    for s in stage.slices:
        run = layers[start:start + s.num_layers]
        start += s.num_layers
        color = COLORS[models.index(run[0].model) % 10]
        ax.plot([m.out_layer for m in run], [m.layer for m in run], color=color, lw=1.5, alpha=0.7)
        plain = [m for m in run if m.scale == 1.0]
        ax.scatter([m.out_layer for m in plain], [m.layer for m in plain], color=color, s=36, zorder=3)
    scaled = [m for m in layers if m.scale != 1.0]
    for m in scaled:
        identity = m.scale == 0.0
        ax.scatter(m.out_layer, m.layer, s=110, marker="X" if identity else "D", zorder=4,
                   color=COLORS[models.index(m.model) % 10], edgecolors="black", linewidths=1)
        ax.annotate("x0: identity" if identity else f"x{m.scale:.2g}", (m.out_layer, m.layer),
                    xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8)
    if any(m.scale == 0.0 for m in scaled):
        ax.scatter([], [], marker="X", s=80, color="white", edgecolors="black",
                   label="copied block, residual outputs x0: an identity")
    if any(m.scale not in (0.0, 1.0) for m in scaled):
        ax.scatter([], [], marker="D", s=60, color="white", edgecolors="black",
                   label="copied block, residual outputs scaled (xS)")
    ax.set_xlabel(f"output layer (of {len(layers)})")
    ax.set_ylabel("source layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.margins(x=0.04, y=0.12)
    ax.grid(alpha=0.3)
    ax.set_title(f"{where}: passthrough, which source layer each output layer copies", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def _draw_parameters(fig, ax, where: str, stage, rows: dict[str, list[float | None]]) -> None:
    labels = list(rows)
    depth = len(next(iter(rows.values()))) if rows else 0
    if not rows:
        ax.text(0.5, 0.5, f"{stage.merge_method} with no parameters", ha="center", va="center")
        ax.set_axis_off()
        return
    grid = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in rows[k]] for k in labels]))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if depth <= 24:
        for (i, j), v in np.ndenumerate(grid.filled(np.nan)):
            if not np.isnan(v):
                shade = image.norm(v)
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if shade > 0.5 else "white")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(f"layer (of {depth})")
    ax.set_ylabel("parameter")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(image, ax=ax, label="value at that layer", pad=0.01)
    models = ", ".join(stage.referenced_models())
    t_zero = f" (t = 0 is {stage.base_model})" if stage.merge_method == "slerp" and stage.base_model else ""
    ax.set_title(f"{where}: {stage.merge_method} of {models}{t_zero}, parameters per layer", fontsize=10)


# ---- Pareto front ------------------------------------------------------------------------------


def pareto(view) -> plt.Figure:
    """Every complete trial on each pair of objectives, the Pareto front joined."""
    n = len(view.objectives)
    if n < 2:
        raise NotApplicable("one objective: there is no Pareto front (the history shows the best)")
    done = [r for r in view.trials if r["state"] == "COMPLETE" and r.get("values")]
    if not done:
        raise NotApplicable("no trial completed")
    front = {r["trial"] for r in view.front}
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols + 0.6, 4.4 * rows + 0.8), squeeze=False)
    for ax, (a, b) in zip(axes.flat, pairs):
        others = [r for r in done if r["trial"] not in front]
        on = sorted((r for r in done if r["trial"] in front), key=lambda r: r["values"][a])
        ax.scatter([r["values"][a] for r in others], [r["values"][b] for r in others], s=24, color="0.6",
                   label="dominated trial")
        ax.plot([r["values"][a] for r in on], [r["values"][b] for r in on], "o-", color="tab:red", ms=6,
                label=f"Pareto front ({len(on)})")
        if view.winner:
            w = view.winner
            ax.scatter(w["values"][a], w["values"][b], marker="*", s=260, color="gold", edgecolors="black",
                       zorder=5, label=f"winner (trial {w['trial']}, best {view.objectives[0]})")
        at: dict[tuple[float, float], list[str]] = {}  # trials with the same scores share one label
        for r in on:
            at.setdefault((r["values"][a], r["values"][b]), []).append(str(r["trial"]))
        for xy, numbers in at.items():
            ax.annotate(", ".join(numbers), xy, xytext=(5, -11), textcoords="offset points", fontsize=8)
        ax.set_xlabel(_axis_label(view, a))
        ax.set_ylabel(_axis_label(view, b))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(pairs):]:
        ax.remove()
    fig.suptitle(f"{view.name}: Pareto front (trial numbers on the front)")
    fig.tight_layout()
    return fig
