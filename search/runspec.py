"""The run spec: one YAML file that says what to search, how, and with what budget.

It is validated completely before any work starts (no Ray, no models loaded):
a mistake is one line naming the field and the fix, raised as `UserError`.
Relative paths resolve against the spec file's folder; outputs go to
`<spec folder>/<name>/` (so `runs/demo.yaml` writes `runs/demo/`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from search.engine import recipe as recipes
from search.engine.errors import UserError

PRUNERS = ("paired", "successive_halving", "hyperband", "median", "none")
SAMPLERS = ("tpe", "cmaes", "gp", "nsga2", "random", "qmc")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    models: dict[str, str] = Field(min_length=1)
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
    workers: int = Field(default=1, ge=1)
    storage: Optional[str] = None
    seed: int = 0
    heldout_top_k: int = Field(default=3, ge=0)
    enqueue: list[str] = []
    allow_pickle: bool = False

    # Set by load_spec, never read from the file.
    _spec_path: Optional[Path] = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a usable folder name; use letters, digits, '.', '_' or '-'")
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
            raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)} or a dotted class path")
        if "." in name:
            module, _, attr = name.rpartition(".")
            try:
                getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise ValueError(f"cannot import {name!r}; check the dotted path") from None
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
    def sampler_name(self) -> str:
        return self.sampler["name"] if isinstance(self.sampler, dict) else self.sampler

    @property
    def sampler_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.sampler.items() if k != "name"} if isinstance(self.sampler, dict) else {}

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its --resume: the models, space and objectives."""
        return {"models": self.models, "space": self.space, "objectives": self.objectives}


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


def _resolve_model(alias: str, value: str, base_dir: Path) -> str:
    """A local folder (relative to the spec) or a hub name already in the local HF cache."""
    local = (base_dir / value).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"models.{alias}: {value!r} has no config.json; point it at a Hugging Face model folder")
        return str(local.resolve())
    if not value.startswith((".", "/", "~")) and value.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(value, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
    raise UserError(
        f"models.{alias}: no model folder at {value!r} (relative to {base_dir}); "
        "fix the path or download the model first"
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
    try:
        spec.models = {alias: _resolve_model(alias, path, base) for alias, path in spec.models.items()}
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    resolved = []
    for i, path in enumerate(spec.enqueue):
        p = (base / path).expanduser()
        if not p.is_file():
            raise UserError(f"{where}: enqueue[{i}]: no recipe file {path!r} (relative to {base}); fix the path")
        try:
            recipes.load(p)
        except recipes.RecipeError as e:
            raise UserError(f"{where}: enqueue[{i}]: {e}") from None
        resolved.append(str(p.resolve()))
    spec.enqueue = resolved
    return spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> RunSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such run spec; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{at}: {getattr(e, 'problem', e)}; fix the syntax") from None
    return parse_spec(data, path, overrides)
