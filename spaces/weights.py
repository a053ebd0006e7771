"""Weights and densities: linear / task arithmetic / TIES / DARE over N models.

    space:
      kind: weights
      method: ties              # or a list to search: [linear, task_arithmetic, ties, dare_ties, dare_linear]
      models: [a, b, c]         # the models whose weight (and density) are searched
      base: base                # required unless the only method is linear (linear ignores it)
      weight: [0, 1]            # range of every weight (a number fixes them)
      density: [0.1, 1]         # range of every density (ties, dare_ties, dare_linear)
      groups: 1                 # 1: one value per model (a `models:` recipe); G > 1 or per_layer:
                                #   one value per model per group of layers (Sakana's
                                #   parameter-space merge, a `slices:` recipe, one slice per group)
      normalize: [true, false]  # optional: true/false fixes it, a list searches it
      lambda: [0.5, 1.5]        # optional (not for linear): a number fixes it, a pair searches it
      dtype: bfloat16           # also out_dtype, tokenizer_source, max_layers, max_params

Groups split the layers evenly: group g covers [g*n//G, (g+1)*n//G). In a slices
recipe each slice lists the models (with their parameters) and then the base,
as mergekit itself expands a `models:` recipe. Params: `method`, `weight.<model>`,
`density.<model>` (with groups: `weight.<g>.<model>`), `normalize`, `lambda`.

Defaults (the run's baselines): the linear average of the models, and TIES at weight 1,
density 0.5 over the base.
"""

from __future__ import annotations

from search.engine.errors import short
from search.engine.method_params import param_spec
from search.engine.recipe import InputModel, InputSlice, MergeRecipe, OutputSlice

from .base import Space, listed, single
from .spec import NotInSpace, SpecReader

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
WITH_DENSITY = ("ties", "dare_ties", "dare_linear")


class WeightsSpace(Space):
    kind = "weights"

    def read(self, spec: SpecReader) -> None:
        self.method = spec.choice_knob("method", METHODS, "task_arithmetic")
        self.merged = spec.model_list("models", min_count=1)
        needs_base = any(m != "linear" for m in self.method.choices)
        if not spec.has("base") and needs_base:
            spec.fail("base", "required by task_arithmetic, ties and dare; name the model the others were tuned from")
        self.base = spec.model("base") if spec.has("base") else spec.take("base", None)
        if self.base in self.merged:
            spec.fail("base", f"{short(self.base)} is also in models; list it only as base")
        everyone = ([self.base] if self.base else []) + self.merged
        self.check_same_shape(spec, ([("base", self.base)] if self.base else []) + listed("models", self.merged))
        self.used_models = everyone
        self.num_layers = self.models[everyone[0]].num_layers

        self.weight = spec.float_knob("weight", [0.0, 1.0])
        self.density = spec.float_knob("density", [0.1, 1.0], bounds=(0.0, 1.0))
        groups = spec.take("groups", 1)
        if groups == "per_layer":
            groups = self.num_layers
        if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= self.num_layers:
            spec.fail("groups", f"expected per_layer or a count in [1, {self.num_layers}], got {short(groups)}")
        self.groups = groups
        self.normalize = spec.choice_knob("normalize", (True, False), None) if spec.has("normalize") else None
        self.lam = spec.float_knob("lambda", None) if spec.has("lambda") else None
        if self.lam is not None and self.method.choices == ("linear",):
            spec.fail("lambda", "linear has no lambda; remove it or search another method")
        self.read_output_options(spec)

    def output_info(self):
        return self.models[self.used_models[0]]

    def defaults(self) -> dict[str, MergeRecipe]:
        """The linear average of the models (weight 1 each, normalized) and, with a base, TIES at
        weight 1 and density 0.5 (mergekit's usual settings), whatever methods the space searches."""
        out = {"linear average": MergeRecipe(
            merge_method="linear", models=[InputModel(model=m, parameters={"weight": 1.0}) for m in self.merged],
            **self.output_options())}
        if self.base:
            out["ties w=1 d=0.5"] = MergeRecipe(
                merge_method="ties", base_model=self.base,
                models=[InputModel(model=m, parameters={"weight": 1.0, "density": 0.5}) for m in self.merged],
                **self.output_options())
        return out

    def group_range(self, g: int) -> tuple[int, int]:
        n, G = self.num_layers, self.groups
        return g * n // G, (g + 1) * n // G

    def _name(self, what: str, g: int, model: str) -> str:
        return f"{what}.{model}" if self.groups == 1 else f"{what}.{g}.{model}"

    def build(self, trial) -> MergeRecipe:
        method = self.method.suggest(trial, "method")

        def source_parameters(g: int, model: str) -> dict:
            p = {"weight": self.weight.suggest(trial, self._name("weight", g, model))}
            if method in WITH_DENSITY:
                p["density"] = self.density.suggest(trial, self._name("density", g, model))
            return p

        base = None if method == "linear" else self.base
        if self.groups == 1:
            inputs = dict(models=[InputModel(model=m, parameters=source_parameters(0, m)) for m in self.merged])
        else:
            slices = []
            for g in range(self.groups):
                layers = self.group_range(g)
                sources = [InputSlice(model=m, layer_range=layers, parameters=source_parameters(g, m)) for m in self.merged]
                if base:
                    sources.append(InputSlice(model=base, layer_range=layers))
                slices.append(OutputSlice(sources=sources))
            inputs = dict(slices=slices)

        shared = {}
        if self.normalize is not None:
            shared["normalize"] = self.normalize.suggest(trial, "normalize")
        if self.lam is not None and method != "linear":
            shared["lambda"] = self.lam.suggest(trial, "lambda")
        return MergeRecipe(
            merge_method=method, base_model=base, parameters=shared or None, **inputs, **self.output_options()
        )

    def propose_params(self, recipe) -> list[dict]:
        recipe = single(recipe)
        if not isinstance(recipe, MergeRecipe):
            raise NotInSpace("it is a MoE recipe")
        params: dict = {}
        method = recipe.merge_method
        self.method.put(params, "method", method)

        # (group, model) -> that source's parameters, from either input form
        found: dict[tuple[int, str], dict] = {}
        if recipe.models:  # one entry per model: the same in every group (mergekit reads it over all layers)
            found = {(g, m.model): m.parameters or {} for m in recipe.models for g in range(self.groups)}
        else:
            for g, s in enumerate(recipe.slices):
                found.update({(g, src.model): src.parameters or {} for src in s.sources})
        for g in range(self.groups):
            for m in self.merged:
                if (g, m) not in found:
                    raise NotInSpace(f"no parameters for model {short(m)}" + (f" in slice {g}" if self.groups > 1 else ""))
                p = found[(g, m)]
                self.weight.put(params, self._name("weight", g, m), p.get("weight"))
                if method in WITH_DENSITY:
                    self.density.put(params, self._name("density", g, m), p.get("density"))

        shared = recipe.parameters or {}

        def written_or_default(name: str):  # a parameter left out is the method's default, as mergekit reads it
            spec = param_spec(method, name)
            return shared.get(name, spec.default if spec is not None and not spec.required else None)

        if self.normalize is not None:
            self.normalize.put(params, "normalize", written_or_default("normalize"))
        if self.lam is not None and method != "linear":
            self.lam.put(params, "lambda", written_or_default("lambda"))
        return [params]
