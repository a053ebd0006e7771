"""The run spec: one YAML file that says what to search, how, and with what budget.

It is validated completely before any work starts (no Ray, no models loaded):
a mistake is one line naming the field and the fix, raised as `UserError`.
Relative paths resolve against the spec file's folder; outputs go to
`<spec folder>/<name>/` (so `runs/demo.yaml` writes `runs/demo/`).

Models: `models: {alias: where}` names each model the space refers to by its alias.
`where` is a local folder, or a hub id (`org/model`) found in the local Hugging Face
cache (never downloaded); `{path: where, name: org/model}` also gives the public name
a local folder is published under. Everything the run hands out (best.yaml, export,
the report, a model card) names each model by its public name: the given name, else
the hub id, else the alias; `spec.models` holds the local folders the run reads.

`{path: where, lora: adapter}` is the model with a PEFT LoRA adapter merged in (a folder
or a cached hub id, as mergekit's `model+adapter`); its public name is `base+adapter`
(`name: org/base+org/adapter` gives both; by default the adapter's is its hub id, else
`<alias>-lora`). `spec.adapters` holds the adapters' folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from search.engine import recipe as recipes
from search.engine import safe_yaml
from search.engine.errors import UserError, short

PRUNERS = ("paired", "successive_halving", "hyperband", "median", "none")
SAMPLERS = ("tpe", "cmaes", "gp", "nsga2", "random", "qmc")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # at most 100: file systems refuse long names
# A hub id as the Hugging Face hub spells them (`org/model`); also the form of a given public name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # alias -> a folder or hub id, or {path: <folder or hub id>, name: <public name>}; after load_spec, the folder
    models: dict[str, Union[str, dict[str, Any]]] = Field(min_length=1)
    space: dict[str, Any]
    objectives: list[dict[str, Any]] = Field(min_length=1)
    # successive halving by default, as it works with any objective (paired needs lmeval's per-example
    # results); the median pruner compares only with completed trials, which TPE soon beats, so it
    # stops few (BENCHMARKS.md, "Search: pruning")
    pruner: Literal[PRUNERS] = "successive_halving"
    # a name from SAMPLERS, a dotted path to a sampler class, or {name: ..., <constructor options>}
    sampler: Union[str, dict[str, Any]] = "tpe"
    trials: Optional[int] = Field(default=None, ge=1)
    timeout: Optional[float] = Field(default=None, gt=0)
    # seconds one trial (all its stages, from being sent to its worker) or one held-out re-score may take
    # before the worker is replaced and the trial failed; no default, as a trial's time grows with the
    # model and the eval (README, `mergesearch run`)
    trial_timeout: Optional[float] = Field(default=None, gt=0)
    workers: int = Field(default=1, ge=1, le=4096)  # one Ray actor each: more is a typo, not a cluster
    storage: Optional[str] = None
    seed: int = Field(default=0, ge=0, lt=2**32)  # what numpy, and so every Optuna sampler, accepts
    heldout_top_k: int = Field(default=3, ge=0)
    enqueue: list[str] = []
    # scored before the search, outside the budget: true (all), false, or the names to keep
    baselines: Union[bool, list[str]] = True
    allow_pickle: bool = False

    # Set by load_spec, never read from the file.
    _spec_path: Optional[Path] = PrivateAttr(default=None)
    _model_names: dict[str, str] = PrivateAttr(default_factory=dict)
    _adapters: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{short(v)} is not a usable folder name; use up to 100 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("space")
    @classmethod
    def _space_kind(cls, v: dict) -> dict:
        if not isinstance(v.get("kind"), str):
            raise ValueError("needs a `kind:` (slerp, weights, layout, expansion, moe, compose)")
        return v

    @field_validator("objectives", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("objectives")
    @classmethod
    def _objective_kinds(cls, v: list[dict]) -> list[dict]:
        for i, o in enumerate(v):
            if not isinstance(o.get("kind"), str):
                raise ValueError(f"objective [{i}] needs a `kind:` (lmeval, perplexity, custom, cost)")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler_known(cls, v: Union[str, dict]) -> Union[str, dict]:
        name = v.get("name") if isinstance(v, dict) else v
        if not isinstance(name, str):
            raise ValueError("a mapping needs `name:` (a sampler name or a dotted class path)")
        if name not in SAMPLERS and "." not in name:
            raise ValueError(f"unknown sampler {short(name)}; use one of {', '.join(SAMPLERS)} or a dotted class path")
        if "." in name:
            from search.study.samplers import sampler_class  # optuna only for a dotted path

            try:
                sampler_class(name)  # imports and checks the class; calls nothing
            except UserError as e:
                raise ValueError(str(e).removeprefix("sampler: ")) from None
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.trials is None and self.timeout is None:
            raise ValueError("give a budget: `trials:` and/or `timeout:` (seconds)")
        return self

    # ---- derived ---------------------------------------------------------

    @property
    def spec_path(self) -> Optional[Path]:
        return self._spec_path

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent if self.spec_path else Path.cwd()

    @property
    def run_dir(self) -> Path:
        return self.base_dir / self.name

    @property
    def model_names(self) -> dict[str, str]:
        """alias -> the public name exports write: the given name, the hub id, or the alias."""
        return self._model_names

    @property
    def adapters(self) -> dict[str, str]:
        """alias -> the folder of the LoRA adapter merged into that model (aliases with `lora:` only)."""
        return self._adapters

    @property
    def model_sources(self) -> dict[str, str]:
        """alias -> the model as mergekit names it locally: its folder, or `folder+adapter folder`."""
        return {a: f"{p}+{self._adapters[a]}" if a in self._adapters else p for a, p in self.models.items()}

    @property
    def sampler_name(self) -> str:
        return self.sampler["name"] if isinstance(self.sampler, dict) else self.sampler

    @property
    def sampler_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.sampler.items() if k != "name"} if isinstance(self.sampler, dict) else {}

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its --resume: the models, space and objectives."""
        return {"models": self.model_sources, "space": self.space, "objectives": self.objectives}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif first["type"] == "missing":
        msg = "required but missing; add it"
    loc = first["loc"]
    if loc and loc[-1] in ("str", "dict[str,any]") and len(loc) > 1:
        loc = loc[:-1]  # pydantic names the union branch it tried last; the user wants the field
    return f"{_where(loc)}: {msg}"


def _model_entry(alias: str, value: Any) -> tuple[str, Optional[str], Optional[str]]:
    """(where, given public name, adapter) of one `models:` entry: a string, or {path:, name:, lora:}."""
    if isinstance(value, str):
        return value, None, None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str) or set(value) - {"path", "name", "lora"}:
        raise UserError(f"models.{alias}: expected a folder or hub id, or {{path: ..., name: org/model}} (and `lora:` "
                        "for an adapter)")
    lora = value.get("lora")
    if lora is not None and not isinstance(lora, str):
        raise UserError(f"models.{alias}.lora: expected a PEFT adapter folder or hub id, got {short(lora)}")
    name = value.get("name")
    parts = name.split("+") if isinstance(name, str) and lora is not None else [name]
    if name is not None and not (len(parts) <= 2 and all(isinstance(p, str) and _MODEL_NAME.match(p) for p in parts)):
        raise UserError(f"models.{alias}.name: {short(name)} is not a model name; write it as the hub does, org/model"
                        + (" (or org/model+org/adapter)" if lora is not None else ""))
    return value["path"], name, lora


def _resolve_model(alias: str, value: str, base_dir: Path, marker: str = "config.json",
                   field: str = "") -> tuple[str, Optional[str]]:
    """(local folder, hub id or None): a folder relative to the spec, else a hub id in the local HF cache.
    marker: the file the folder must hold (config.json for a model, adapter_config.json for an adapter)."""
    at = f"models.{alias}{field}"
    noun = "model" if marker == "config.json" else "adapter"
    local = (base_dir / value).expanduser()
    try:
        is_folder = local.is_dir()
    except OSError:  # a name longer than the file system allows, say: there is no such folder
        is_folder = False
    if is_folder:
        if not (local / marker).is_file():
            kind = "a Hugging Face model folder" if noun == "model" else "a PEFT adapter folder"
            raise UserError(f"{at}: {short(value)} has no {marker}; point it at {kind}")
        return str(local.resolve()), None
    cached = _from_hub_cache(at, value, marker) if _HUB_ID.match(value) else None
    if cached is None:
        from huggingface_hub import constants

        raise UserError(
            f"{at}: no {noun} folder at {short(value)} (relative to {base_dir}) and no hub {noun} of that "
            f"name in the Hugging Face cache ({constants.HF_HUB_CACHE}); fix the path, or download the {noun} first"
        )
    return cached, value


def _from_hub_cache(at: str, repo_id: str, marker: str = "config.json") -> Optional[str]:
    """The cached snapshot folder of a hub model, None when it is not cached; the hub is never contacted."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (folder / marker).is_file() or not weights:
        raise UserError(
            f"{at}: the Hugging Face cache holds {repo_id} without its {marker} or weights ({folder}); "
            f"download it whole (hf download {repo_id})"
        )
    return str(folder)


def _resolve_models(spec: RunSpec) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(alias -> local folder, alias -> public name, alias -> adapter folder), public names checked to be distinct."""
    paths, names, adapters = {}, {}, {}
    for alias, value in spec.models.items():
        where, given, lora = _model_entry(alias, value)
        paths[alias], hub_id = _resolve_model(alias, where, spec.base_dir)
        names[alias] = given or hub_id or alias
        if lora is not None:
            adapters[alias], adapter_hub_id = _resolve_model(alias, lora, spec.base_dir, "adapter_config.json", ".lora")
            if given is None or "+" not in given:
                names[alias] = f"{names[alias]}+{adapter_hub_id or f'{alias}-lora'}"
        other = next((a for a in names if a != alias and names[a] == names[alias]), None)
        if other is not None:
            raise UserError(
                f"models.{alias}: its public name {names[alias]!r} is also that of models.{other}; "
                "give each model its own `name:`"
            )
    return paths, names, adapters


def _check_writable(run_dir: Path, where: str) -> None:
    """The run folder (or the folder it will be made in) must take writes: found now, not once Ray is up."""
    folder = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # a file in the way is reported later
        raise UserError(
            f"{where}: cannot write the run folder {run_dir} ({folder} is not writable); "
            "put the spec in a folder you may write to"
        )


def parse_spec(data: Any, spec_path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Validate a spec mapping; `overrides` (from the command line) replace keys before validation."""
    where = str(spec_path) if spec_path else "run spec"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of run spec keys (name, models, space, objectives, ...)")
    data = dict(data)
    data.setdefault("name", spec_path.stem if spec_path else None)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{where}: {_one_line(e)}") from None
    spec._spec_path = spec_path.resolve() if spec_path else None
    base = spec.base_dir
    _check_writable(spec.run_dir, where)
    try:
        spec.models, spec._model_names, spec._adapters = _resolve_models(spec)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    resolved = []
    for i, path in enumerate(spec.enqueue):
        p = (base / path).expanduser()
        if not p.is_file():
            raise UserError(f"{where}: enqueue[{i}]: no recipe file {short(path)} (relative to {base}); fix the path")
        try:
            recipes.load(p)
        except recipes.RecipeError as e:
            raise UserError(f"{where}: enqueue[{i}]: {e}") from None
        resolved.append(str(p.resolve()))
    spec.enqueue = resolved
    return spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> RunSpec:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a run spec; give the spec's YAML file")
    if not path.is_file():
        raise UserError(f"{path}: no such run spec; check the path")
    docs = safe_yaml.load_all(safe_yaml.read_text(path, str(path)), str(path))
    if len(docs) > 1:
        raise UserError(f"{path}: holds {len(docs)} YAML documents; a run spec is one (remove the `---`)")
    return parse_spec(docs[0] if docs else None, path, overrides)
