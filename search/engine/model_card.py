"""The README.md model card written beside a merged model.

It says what went in (models, method, base), how it was made (mergesearch,
building the recipe exactly as mergekit 0.1.5 does) and gives the recipe itself,
so anyone can rebuild the model with mergekit.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from search.engine.recipe import MergeRecipe, MoERecipe, Recipe

MERGESEARCH_URL = "https://github.com/mergesearch/mergesearch"

# merge_method -> how the card names it (with the paper that introduced it, where there is one)
METHOD_NAMES = {
    "linear": "[Linear](https://arxiv.org/abs/2203.05482)",
    "slerp": "[SLERP](https://en.wikipedia.org/wiki/Slerp)",
    "task_arithmetic": "[Task Arithmetic](https://arxiv.org/abs/2212.04089)",
    "ties": "[TIES](https://arxiv.org/abs/2306.01708)",
    "dare_ties": "[DARE](https://arxiv.org/abs/2311.03099) [TIES](https://arxiv.org/abs/2306.01708)",
    "dare_linear": "linear [DARE](https://arxiv.org/abs/2311.03099)",
    "passthrough": "Passthrough",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_name(name: str) -> bool:
    """True for names written like a Hugging Face model id (`org/model`) that are not local folders."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def not_on_the_hub(names: list[str]) -> list[str]:
    """Those of `names` that are no hub id: a card may not list them in `base_model`, only in its text."""
    return [n for n in names if not is_hub_name(n)]


def _method(name: str) -> str:
    return METHOD_NAMES.get(name, f"`{name}`")


def _bullets(names: list[str]) -> str:
    return "\n".join(f"* {_link(n)}" for n in names) or "* (none)"


def _link(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if is_hub_name(name) else f"`{name}`"


def _describe_merge(stage: MergeRecipe, stage_names: set[str]) -> str:
    models = [m for m in stage.referenced_models() if m != stage.base_model]
    if stage.merge_method == "slerp" or not stage.base_model:
        how = f"This model was merged with the {_method(stage.merge_method)} merge method"
        models = stage.referenced_models()
        if stage.base_model and stage.merge_method == "slerp":
            how += f", interpolating from {_link(stage.base_model)}"
        how += "."
    else:
        how = f"This model was merged with the {_method(stage.merge_method)} merge method, using {_link(stage.base_model)} as the base."
    return f"{how}\n\nModels merged:\n{_bullets(models)}"


def _describe_moe(stage: MoERecipe) -> str:
    experts = [e.source_model for e in stage.experts]
    return (
        f"A mixture of experts (Mixtral layout) with {len(experts)} experts and "
        f"{stage.experts_per_token} experts per token; attention, embeddings and norms come from "
        f"{_link(stage.base_model)}, router gates by gate mode `{stage.gate_mode}`.\n\n"
        f"Experts (the MLP of each):\n{_bullets(experts)}"
    )


def _describe(stage: Recipe, stage_names: set[str]) -> str:
    return _describe_moe(stage) if isinstance(stage, MoERecipe) else _describe_merge(stage, stage_names)


def _rebuild_command(stages: list[Recipe], recipe_file: str, seed: int | None = None) -> str:
    seed_arg = f" --random-seed {seed}" if seed is not None else ""  # DARE and random gates draw from it
    if len(stages) > 1:
        return f"mergekit-multi {recipe_file} --intermediate-dir ./intermediates --out-path ./merged{seed_arg}"
    if isinstance(stages[0], MoERecipe):
        return f"mergekit-moe {recipe_file} ./merged{seed_arg}"
    return f"mergekit-yaml {recipe_file} ./merged{seed_arg}"


def model_card(
    stages: list[Recipe],
    recipe_text: str,
    name: str,
    recipe_file: str = "mergekit_config.yml",
    *,
    found_by: str = "",
    base_models: list[str] | None = None,
    extra: str = "",
    seed: int | None = None,
) -> str:
    """The README.md text for a model built from `stages` (a single recipe is one stage).

    `found_by` (a sentence on how the recipe was found) and `extra` (markdown sections after the
    recipe) are what a search adds; `base_models` names the models merged (default: the recipe's source
    names); `seed` goes into the rebuild command (DARE and random gates draw from it).

    The metadata's `base_model` lists only hub ids, as the Hub reads it (left out when there is none);
    a model without one is named in the text instead.
    """
    stage_names = {s.name for s in stages if s.name}
    sources = [n for s in stages for n in s.referenced_models() if n not in stage_names]
    models = list(dict.fromkeys(base_models if base_models is not None else sources))
    unlisted = not_on_the_hub(models)
    metadata = {"base_model": [n for n in models if n not in unlisted]} if len(unlisted) < len(models) else {}
    front = yaml.safe_dump(
        {**metadata, "library_name": "transformers", "tags": ["merge", "mergekit", "mergesearch"]},
        sort_keys=False,
    )
    if len(stages) == 1:
        details = _describe(stages[0], stage_names)
    else:
        parts = [f"Built in {len(stages)} stages; each later stage may use an earlier one by its `name`."]
        for i, stage in enumerate(stages):
            title = stage.name or "final"
            parts.append(f"#### Stage {i + 1}: {title}\n\n{_describe(stage, stage_names)}")
        details = "\n\n".join(parts)
    if unlisted:
        details += ("\n\nNot on the Hugging Face Hub under these names, so not in the card's `base_model`: "
                    + ", ".join(f"`{n}`" for n in unlisted) + ".")
    found_by = f" {found_by.strip()}" if found_by else ""
    extra = f"\n{extra.strip()}\n" if extra else ""
    return f"""---
{front.rstrip()}
# license: fill in before publishing; the licenses of the merged models apply
---
# {name}

This is a merge of pre-trained language models made with [mergesearch]({MERGESEARCH_URL}),
which builds a [mergekit](https://github.com/arcee-ai/mergekit) recipe exactly as mergekit 0.1.5 does.{found_by}

## Merge details

{details}

## Recipe

The following mergekit configuration produced this model:

```yaml
{recipe_text.rstrip()}
```

Rebuild it with mergekit (model names as written above):

```sh
{_rebuild_command(stages, recipe_file, seed)}
```
{extra}"""
