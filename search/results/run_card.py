"""What a model card says of the search that found a model: scores against the baselines, settings.

The card itself (front matter, merge details, recipe) is search/engine/model_card.py's; this
adds the sentence on how the recipe was found and a "Search" section, from the run folder
alone (run.json + trials.jsonl), naming models only by their public names.
"""

from __future__ import annotations

import yaml

from search.results import export


def found_by(record: dict, meta: dict) -> str:
    return (f"It was found by mergesearch's search over merge recipes: run `{meta.get('name')}`, "
            f"trial {record['trial']}.")


def base_models(stages, meta: dict) -> list[str]:
    """The public names of the models the recipe (written with aliases) reads: the card's `base_model`."""
    return list(export.model_map(stages, meta))


def search_section(record: dict, meta: dict, recs: list[dict]) -> str:
    from search.results.verdict import verdict_line

    parts = ["## Search", _scores_table(record, meta)]
    verdict = verdict_line(meta.get("verdict"))
    if verdict:
        parts.append(f"Verdict of the run: {verdict}.")
    if record["state"] == "PRUNED":
        parts.append("This trial was pruned: its scores are those of the last stage it reached, not final ones.")
    parts.append(_settings(meta, recs))
    return "\n\n".join(parts)


def _scores_table(record: dict, meta: dict) -> str:
    """One row for this model and one per baseline; a search and a held-out column per objective."""
    objectives = meta.get("objectives") or []
    directions = meta.get("directions") or []
    head = ["model"]
    for name, direction in zip(objectives, directions):
        better = "higher" if direction == "maximize" else "lower"
        head += [f"{name}, search ({better} is better)", f"{name}, held-out"]
    rows = [[f"this model (trial {record['trial']})", *_cells(record.get("values"), record.get("heldout"), objectives)]]
    for name, b in (meta.get("baselines") or {}).items():
        rows.append([f"baseline: {name}", *_cells(b.get("values"), b.get("heldout"), objectives)])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = ("Search scores are on the examples the search scored; held-out scores on a split it never saw "
            "(only the top trials and the baselines are re-scored there).")
    return note + "\n\n" + "\n".join(lines)


def _cells(values, heldout, objectives: list[str]) -> list[str]:
    def at(xs, i):
        return f"{xs[i]:.4g}" if isinstance(xs, list) and i < len(xs) and isinstance(xs[i], (int, float)) else "-"

    return [cell for i in range(len(objectives)) for cell in (at(values, i), at(heldout, i))]


def _settings(meta: dict, recs: list[dict]) -> str:
    settings = meta.get("settings") or {}
    trials = [r for r in recs if not r.get("baseline")]
    counts = {s: sum(r["state"] == s for r in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    budget = [f"{settings['trials']} trials" if settings.get("trials") else None,
              f"{settings['timeout']:g} s" if settings.get("timeout") else None]
    staged = [s for s in meta.get("stages") or [] if s is not None]
    pruner = settings.get("pruner", "unknown") if staged else "none (one stage: nothing to prune between)"
    lines = [
        f"* trials: {len(trials)} ({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed)"
        + (f"; budget {' and '.join(b for b in budget if b)}" if any(budget) else ""),
        f"* sampler: {settings.get('sampler', 'unknown')}; pruner: {pruner}",
    ]
    if staged:
        lines.append(f"* fidelity stages: {', '.join(map(str, staged))}")
    for spec, name, direction in zip(settings.get("objectives") or [], meta.get("objectives") or [],
                                     meta.get("directions") or []):
        lines.append(f"* objective {name}: {_objective(spec)}, {direction}")
    space = settings.get("space")
    text = "### Search settings\n\n" + "\n".join(lines)
    if isinstance(space, dict):
        # the space in the spec's own terms (models by their aliases in the run spec)
        names = ", ".join(a if n == a else f"{a} = {n}" for a, n in export.public_names(meta).items())
        text += (f"\n* space: {_space_kinds(space)}, over the models {names} (the run spec's aliases)\n\n<details><summary>the search space, as the run spec "
                 f"wrote it</summary>\n\n```yaml\n{yaml.safe_dump(space, sort_keys=False).rstrip()}\n```\n\n</details>")
    return text


def _objective(spec: dict) -> str:
    """kind, and what it scores, without the spec's file paths."""
    kind = spec.get("kind", "?")
    if kind == "lmeval":
        tasks = [t.get("task") if isinstance(t, dict) else t for t in spec.get("tasks") or []]
        return f"lm-eval {spec.get('metric', 'acc')} on {', '.join(map(str, tasks))}"
    if kind == "cost":
        return f"cost ({spec.get('measure', 'params')})"
    return kind


def _space_kinds(space: dict) -> str:
    if space.get("kind") == "compose":
        kinds = [str(s.get("kind")) for s in space.get("stages") or [] if isinstance(s, dict)]
        return f"compose ({', then '.join(kinds)})"
    return str(space.get("kind"))
