"""Composition: stages chained into one multi-document recipe that mergekit-multi runs.

    space:
      kind: compose
      stages:
        - name: blend           # later stages use the stage's output under this name
          kind: slerp
          models: [a, b]
        - kind: layout          # the last stage is the output (named only if you name it)
          mode: dus
          models: [blend]
          m: [4, 12]
      max_layers: 48            # constraints here apply to the final output;
      max_params: 1.5B          #   a stage may carry its own too

Each stage is any other space's spec but moe (mergekit-multi runs mergekit-yaml
configs only), plus `name:` (default `stage<i>`). A stage
can use an earlier stage's output only if every trial gives it the same shape (a
slerp or weights stage, or a layout / expansion with fixed counts), so later
stages know its depth. Params are the stages' params under `<stage name>.`, e.g.
`blend.t.mlp.2`, `stage2.m`.

Defaults (the run's baselines): every combination of the stages' defaults, chained.
"""

from __future__ import annotations

from search.engine.errors import UserError, short
from search.engine.recipe import as_stages

from .base import PrefixedTrial, Space
from .expansion import ExpansionSpace
from .layout import LayoutSpace
from .model_info import ModelInfo
from .slerp import SlerpSpace
from .spec import NotInSpace, SpecReader
from .weights import WeightsSpace

# what a stage may be: mergekit-multi reads every document as a mergekit-yaml config (no moe),
# and a stage is not itself a composition
STAGE_SPACES: dict[str, type[Space]] = {cls.kind: cls for cls in (SlerpSpace, WeightsSpace, LayoutSpace, ExpansionSpace)}


class ComposeSpace(Space):
    kind = "compose"

    def read(self, spec: SpecReader) -> None:
        stages = spec.take("stages")
        if not isinstance(stages, list) or len(stages) < 2:
            spec.fail("stages", "expected a list of at least two stage specs (each a space spec with a kind)")
        self.available = dict(self.models)  # the run's models, then each stage's output
        self.stages: list[tuple[str, Space]] = []
        named = set()
        for i, stage_spec in enumerate(stages):
            where = f"{spec.at('stages')}[{i}]"
            if not isinstance(stage_spec, dict):
                raise UserError(f"{where}: expected a space spec (a mapping with kind:)")
            stage_spec = dict(stage_spec)
            name = stage_spec.pop("name", None)
            if name is not None:
                if not isinstance(name, str) or not name or "." in name:
                    raise UserError(f"{where}.name: expected a name without dots, got {short(name)}")
                if name in self.available:
                    raise UserError(f"{where}.name: {short(name)} is already a model or stage name; pick another")
                named.add(i)
            name = name or f"stage{i + 1}"
            kind = stage_spec.get("kind")
            if kind == "compose":
                raise UserError(f"{where}.kind: a stage cannot itself be a composition; list its stages here")
            if kind == "moe":
                raise UserError(f"{where}.kind: mergekit-multi cannot run a moe stage; search the MoE on its own")
            if not isinstance(kind, str) or kind not in STAGE_SPACES:
                raise UserError(f"{where}.kind: {short(kind)} is not a stage space; use one of {', '.join(STAGE_SPACES)}")
            space = STAGE_SPACES[kind](stage_spec, self.available, where)
            self.stages.append((name, space))
            info = space.output_info()
            if info is not None:
                self.available[name] = info.with_layers(info.num_layers, name)
            else:
                self.available[name] = _Unfixed(name, space.kind)
        self.named_last = (len(stages) - 1) in named
        for name, space in self.stages:
            self.used_models += [m for m in space.used_models if m not in self.used_models]

    def output_info(self) -> ModelInfo | None:
        return self.stages[-1][1].output_info()

    def checked_models(self) -> dict[str, ModelInfo]:
        return getattr(self, "available", self.models)

    def build(self, trial) -> list:
        recipes = []
        last = len(self.stages) - 1
        for i, (name, space) in enumerate(self.stages):
            recipe = space.suggest(PrefixedTrial(trial, name))
            if i < last or self.named_last:
                recipe = recipe.model_copy(update={"name": name})
            recipes.append(recipe)
        return recipes

    def defaults(self) -> dict[str, list]:
        """Every combination of the stages' defaults, chained (a slerp at t = 0.5, then TIES, ...);
        none when a stage has no default."""
        combos: list[tuple[list[str], list]] = [([], [])]
        last = len(self.stages) - 1
        for i, (name, space) in enumerate(self.stages):
            named = i < last or self.named_last
            combos = [
                (labels + [f"{name}: {label}"], chain + [recipe.model_copy(update={"name": name}) if named else recipe])
                for labels, chain in combos
                for label, recipe in space.defaults().items()
            ]
        return {", then ".join(labels): chain for labels, chain in combos}

    def propose_params(self, recipe) -> list[dict]:
        stages = as_stages(recipe)
        if len(stages) != len(self.stages):
            raise NotInSpace(f"it has {len(stages)} stages; the space has {len(self.stages)}")
        params: dict = {}
        for (name, space), stage in zip(self.stages, stages):
            try:
                inner = space.params(stage.model_copy(update={"name": None}))
            except UserError as e:
                raise NotInSpace(f"stage {name}: {e}") from None
            params.update({f"{name}.{k}": v for k, v in inner.items()})
        return [params]


class _Unfixed:
    """Stands in for a stage output whose shape varies by trial: a later stage naming it is refused."""

    def __init__(self, name: str, kind: str):
        self.name = name
        self.unusable_reason = (
            f"stage {short(name)} ({kind}) gives a different shape in each trial, so no later stage can build on it; "
            "fix its counts (m, width and stride, count, every) or make it the last stage"
        )
