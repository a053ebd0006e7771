"""Exporting trials of a run as mergekit YAML: best.yaml, pareto/, or any trial on request.

Everything here reads the run folder alone (run.json + trials.jsonl), never the
study: a finished run can be exported anywhere, without its storage's password.
Model aliases of the run spec are replaced by the models' public names (run.json
`model_names`: a hub id, the name the spec gave, or the alias), never by a folder
of this machine unless asked (`local_paths`); the header gives the `--model-map`
arguments that rebuild the recipe here from the folders the run read.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

from search.results.run_folder import load_run
from search.results.verdict import verdict_line
from search.results.winner import all_numbers, pareto, winner
from search.study import records
from search.engine import output
from search.engine import recipe as recipes
from search.engine.errors import UserError

# Fields of mergekit configs that name a model (tokenizer_source may also be "base" or "union").
_MODEL_FIELDS = ("model", "base_model", "source_model", "tokenizer_source", "source")


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


def renamed(stages: list[recipes.Recipe], mapping: dict[str, str]) -> list[recipes.Recipe]:
    """The stages with every model alias replaced by mapping[alias]; intermediate stage names stay."""
    mapping = {k: v for k, v in mapping.items() if k not in {s.name for s in stages if s.name}}
    return [recipes.from_dict(_rename(recipes.to_dict(s), mapping)) for s in stages]


def public_names(meta: dict) -> dict[str, str]:
    """alias -> public name; a run from before public names were recorded names its models by alias."""
    names = meta.get("model_names") or {}
    return {alias: names.get(alias, alias) for alias in meta.get("model_paths") or {}}


def local_names(meta: dict) -> dict[str, str]:
    """alias -> the model as mergekit reads it on this machine: its folder, or `folder+adapter folder`."""
    adapters = meta.get("adapter_paths") or {}
    return {a: f"{p}+{adapters[a]}" if a in adapters else p for a, p in (meta.get("model_paths") or {}).items()}


def model_map(stages: list[recipes.Recipe], meta: dict) -> dict[str, str]:
    """public name -> local folder of each model (and adapter) the stages (written with aliases) read: what
    `--model-map NAME=PATH` needs to rebuild the public recipe on this machine."""
    from search.engine.merge_command import source_model_names

    names, paths, adapters = public_names(meta), meta.get("model_paths") or {}, meta.get("adapter_paths") or {}
    mapping = {}
    for a in source_model_names(stages):
        if a in adapters:  # public name `base+adapter`: each part maps to its own folder
            base, adapter = names[a].split("+")
            mapping.update({base: paths[a], adapter: adapters[a]})
        elif a in paths:
            mapping[names[a]] = paths[a]
    return mapping


def model_map_args(mapping: dict[str, str]) -> str:
    return " ".join(f"--model-map {shlex.quote(f'{name}={path}')}" for name, path in mapping.items())


def rebuild_command(stages: list[recipes.Recipe], file_name: str, seed: int | None) -> str:
    seed_arg = f" --random-seed {seed}" if seed is not None else ""
    if len(stages) > 1:
        return f"mergekit-multi {file_name} --intermediate-dir INTERMEDIATE --out-path OUT{seed_arg}"
    if isinstance(stages[0], recipes.MoERecipe):
        return f"mergekit-moe {file_name} OUT{seed_arg}"
    return f"mergekit-yaml {file_name} OUT{seed_arg}"


def recipe_text(record: dict, meta: dict, file_name: str, local_paths: bool = False) -> str:
    """A trial's recipe as a mergekit YAML file, with a comment saying where it came from: the models under
    their public names (or this machine's folders with `local_paths`), and how to rebuild it."""
    stages = recipes.loads(record["recipe"], where=f"trial {record['trial']}")
    seed = meta.get("seed")
    lines = [f"mergesearch run {meta.get('name')}, trial {record['trial']}: {_score_text(record, meta)}"]
    if verdict_line(meta.get("verdict")):
        lines.append(verdict_line(meta.get("verdict")))
    if local_paths:
        out = renamed(stages, local_names(meta))
        lines.append(f"rebuild: {rebuild_command(out, file_name, seed)}")
        lines.append("models: this machine's folders (`mergesearch export` without --local-paths names them publicly)")
    else:
        out = renamed(stages, public_names(meta))
        seed_arg = f" --random-seed {seed}" if seed is not None else ""
        lines.append(f"rebuild: {rebuild_command(out, file_name, seed)}")
        lines.append(f"rebuild here: mergesearch merge {file_name} OUT{seed_arg} {model_map_args(model_map(stages, meta))}")
        lines.append("(mergekit reads local folders: `mergesearch export RUN_DIR --local-paths FILE` writes them in)")
    return "".join(f"# {line}\n" for line in lines) + recipes.dump_stages(out)


def _score_text(record: dict, meta: dict) -> str:
    def scores(names, values):
        return ", ".join(f"{n} {v:.6g}" if isinstance(v, (int, float)) else f"{n} {v}" for n, v in zip(names, values))

    if record["state"] == "PRUNED":
        # no final score: say so, and at which stage (fidelity) the score shown was taken
        done = [s for s in record.get("stages") or [] if isinstance(s, dict) and s.get("scores")]
        if not done:
            return f"pruned before any stage was scored ({record.get('reason')}); no score"
        last = done[-1]
        return (
            f"pruned after stage {last.get('step')} of {meta.get('stages')}; score at that stage, not a final "
            f"one: {scores(last['scores'], last['scores'].values())}"
        )
    text = scores(meta.get("objectives", []), record.get("values") or [])
    held = record.get("heldout")
    return text + (f"; held-out {', '.join(f'{v:.6g}' for v in held)}" if all_numbers(held) else "")


def write_recipe(record: dict, meta: dict, path: Path, overwrite: bool = False, local_paths: bool = False) -> Path:
    """One recipe file, written whole (temp file, then rename). An existing file is replaced only
    with `overwrite`; a folder in its place never."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"OUT {path}: is a folder; give a file name for one recipe, e.g. {path / 'recipe.yaml'}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"OUT {path}: exists; choose another path or pass --overwrite to replace it")
    created = [p for p in reversed(path.absolute().parents) if not p.exists()]
    try:
        records.write_atomic(path, recipe_text(record, meta, path.name, local_paths))
    except BaseException:
        for p in reversed(created):  # the folders made for it: nothing is left half-written
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    return path


def write_folder(folder: Path, items: list[tuple[str, str]], overwrite: bool = False) -> Path:
    """`items` (name, text) as files in `folder`; never deletes anything.

    A new or empty folder appears complete or not at all (built beside it, then renamed). An
    existing non-empty one is refused unless `overwrite`; then the files of `items` are written
    beside their names and renamed over them once all are written, and nothing else is touched.
    """
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise UserError(f"OUT {folder}: exists and is not a folder; choose another path")
        if any(folder.iterdir()):
            if not overwrite:
                raise UserError(
                    f"OUT {folder}: exists and is not empty; choose another path, or pass --overwrite "
                    "(which replaces only the files of the same names)"
                )
            _replace_files(folder, items)
            return folder
    with output.atomic_folder(folder) as tmp:
        for name, text in items:
            (tmp / name).write_text(text)
    return folder


def _replace_files(folder: Path, items: list[tuple[str, str]]) -> None:
    for name, _ in items:
        if (folder / name).is_dir():
            raise UserError(f"OUT {folder}: {name} is a folder; move it or choose another path")
    written: list[tuple[Path, Path]] = []
    try:
        for name, text in items:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            written.append((Path(tmp), folder / name))
            with os.fdopen(fd, "w") as f:
                f.write(text)
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise


def write_run_outputs(run_dir: Path) -> dict[str, Any]:
    """best.yaml (one objective) or pareto/ (several), from what the run folder holds."""
    run_dir = Path(run_dir)
    meta, recs = load_run(run_dir)
    directions = meta["directions"]
    out: dict[str, Any] = {}
    best = winner(recs, directions)
    if len(directions) == 1:
        if best:
            write_recipe(best, meta, run_dir / "best.yaml", overwrite=True)
    else:
        front = pareto(recs, directions)
        items = [(f"trial-{r['trial']}.yaml", recipe_text(r, meta, f"trial-{r['trial']}.yaml")) for r in front]
        # the run's own output folder: replaced whole, so it holds the current front and no older one
        with output.atomic_folder(run_dir / "pareto", overwrite=True) as tmp:
            for name, text in items:
                (tmp / name).write_text(text)
        out["pareto"] = [_summary(r) for r in front]
    if best:
        out["best"] = _summary(best)
    return out


def _summary(r: dict) -> dict:
    return {"trial": r["trial"], "values": r["values"], "heldout": r.get("heldout"), "params": r.get("params") or {}}
