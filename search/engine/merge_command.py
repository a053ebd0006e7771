"""`mergesearch merge RECIPE.yml OUT_DIR`: build a mergekit recipe into an HF model folder.

Accepts what `mergekit-yaml` accepts, what `mergekit-moe` accepts (recognised by
its `experts:`) and multi-stage files as `mergekit-multi` reads them (documents
separated by `---`, intermediates named with `name:`). Writes config.json,
safetensors shards, the tokenizer, the recipe (mergekit_config.yml, or
mergekit_moe_config.yml for a MoE config, as mergekit names them) and a README
model card.

OUT_DIR appears complete or not at all: the model is merged into files in a
hidden folder beside OUT_DIR, which is renamed into place at the end. An existing
empty OUT_DIR is used; a non-empty one is refused unless --overwrite is given, and
is then replaced only once the new folder is complete. Missing parent folders are
created. On any error (Ctrl-C included) nothing is left behind and an existing
OUT_DIR is untouched. Progress goes to stderr on a terminal (or with -v); the
folder written is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from search.engine import output, recipe, safe_yaml
from search.engine.errors import UserError, short
from search.engine.lora import split_adapter
from search.engine.omp_wait import sleep_when_idle
from search.engine.recipe import MoERecipe, Recipe
from search.engine.tokenizer_config import stage_setting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    paragraphs = __doc__.split("\n\n")
    parser.description = "\n\n".join(paragraphs[:2])
    parser.epilog = paragraphs[2]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("recipe", metavar="RECIPE.yml", help="a mergekit-yaml, mergekit-moe or multi-stage config")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write")
    parser.add_argument(
        "--model-map",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="build model NAME (as the recipe writes it, e.g. a hub id) from the local folder PATH; repeatable",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to do the math (default cpu)")
    parser.add_argument("--random-seed", type=int, default=None, metavar="N", help="seed for DARE and random gates")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin (pickle) checkpoints: runs code")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument(
        "--out-shard-size",
        default="5B",
        metavar="SIZE",
        help="bytes per safetensors shard, as mergekit's option (5B, 500M, ...; default 5B)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="progress lines on stderr even when it is not a terminal")
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


class Progress:
    """Progress lines on stderr: shown on a terminal (or with -v), never mixed into an error's one line when piped."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_model_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model-map {short(item)}: expected NAME=PATH, e.g. --model-map liminerity/phive=./phive")
        mapping[name] = path
    return mapping


def source_model_names(stages: list[Recipe]) -> list[str]:
    """Every model the stages read that no earlier stage builds, in order of first mention (a model
    named only as tokenizer source last)."""
    built = {s.name for s in stages if s.name}
    names = [n for s in stages for n in s.referenced_models() if n not in built]
    sources = [setting.source for s in stages if (setting := stage_setting(s)) and setting.source not in ("base", "union")]
    return list(dict.fromkeys(names + [n for n in sources if n not in built]))


def copied_tokenizer(stages: list[Recipe]) -> str | None:
    """The model whose tokenizer files mergekit copies verbatim: the base model, else the first model,
    followed back through intermediate stages. None where mergekit saves a tokenizer it built or read
    instead: a stage on the way sets a tokenizer or a chat template (mergekit then saves the tokenizer
    with the template set), the output is a mixture of experts, or the donor has a LoRA adapter
    (mergekit reads its model's tokenizer and saves it)."""
    by_name = {s.name: s for s in stages if s.name}
    stage = stages[-1]
    for _ in range(len(stages)):
        if needs_built_tokenizer(stage):
            return None
        donor = stage.base_model or stage.referenced_models()[0]
        if donor not in by_name:
            return None if split_adapter(donor)[1] else donor  # with an adapter, mergekit re-saves the base's
        stage = by_name[donor]
    raise UserError("name: the stages refer to each other in a cycle; each stage may use only earlier ones")


def recipe_file_name(stages: list[Recipe]) -> str:
    # mergekit-moe writes its config as mergekit_moe_config.yml; mergekit-yaml as mergekit_config.yml
    return "mergekit_moe_config.yml" if len(stages) == 1 and isinstance(stages[0], MoERecipe) else "mergekit_config.yml"


def needs_built_tokenizer(stage: Recipe) -> bool:
    """True when the tokenizer cannot be copied verbatim: mergekit builds it, or reads it and sets its chat template."""
    if isinstance(stage, MoERecipe):
        return True  # mergekit-moe re-saves the base tokenizer with left padding
    return bool(stage.tokenizer_source or stage.tokenizer or stage.chat_template)


def main(args: argparse.Namespace) -> int:
    try:
        return _merge(args)
    except UserError as e:
        # The engine names its option as a Python argument; here it is a flag.
        raise UserError(str(e).replace("allow_pickle=True", "--allow-pickle")) from None


def _merge(args: argparse.Namespace) -> int:
    progress = Progress(enabled=not args.quiet and (args.verbose or sys.stderr.isatty()))

    # Everything that can be checked without loading a model is checked first.
    recipe_path = Path(args.recipe)
    if recipe_path.is_dir():
        raise UserError(f"RECIPE.yml {args.recipe}: is a folder; give the recipe's YAML file")
    if not recipe_path.is_file():
        raise UserError(f"RECIPE.yml {args.recipe}: no such file; check the path")
    recipe_text = safe_yaml.read_text(recipe_path, str(recipe_path))
    stages = recipe.loads(recipe_text, where=str(recipe_path))
    model_map = parse_model_map(args.model_map)
    out_dir = output.check_destination(args.out_dir, args.overwrite)
    shard_size = output.parse_size(args.out_shard_size)
    build(stages, recipe_text, out_dir, model_map, device=args.device, seed=args.random_seed,
          allow_pickle=args.allow_pickle, overwrite=args.overwrite, shard_size=shard_size, progress=progress)
    print(out_dir)
    return 0


def build(
    stages: list[Recipe],
    recipe_text: str,
    out_dir: Path,
    model_map: dict[str, str],
    *,
    device: str = "cpu",
    seed: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    shard_size: int = output.parse_size("5B"),
    progress=lambda message: None,
    readme: str | None = None,
) -> None:
    """Build `stages` into the HF folder `out_dir`, which appears complete or not at all: the tensors,
    config, tokenizer, `recipe_text` as mergekit names its config file, and `readme` as README.md (by
    default the model card of the recipe). Model names resolve through `model_map`, else as folders."""
    # One build: compiling the fused pass (torch.compile) costs seconds that only many
    # candidates in a row pay back. MERGESEARCH_COMPILE=1 turns it back on.
    os.environ.setdefault("MERGESEARCH_COMPILE", "0")
    sleep_when_idle()  # before torch loads OpenMP (search/engine/omp_wait.py)
    from search.engine.materialize import Materializer, resolve_adapter_path, resolve_model_path

    models = {}  # every model and adapter folder, by the name the recipe gives it (`model+adapter`: each part)
    for name in source_model_names(stages):
        model, adapter = split_adapter(name)
        models[model] = _resolve(model, model_map, resolve_model_path)
        if adapter:
            models[adapter] = _resolve(adapter, model_map, lambda a, m: resolve_adapter_path(name, a, m), "adapter")
    device = _check_device(device)

    progress(f"loading {len(models)} model(s) onto {device}")
    # One build: nothing is kept for a next candidate (no cache; a recipe `dtype:` converted tensor by
    # tensor, not kept as a copy of the sources), and each source tensor's pages are let go once used.
    materializer = Materializer(models, device, allow_pickle=allow_pickle, one_shot=True)
    recipe_arg = stages if len(stages) > 1 else stages[0]
    plans = materializer.plan(recipe_arg)  # every check against the models, before any folder exists

    final = stages[-1]
    donor = copied_tokenizer(stages)
    if donor is None:
        tokenizer = materializer.tokenizer(recipe_arg)
        if tokenizer is None:  # mergekit, too, goes on without one (chat_template: it cannot read the donor's)
            print("mergesearch merge: warning: the donor model has no tokenizer files; the output has no tokenizer",
                  file=sys.stderr)
        elif isinstance(final, MoERecipe):
            tokenizer = _as_mergekit_moe_saves_it(tokenizer, final.gate_mode)
    else:
        tokenizer = _tokenizer_folder(models[donor])

    from search.engine.model_card import model_card

    file_name = recipe_file_name(stages)
    files = {
        file_name: recipe_text,
        "README.md": readme or model_card(stages, recipe_text, name=out_dir.name, recipe_file=file_name),
    }
    what = f"{len(stages)} stages" if len(stages) > 1 else _what(final)
    with output.atomic_folder(out_dir, overwrite) as tmp:
        specs = _output_specs(plans[-1]) if device == "cpu" else None
        if specs is not None:
            # The shards are laid out first and memory-mapped; the merge is computed
            # straight into them (no copy of the model in memory, no write pass).
            with output.MappedShards(tmp, specs, shard_size) as shards:
                progress(f"merging ({what}) into {', '.join(shards.file_names)}")
                config, tensors = materializer.state_dict(recipe_arg, seed=seed, out=shards.tensors, pages=shards)
                count, size = len(tensors), shards.total_size
                del tensors  # views of the mapped files: let them close
        else:
            progress(f"merging ({what})")
            config, tensors = materializer.state_dict(recipe_arg, seed=seed)
            output.write_tensors(tmp, tensors, shard_size, progress)
            count, size = len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        output.write_beside_tensors(tmp, config, tokenizer, files, progress)
    progress(f"done: {count} tensors, {size / 1e9:.2f} GB")


def _resolve(name: str, model_map: dict[str, str], resolve_model_path, what: str = "model") -> Path:
    # A name written as a path (as mergekit tells them apart: leading / or ~, or more than
    # one slash) is a folder that is missing, not a hub id to map.
    looks_like_path = name.startswith(("/", "~", "./", "../")) or name.count("/") > 1
    if name not in model_map and looks_like_path and not Path(name).expanduser().is_dir():
        raise UserError(f"{what} {name}: no such folder; check the path in the recipe")
    return resolve_model_path(name, model_map)


def _output_specs(plan) -> dict | None:
    """{name: (shape, dtype)} of a merge stage's output, in mergekit's order; None for a MoE stage."""
    from search.engine.plan import StagePlan

    if not isinstance(plan, StagePlan):
        return None
    infos = plan.output.tensors
    if any(j.name not in infos for j in plan.jobs):
        return None
    return {j.name: (infos[j.name].shape, infos[j.name].dtype) for j in plan.jobs}


def _what(stage: Recipe) -> str:
    if isinstance(stage, MoERecipe):
        return f"mixture of {len(stage.experts)} experts, gate_mode {stage.gate_mode}"
    return stage.merge_method


def _check_device(device: str) -> str:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    return device


def _tokenizer_folder(folder: Path) -> Path | None:
    if output.has_tokenizer_files(Path(folder)):
        return Path(folder)
    # mergekit goes on without a tokenizer when the donor has none; so do we, but say so.
    print(f"mergesearch merge: warning: {folder} has no tokenizer files; the output has no tokenizer", file=sys.stderr)
    return None


def _as_mergekit_moe_saves_it(tokenizer, gate_mode: str):
    """mergekit-moe pads on the left with BOS (EOS when there is no BOS) before saving the base tokenizer.
    Where its gates come from prompts, it saves the tokenizer it encoded them with (padding=True), and a fast
    tokenizer keeps that padding on: its tokenizer.json records it. The same call leaves ours the same."""
    import copy

    from search.engine.moe_gates import tokenize_prompts

    tokenizer = copy.deepcopy(tokenizer)  # the Materializer keeps its own
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gate_mode not in ("random", "uniform_random"):
        tokenize_prompts(tokenizer, ["a prompt"])
    return tokenizer
