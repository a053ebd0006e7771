"""mergekit 0.1.5's architecture definitions, read from the JSON files it installs.

mergekit plans every merge from one definition per architecture
(`mergekit/_data/architectures/*.json`): the weights before the layers, a
template per layer, the weights after, and the config key that counts the layers.
We plan from the same files, so an architecture mergekit knows we know too. Only
the data is read: importing mergekit runs its merge machinery, which the engine
neither needs nor may use.

Which definition a model gets, as mergekit 0.1.5 picks it (its
`arch_info_for_config`): the definitions that list config.json's one
`architectures` entry; of several, the one whose model_type is the config's.

Which ones mergesearch builds: single-module definitions (a decoder-only language
model; the multi-module ones are vision-language and encoder-decoder models)
that mergekit plans from the file itself, for an architecture that transformers 5
builds as a causal language model (a candidate is scored by running it). Every
other definition is refused with its reason (`refusal`); docs/architectures.md
lists both (`architecture_table`).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from search.engine.architectures import Architecture, WeightSpec
from search.engine.errors import UserError

# mergekit 0.1.5 plans these from Python code (expert lists that depend on the config), not from
# their JSON definition, so the file does not say what mergekit writes.
PLANNED_IN_CODE = ("AfmoeForCausalLM", "Glm4MoeForCausalLM")

# Definitions that require tensors transformers 5 no longer saves: mergekit fails on every
# checkpoint transformers 5 writes (checked in tests/test_architectures.py).
STALE = {
    "GPTNeoXForCausalLM": "its definition requires the buffers attention.bias, attention.masked_bias and "
    "attention.rotary_emb.inv_freq, which transformers 5 does not save; mergekit 0.1.5 fails on such checkpoints too",
}


@dataclass(frozen=True)
class Definition:
    file: str  # e.g. qwen3.json
    model_type: str
    architectures: tuple[str, ...]
    arch: Architecture | None  # None for a multi-module definition


def definitions_folder() -> Path:
    """Where mergekit installed its definitions, found without importing mergekit."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mergekit is not installed; install mergesearch's dependencies (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / "_data" / "architectures"


def _weight(entry: dict) -> WeightSpec:
    return WeightSpec(
        name=entry["name"],
        optional=bool(entry.get("optional", False)),
        aliases=tuple(entry.get("aliases") or ()),
        tied_names=tuple(entry.get("tied_names") or ()),
        vocabulary_axis=entry.get("vocabulary_axis"),
    )


def parse_definition(file: str, data: dict) -> Definition:
    """One definition file's contents."""
    architectures = tuple(data["architectures"])
    if data.get("kind", "module") != "module":
        return Definition(file, data["model_type"], architectures, None)
    arch = Architecture(
        name=data["model_type"],
        hf_architectures=architectures,
        pre=tuple(map(_weight, data["pre_weights"])),
        layer=tuple(map(_weight, data["layer_templates"]["weights"])),
        post=tuple(map(_weight, data["post_weights"])),
        num_layers_key=data.get("num_layers_config_key") or "num_hidden_layers",
        definition=file,
    )
    return Definition(file, data["model_type"], architectures, arch)


@lru_cache(maxsize=1)
def definitions() -> tuple[Definition, ...]:
    folder = definitions_folder()
    return tuple(parse_definition(f.name, json.loads(f.read_text())) for f in sorted(folder.glob("*.json")))


def definition_for(config: dict) -> Definition | None:
    """The definition mergekit picks for this config (exactly one `architectures` entry), or None."""
    name = config["architectures"][0]
    candidates = [d for d in definitions() if name in d.architectures]
    if len(candidates) == 1:
        return candidates[0]
    return next((d for d in candidates if d.model_type == config.get("model_type")), None)


def definition_named(architecture: str) -> Architecture:
    """The (single-module) definition of a config.json `architectures` value, as mergekit-moe looks
    one up for the layout it writes (Mistral's for a Mixtral, Qwen3's for a Qwen3-MoE)."""
    return next(d.arch for d in definitions() if architecture in d.architectures and d.arch is not None)


def definition_refusal(d: Definition) -> str | None:
    """Why mergesearch does not build this definition, from the file alone; None when nothing in it stops it."""
    if d.arch is None:
        return "a multi-module model (vision-language or encoder-decoder); mergesearch merges decoder-only language models"
    if any(a in PLANNED_IN_CODE for a in d.architectures):
        return "mergekit 0.1.5 plans it in Python code, not from this definition"
    if all(a.startswith("_") for a in d.architectures):
        return "a partial definition mergekit uses inside another"
    return next((STALE[a] for a in d.architectures if a in STALE), None)


@lru_cache(maxsize=1)
def _transformers_classes() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(model types, model class names, causal-LM class names) that transformers builds without remote code."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    def names(mapping: dict) -> set[str]:
        return {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}

    every = set()
    for attr in dir(modeling_auto):
        if attr.endswith("_MAPPING_NAMES"):
            every |= names(getattr(modeling_auto, attr))
    causal = names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return frozenset(CONFIG_MAPPING_NAMES), frozenset(every), frozenset(causal)


def refusal(d: Definition) -> str | None:
    """Why mergesearch does not build this definition; None when it does."""
    reason = definition_refusal(d)
    if reason:
        return reason
    model_types, classes, causal = _transformers_classes()
    if d.model_type not in model_types:
        return f"transformers 5 has no model_type {d.model_type}: its models need remote code"
    if not any(a in classes for a in d.architectures):
        return f"transformers 5 has no class {' or '.join(d.architectures)}: its models need remote code"
    if not any(a in causal for a in d.architectures):
        return "not a causal language model (mergesearch scores candidates as causal language models)"
    return None


def supported_names() -> list[str]:
    """Every config.json `architectures` value mergesearch builds."""
    return sorted(a for d in definitions() if refusal(d) is None for a in d.architectures)


def _unsupported(where: str, name: str, why: str) -> UserError:
    return UserError(f"{where}: architecture {name} is not supported ({why}); use a model of one of: {', '.join(supported_names())}")


def find_definition(config: dict, where: str = "model") -> Architecture:
    """The architecture a config.json describes, by mergekit's definitions alone (no transformers).
    UserError for a config without one architecture, or one no usable definition covers."""
    names = config.get("architectures") or []
    if len(names) != 1:
        raise UserError(f"{where}: config.json must name exactly one architecture (got {names}); fix its `architectures`")
    d = definition_for(config)
    if d is None:
        raise _unsupported(where, names[0], "mergekit 0.1.5 has no definition of it")
    reason = definition_refusal(d)
    if reason:
        raise _unsupported(where, names[0], reason)
    return d.arch


def architecture_of(config: dict, where: str = "model") -> Architecture:
    """The architecture a config.json describes; UserError for one mergesearch does not build."""
    arch = find_definition(config, where)
    reason = refusal(definition_for(config))
    if reason:
        raise _unsupported(where, config["architectures"][0], reason)
    return arch
