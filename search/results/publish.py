"""A trial of a run as a Hugging Face model folder ready to publish (`mergesearch export --materialize`).

The folder holds the weights, config and tokenizer, the recipe under the models' public names
(mergekit_config.yml, or mergekit_moe_config.yml for a MoE) and a README.md model card with
the search's scores and settings (search/results/run_card.py). It is built by the engine
(search/engine/merge_command.py's `build`, bit for bit as mergekit 0.1.5 builds it) or, with
`with_mergekit`, by mergekit's own command on the recipe written with this machine's folders;
either way it appears complete or not at all, and names no local folder.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from search.results import export, run_card
from search.engine import output
from search.engine import recipe as recipes
from search.engine.errors import UserError
from search.engine.merge_command import build, recipe_file_name
from search.engine.model_card import model_card


def published_texts(record: dict, meta: dict, recs: list[dict], name: str) -> dict[str, str]:
    """The text files of the published folder `name` beside the weights, config and tokenizer: the recipe
    under the models' public names (as mergekit names its file) and README.md, the model card."""
    stages = recipes.loads(record["recipe"], where=f"trial {record['trial']}")  # models by alias
    public = export.renamed(stages, export.public_names(meta))
    file_name = recipe_file_name(public)
    text = f"# mergesearch run {meta.get('name')}, trial {record['trial']}\n" + recipes.dump_stages(public)
    readme = model_card(
        public, text, name=name, recipe_file=file_name, seed=meta.get("seed"),
        found_by=run_card.found_by(record, meta), base_models=run_card.base_models(stages, meta),
        extra=run_card.search_section(record, meta, recs),
    )
    return {file_name: text, "README.md": readme}


def materialize(record: dict, meta: dict, recs: list[dict], out: Path, *, with_mergekit: bool = False,
                overwrite: bool = False, progress=lambda message: None) -> Path:
    out = output.check_destination(out, overwrite)
    stages = recipes.loads(record["recipe"], where=f"trial {record['trial']}")  # models by alias
    texts = published_texts(record, meta, recs, out.name)
    recipe_file = next(name for name in texts if name != "README.md")
    seed = meta.get("seed")
    if with_mergekit:
        local = export.renamed(stages, export.local_names(meta))
        with output.atomic_folder(out, overwrite) as tmp:
            _run_mergekit(local, tmp, seed, progress)
            for name, content in texts.items():  # mergekit wrote the recipe with this machine's folders
                (tmp / name).write_text(content)
    else:
        allow_pickle = bool((meta.get("settings") or {}).get("allow_pickle"))
        public = export.renamed(stages, export.public_names(meta))
        build(public, texts[recipe_file], out, export.model_map(stages, meta), seed=seed, allow_pickle=allow_pickle,
              overwrite=overwrite, progress=progress, readme=texts["README.md"])
    return out


def mergekit_command(stages: list[recipes.Recipe]) -> str:
    if len(stages) > 1:
        return "mergekit-multi"
    return "mergekit-moe" if isinstance(stages[0], recipes.MoERecipe) else "mergekit-yaml"


def _run_mergekit(stages: list[recipes.Recipe], out: Path, seed: int | None, progress) -> None:
    """mergekit's own command on `stages` (written with local folders), writing into the folder `out`."""
    name = mergekit_command(stages)
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        raise UserError(f"--with-mergekit: {name} is not installed here; pip install mergekit==0.1.5, "
                        "or build with the engine (drop --with-mergekit)")
    with tempfile.TemporaryDirectory(prefix=".mergekit-", dir=out.parent) as work:
        recipe_path = Path(work) / "recipe.yaml"
        recipe_path.write_text(recipes.dump_stages(stages))
        if name == "mergekit-multi":
            command = [str(exe), str(recipe_path), "--intermediate-dir", str(Path(work) / "stages"),
                       "--out-path", str(out)]
        else:
            command = [str(exe), str(recipe_path), str(out)]
        if seed is not None:
            command += ["--random-seed", str(seed)]
        command += ["--lora-merge-cache", str(Path(work) / "lora")]  # where it merges a model's LoRA adapter first
        progress(f"building with {name}")
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--with-mergekit: {name} failed: {last}; build with the engine instead (drop --with-mergekit)")
