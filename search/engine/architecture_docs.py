"""docs/architectures.md, generated from mergekit 0.1.5's definitions and the MoE layouts.

    python -m search.engine.architecture_docs > docs/architectures.md

tests/test_architectures.py keeps the page equal to what this prints, so the list of
supported architectures cannot drift from what the engine accepts.
"""

from __future__ import annotations

from search.engine.architectures import Architecture, config_value
from search.engine.hf_config import hf_config
from search.engine.mergekit_definitions import definitions, refusal
from search.engine.moe import LAYOUT_MODEL_TYPES
from search.engine.plan import depth_change_refusal

# What a checkpoint must hold beyond its architecture's defaults: the definition requires tensors
# that only one form of the architecture has, and mergekit (like mergesearch) fails on the others.
CHECKPOINT_NOTES = {
    "CohereForCausalLM": "only checkpoints with q/k norms (`use_qk_norm: true`, Command R+): the definition requires them",
    "FalconForCausalLM": "only the new decoder layout (`new_decoder_architecture: true`, Falcon-40B/180B): "
    "the definition requires `ln_attn`/`ln_mlp`, which Falcon-7B lacks",
}

MOE_NOTES = {
    "Mixtral": ("MixtralForCausalLM", "none", "yes"),
    "DeepSeek MoE": ("DeepseekForCausalLM", "at most one, without prompts (not gated)",
                     "no: its config names remote code (deepseek-ai/deepseek-moe-16b-base) that transformers 5 lacks"),
    "Qwen MoE": ("Qwen2MoeForCausalLM", "exactly one, with prompts unless gate_mode is random", "yes"),
    "Qwen3 MoE": ("Qwen3MoeForCausalLM", "none", "yes"),
}  # fmt: skip


def fixed_depth(arch: Architecture) -> bool:
    """Whether mergekit 0.1.5 cannot write transformers 5's default config of this architecture at another depth."""
    config = hf_config({"model_type": arch.name}).to_dict()
    return depth_change_refusal(config, arch.num_layers_key, config_value(config, arch.num_layers_key) + 1) is not None


def architectures_markdown() -> str:
    supported, refused = [], []
    for d in definitions():
        why = refusal(d)
        if why is None:
            supported.append(d)
        else:
            refused.append((d, why))
    lines = [
        "# Architectures",
        "",
        "Generated from mergekit 0.1.5's architecture definitions (`mergekit/_data/architectures/*.json`) by",
        "`python -m search.engine.architecture_docs > docs/architectures.md`; a test keeps this page",
        "equal to its output. mergesearch plans every merge from these definitions, as mergekit does, and",
        "tests each supported architecture bit-exact against mergekit 0.1.5 (slerp, TIES, a passthrough",
        "stack) on a tiny stand-in (`tests/test_architectures.py`).",
        "",
        "## Supported",
        "",
        "config.json `architectures` value, its `model_type`, the definition file, and the config key that",
        "counts the layers. *Fixed depth*: transformers 5's config lists something per layer (`layer_types`),",
        "which mergekit 0.1.5 cannot re-count, so stacks that change the depth (passthrough slices, depth",
        "up-scaling, block expansion) are refused for it; merges of equal depth work.",
        "",
        "| architecture | model_type | definition | layers | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in sorted(supported, key=lambda d: d.architectures[0].lower()):
        for name in d.architectures:
            notes = [CHECKPOINT_NOTES[name]] if name in CHECKPOINT_NOTES else []
            if fixed_depth(d.arch):
                notes.insert(0, "fixed depth")
            lines.append(f"| {name} | {d.model_type} | {d.file} | `{d.arch.num_layers_key}` | {'; '.join(notes)} |")
    lines += [
        "",
        "## MoE outputs (mergekit-moe)",
        "",
        "The layouts mergekit-moe 0.1.5 writes, picked as it picks them: of those the recipe's",
        "`architecture:` names (all when absent) that fit the models, Mixtral if it fits, else the first",
        "in this order. Every model of a MoE (base, experts, shared experts) is of one model_type.",
        "",
        "| layout | writes | from models of type | shared experts | live model (searchable) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layout, types in LAYOUT_MODEL_TYPES.items():
        writes, shared, live = MOE_NOTES[layout]
        lines.append(f"| {layout} | {writes} | {', '.join(types)} | {shared} | {live} |")
    lines += [
        "",
        "## Not supported",
        "",
        "Definitions mergekit 0.1.5 ships that mergesearch refuses, with the reason; a model of one of",
        "these (or of an architecture without a definition) is refused in one line naming it.",
        "",
        "| architecture | definition | why |",
        "| --- | --- | --- |",
    ]
    for d, why in sorted(refused, key=lambda r: r[0].architectures[0].lower()):
        lines.append(f"| {', '.join(d.architectures)} | {d.file} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(architectures_markdown(), end="")
