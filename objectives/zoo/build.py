"""Build the toy zoo: a tokenizer, a base model, one specialist per skill, task folders.

    DIR/zoo.json              what was built (seed, scale, models, the skill x model matrix)
    DIR/base, DIR/fst, ...    HF model folders (safetensors + char tokenizer)
    DIR/tasks/<skill>/        lm-eval tasks <skill>_search, <skill>_heldout, <skill>_test

The build is deterministic in the seed (bit-identical on rebuild) and cached: a
complete zoo of the same seed and scale in DIR is reused. It is written to a
temporary sibling folder and moved into place at the end, so DIR never holds half
a zoo.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from objectives.zoo import skills as zoo_skills
from objectives.zoo.progress import step_progress
from objectives.zoo.tasks import SPLITS, refresh_task_folder, task_name, write_task_folder
from objectives.zoo.tokenizer import make_tokenizer
from objectives.zoo.train import init_model, train
from search.engine.errors import UserError

FORMAT = 1  # bump when the recipe below changes, so old caches are rebuilt
MANIFEST = "zoo.json"
SKILLS = ["fst", "nxt", "cnt", "max"]
SPLIT_SIZES = {"search": 256, "heldout": 256, "test": 200}
BASE = dict(steps=2000, batch_size=64, lr=2e-3, warmup=100)
SPECIALIST = dict(steps=80, batch_size=64, lr=3e-4, warmup=8)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, seed: int, scale: float) -> bool:
    m = read_manifest(folder)
    return (
        m is not None
        and (m.get("format"), m.get("seed"), m.get("scale")) == (FORMAT, seed, scale)
        and all((folder / name / "model.safetensors").is_file() for name in m.get("models", []))
        and all((folder / "tasks" / s / f"{task_name(s, split)}.yaml").is_file() for s in m.get("skills", []) for split in SPLITS)
    )


def scaled(recipe: dict, scale: float) -> dict:
    return {**recipe, "steps": max(1, round(recipe["steps"] * scale)), "warmup": max(1, round(recipe["warmup"] * scale))}


def _print(line: str) -> None:
    print(line, flush=True)


def build_zoo(
    folder: str | Path, seed: int = 0, scale: float = 1.0, threads: int | None = 1, log: Callable[[str], None] = _print
) -> dict:
    """Build (or reuse) the zoo in `folder`; returns its manifest, including the skill x model matrix.

    `scale` multiplies every training step count: 1.0 is the real zoo, small values
    give a fast, untrained-but-complete zoo for tests. `threads`: torch threads while
    building (None: torch's default). One by default: a 1 M-parameter model gains
    little from a second thread and loses several-fold when other jobs share the
    cores. The weights do not depend on it.
    """
    folder = Path(folder).resolve()
    if is_complete(folder, seed, scale):
        manifest = read_manifest(folder)
        for skill in manifest["skills"]:
            refresh_task_folder(folder / "tasks" / skill)  # in case the zoo was moved here, or is older
        log(f"zoo: {folder} already holds the zoo of seed {seed}; reusing it")
        return manifest
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; give a folder for the zoo")
    if folder.exists() and any(folder.iterdir()) and read_manifest(folder) is None:
        raise UserError(f"{folder} exists and is not a zoo; give a new or empty folder for the zoo")

    started = time.time()
    tmp = folder.parent / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        manifest = _build(tmp, folder, seed, scale, log)
        manifest["build_seconds"] = round(time.time() - started, 1)
        _write_json(tmp / MANIFEST, manifest)
        _swap_into_place(tmp, folder)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"zoo: built in {manifest['build_seconds']:.0f} s -> {folder}")
    return manifest


def _build(tmp: Path, final: Path, seed: int, scale: float, log: Callable[[str], None]) -> dict:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        skills = [zoo_skills.SKILLS[name] for name in SKILLS]
        tokenizer = make_tokenizer()

        # Evaluation prompts first; training never draws one of them.
        eval_rng = random.Random(seed * 1000 + 1)
        reserved: set[str] = set()
        splits = {
            s.name: {split: zoo_skills.eval_split(s, eval_rng, n, reserved) for split, n in SPLIT_SIZES.items()}
            for s in skills
        }
        for s in skills:  # pointing at tmp for now, to score the models before the move
            write_task_folder(tmp / "tasks" / s.name, s.name, splits[s.name], tmp / "tasks" / s.name)

        recipe = scaled(BASE, scale)
        t = time.time()
        base = init_model(seed)
        with step_progress("zoo: base", recipe["steps"]) as step:
            losses = train(base, lambda rng: zoo_skills.pretraining_example(rng, skills, reserved),
                           seed=seed * 1000 + 2, on_step=step, **recipe)
        log(f"zoo: base          {recipe['steps']:5d} steps, final loss {sum(losses[-20:]) / len(losses[-20:]):.3f} ({time.time() - t:.0f} s)")
        _save(base, tokenizer, tmp / "base")

        recipe = scaled(SPECIALIST, scale)
        for i, s in enumerate(skills):
            t = time.time()
            specialist = copy.deepcopy(base)
            with step_progress(f"zoo: specialist {s.name}", recipe["steps"]) as step:
                losses = train(specialist, lambda rng, s=s: zoo_skills.skill_example(rng, s, reserved),
                               seed=seed * 1000 + 10 + i, on_step=step, **recipe)
            log(f"zoo: specialist {s.name} {recipe['steps']:5d} steps, final loss {losses[-1]:.3f} ({time.time() - t:.0f} s)")
            _save(specialist, tokenizer, tmp / s.name)
    finally:
        torch.use_deterministic_algorithms(deterministic)

    models = ["base"] + SKILLS
    manifest = {"format": FORMAT, "seed": seed, "scale": scale, "models": models, "skills": SKILLS, "tasks": "tasks"}
    manifest["matrix"] = skill_matrix(tmp, models, SKILLS)
    for s in skills:
        write_task_folder(tmp / "tasks" / s.name, s.name, splits[s.name], final / "tasks" / s.name)
    return manifest


def skill_matrix(folder: Path, models: list[str], skills: list[str], split: str = "test") -> dict[str, dict[str, float]]:
    """model -> skill -> accuracy on the skill's `split`, with the lmeval objective the search uses."""
    import transformers

    from objectives.lmeval import LmEvalObjective, TaskEntry

    objective = LmEvalObjective(
        [TaskEntry(task_name(s, split), "acc", 1.0, None) for s in skills], include_path=[folder / "tasks"]
    )
    matrix = {}
    for name in models:
        with no_hf_progress_bars():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder / name).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / name)
        scores = objective.task_scores(model, tokenizer)
        matrix[name] = {s: round(scores[task_name(s, split)], 4) for s in skills}
    return matrix


def format_matrix(matrix: dict[str, dict[str, float]]) -> str:
    """Rows: models; columns: skills and their mean (accuracy on the test split)."""
    skills = list(next(iter(matrix.values())))
    lines = ["model  " + "".join(f"{s:>7}" for s in skills) + "   mean"]
    for name, row in matrix.items():
        mean = sum(row.values()) / len(row)
        lines.append(f"{name:<7}" + "".join(f"{row[s]:7.2f}" for s in skills) + f"{mean:7.2f}")
    return "\n".join(lines)


@contextmanager
def no_hf_progress_bars():
    """transformers draws a bar per tiny model loaded or saved: noise in the zoo's log."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _save(model, tokenizer, folder: Path) -> None:
    with no_hf_progress_bars():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Replace `folder` (an old zoo, or nothing) by `tmp` with renames only."""
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
