"""Exporting trials of a run as mergekit YAML: best.yaml, pareto/, or any trial on request.

Everything here reads the run folder alone (run.json + trials.jsonl), never the
study: a finished run can be exported anywhere, without its storage's password.
Model aliases of the run spec are replaced by the folders (or hub names) they
stand for, so `mergekit-yaml best.yaml OUT` rebuilds the winner as it is.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from search.engine import recipe as recipes
from search import records
from search.engine.errors import UserError

# Fields of mergekit configs that name a model (tokenizer_source may also be "base" or "union").
_MODEL_FIELDS = ("model", "base_model", "source_model", "tokenizer_source", "source")


# ---- reading a run -------------------------------------------------------


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_dir = Path(run_dir)
    meta_path, trials_path = run_dir / "run.json", run_dir / "trials.jsonl"
    if not meta_path.is_file() or not trials_path.is_file():
        raise UserError(
            f"{run_dir}: not a run folder (no run.json / trials.jsonl); give the folder `mergesearch run` wrote"
        )
    return records.read_json(meta_path), records.read_trials(trials_path)


def _sign(direction: str) -> int:
    return 1 if direction == "maximize" else -1


def complete(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["state"] == "COMPLETE" and r.get("recipe") and r.get("values")]


def rank(recs: list[dict], directions: list[str], by_heldout: bool | None = None) -> list[dict]:
    """COMPLETE trials, best first, by the first objective. By held-out score when any trial has one
    (those re-scored come first, in held-out order), else by the search score."""
    pool = complete(recs)
    if by_heldout is None:
        by_heldout = any(r.get("heldout") for r in pool)
    sign = _sign(directions[0])

    def key(r):
        if by_heldout:
            h = r.get("heldout")
            return (0, -sign * h[0], r["trial"]) if h else (1, -sign * r["values"][0], r["trial"])
        return (0, -sign * r["values"][0], r["trial"])

    return sorted(pool, key=key)


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
    for r in recs:
        if r["trial"] == number:
            if not r.get("recipe"):
                why = f"{r['state']}: {r.get('reason')}"
                raise UserError(f"--trial {number}: that trial has no recipe ({why}); pick another")
            return r
    raise UserError(f"--trial {number}: no such trial in this run; see trials.jsonl for the numbers")


# ---- writing recipes -----------------------------------------------------


def _rename(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (mapping.get(v, v) if k in _MODEL_FIELDS and isinstance(v, str) else _rename(v, mapping))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rename(v, mapping) for v in node]
    return node


def with_model_paths(stages: list[recipes.Recipe], mapping: dict[str, str]) -> list[recipes.Recipe]:
    """The stages with every model alias replaced by its folder; intermediate stage names stay."""
    mapping = {k: v for k, v in mapping.items() if k not in {s.name for s in stages if s.name}}
    return [recipes.from_dict(_rename(recipes.to_dict(s), mapping)) for s in stages]


def rebuild_command(stages: list[recipes.Recipe], file_name: str, seed: int | None) -> str:
    seed_arg = f" --random-seed {seed}" if seed is not None else ""
    if len(stages) > 1:
        return f"mergekit-multi {file_name} --intermediate-dir INTERMEDIATE --out-path OUT{seed_arg}"
    if isinstance(stages[0], recipes.MoERecipe):
        return f"mergekit-moe {file_name} OUT{seed_arg}"
    return f"mergekit-yaml {file_name} OUT{seed_arg}"


def recipe_text(record: dict, meta: dict, file_name: str) -> str:
    """A trial's recipe as a mergekit YAML file, with a comment saying where it came from."""
    stages = recipes.loads(record["recipe"], where=f"trial {record['trial']}")
    stages = with_model_paths(stages, meta.get("model_paths", {}))
    names = meta.get("objectives", [])
    scores = ", ".join(f"{n} {v:.6g}" for n, v in zip(names, record["values"] or []))
    held = record.get("heldout")
    held_text = f"; held-out {', '.join(f'{v:.6g}' for v in held)}" if held else ""
    header = (
        f"# mergesearch run {meta.get('name')}, trial {record['trial']}: {scores}{held_text}\n"
        f"# rebuild: {rebuild_command(stages, file_name, meta.get('seed'))}\n"
    )
    return header + recipes.dump_stages(stages)


def write_recipe(record: dict, meta: dict, path: Path) -> Path:
    path = Path(path)
    records.write_atomic(path, recipe_text(record, meta, path.name))
    return path


def write_folder(folder: Path, items: list[tuple[str, str]]) -> Path:
    """Replace `folder` with one holding exactly `items` (name, text), all or nothing."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for name, text in items:
            (tmp / name).write_text(text)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_run_outputs(run_dir: Path) -> dict[str, Any]:
    """best.yaml (one objective) or pareto/ (several), from what the run folder holds."""
    run_dir = Path(run_dir)
    meta, recs = load_run(run_dir)
    directions = meta["directions"]
    out: dict[str, Any] = {}
    if len(directions) == 1:
        ranked = rank(recs, directions)
        if ranked:
            write_recipe(ranked[0], meta, run_dir / "best.yaml")
            out["best"] = _summary(ranked[0])
    else:
        front = pareto(recs, directions)
        items = [(f"trial-{r['trial']}.yaml", recipe_text(r, meta, f"trial-{r['trial']}.yaml")) for r in front]
        write_folder(run_dir / "pareto", items)
        out["pareto"] = [_summary(r) for r in front]
        if front:
            out["best"] = _summary(rank(front, directions)[0])
    return out


def _summary(r: dict) -> dict:
    return {"trial": r["trial"], "values": r["values"], "heldout": r.get("heldout"), "params": r["params"]}


# ---- the end-of-run table --------------------------------------------------


def print_summary(run_dir: Path, console=None, top: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    meta, recs = load_run(run_dir)
    names, directions = meta["objectives"], meta["directions"]
    states = {s: sum(1 for r in recs if r["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    shown = pareto(recs, directions) if len(directions) > 1 else rank(recs, directions)[:top]
    title = (
        f"{meta['name']}: {states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed"
        + (" — Pareto front" if len(directions) > 1 else f" — top {len(shown)}")
    )
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for n, d in zip(names, directions):
        table.add_column(f"{n} ({'max' if d == 'maximize' else 'min'})", justify="right")
    if any(r.get("heldout") for r in shown):
        table.add_column("held-out", justify="right")
    table.add_column("params")
    for r in shown:
        row = [str(r["trial"])] + [f"{v:.4g}" for v in r["values"]]
        if any(x.get("heldout") for x in shown):
            row.append(", ".join(f"{v:.4g}" for v in r["heldout"]) if r.get("heldout") else "")
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        row.append(params if len(params) < 100 else params[:97] + "...")
        table.add_row(*row)
    console.print(table)
    written = [p for p in ("best.yaml", "pareto") if (Path(run_dir) / p).exists()]
    if written:
        console.print(f"wrote {', '.join(str(Path(run_dir) / p) for p in written)}")
