"""Slerp curves: one t-curve per tensor filter between two models (as phigment6, zephyr-gemma).

    space:
      kind: slerp
      models: [a, b]            # exactly two, same family, depth and width
      base: a                   # t = 0 gives this model (default: the first)
      filters: [self_attn, mlp] # one curve per filter, first match wins; then one for the rest
      anchors: 5                # anchors per curve (default 5, or one per layer in a shallower
                                #   model): a number, per_layer (one t per layer), or per
                                #   filter: {self_attn: 5, mlp: 5, rest: 1}
      t: [0, 1]                 # range of every anchor (a number fixes them all)
      form: models              # models | slices (one slice over all layers, as phigment6)
      dtype: bfloat16           # also out_dtype, tokenizer_source, max_layers, max_params

A curve of k anchors is mergekit's gradient list: anchor j sits at depth j/(k-1) and
layers in between interpolate; one anchor is written as a plain number. With
k = the number of layers each layer gets its own t. Params: `t.<filter>.<j>`,
`t.rest.<j>`.

Default (the run's baseline): slerp halfway, t = 0.5 on every tensor.
"""

from __future__ import annotations

from search.engine.errors import UserError, short
from search.engine.method_params import param_spec
from search.engine.parameters import resolve
from search.engine.same_merge import same_merge
from search.engine.recipe import Conditional, InputModel, InputSlice, MergeRecipe, OutputSlice

from .base import ReplayTrial, Space, listed, single
from .spec import NotInSpace, SpecReader

REST = "rest"
DEFAULT_ANCHORS = 5


class SlerpSpace(Space):
    kind = "slerp"

    def read(self, spec: SpecReader) -> None:
        self.pair = spec.model_list("models", min_count=2, max_count=2)
        self.base = spec.model("base", self.pair[0])
        if self.base not in self.pair:
            spec.fail("base", f"{short(self.base)} must be one of models {self.pair} (slerp starts from one of the two)")
        self.check_same_shape(spec, listed("models", self.pair))
        self.used_models = list(self.pair)
        self.num_layers = self.models[self.pair[0]].num_layers

        filters = spec.take("filters", ["self_attn", "mlp"])
        if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
            spec.fail("filters", f"expected a list of tensor-name substrings like [self_attn, mlp], got {short(filters)}")
        if REST in filters or len(set(filters)) != len(filters):
            spec.fail("filters", f"must be distinct and not {REST!r} (the rest always gets its own curve)")
        self.filters = list(filters)
        self.anchors = self._read_anchors(spec)
        self.t = spec.float_knob("t", [0.0, 1.0], bounds=(0.0, 1.0))
        self.form = spec.string("form", "models")
        if self.form not in ("models", "slices"):
            spec.fail("form", f"{short(self.form)} is not models or slices")
        self.read_output_options(spec)

    def _read_anchors(self, spec: SpecReader) -> dict[str, int]:
        def count(value, where: str) -> int:
            if value == "per_layer":
                return self.num_layers
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.num_layers:
                spec.fail(where, f"expected per_layer or a count in [1, {self.num_layers}], got {short(value)}")
            return value

        default = min(DEFAULT_ANCHORS, self.num_layers)  # a model of fewer layers gets one anchor per layer
        value = spec.take("anchors", default)
        curves = self.filters + [REST]
        if isinstance(value, dict):
            for key in value:
                if key not in curves:
                    spec.fail(f"anchors.{key}", f"not a curve of this space; use one of {curves}")
            return {c: count(value.get(c, default), f"anchors.{c}") for c in curves}
        return {c: count(value, "anchors") for c in curves}

    def output_info(self):
        return self.models[self.base]

    def defaults(self) -> dict[str, MergeRecipe]:
        """Slerp halfway, t = 0.5 on every tensor."""
        return {"slerp t=0.5": MergeRecipe(
            merge_method="slerp", base_model=self.base, parameters={"t": 0.5},
            models=[InputModel(model=m) for m in self.pair], **self.output_options())}

    def build(self, trial) -> MergeRecipe:
        t = []
        for curve in self.filters + [REST]:
            values = [self.t.suggest(trial, f"t.{curve}.{j}") for j in range(self.anchors[curve])]
            value = values[0] if len(values) == 1 else values
            t.append(Conditional(filter=None if curve == REST else curve, value=value))
        if self.form == "slices":
            sources = [InputSlice(model=m, layer_range=(0, self.num_layers)) for m in self.pair]
            inputs = dict(slices=[OutputSlice(sources=sources)])
        else:
            inputs = dict(models=[InputModel(model=m) for m in self.pair])
        return MergeRecipe(
            merge_method="slerp", base_model=self.base, parameters={"t": t}, **inputs, **self.output_options()
        )

    def propose_params(self, recipe) -> list[dict]:
        recipe = single(recipe)
        if not isinstance(recipe, MergeRecipe) or recipe.merge_method != "slerp":
            raise NotInSpace(f"merge_method is {short(getattr(recipe, 'merge_method', 'moe'))}, not slerp")
        try:
            return [self._as_written(recipe)]
        except NotInSpace as e:
            as_written = e
        # another spelling (`t: 0.5`, a curve as one number, one curve for all): the anchors read off it
        read = self._read_off(recipe)
        if not same_merge(self.build(ReplayTrial(read)), recipe, self.depth):
            raise as_written  # no point builds it: say where it parts from the space's own form
        return [read]

    def _as_written(self, recipe: MergeRecipe) -> dict:
        """The anchors of a recipe written as this space writes its own: one filter entry per curve."""
        t = (recipe.parameters or {}).get("t")
        curves = self.filters + [REST]
        if not isinstance(t, list) or len(t) != len(curves) or not all(isinstance(c, Conditional) for c in t):
            raise NotInSpace(f"parameters.t must be a filter list for {self.filters} and the rest")
        params: dict = {}
        for curve, cond in zip(curves, t):
            if cond.filter != (None if curve == REST else curve):
                raise NotInSpace(f"parameters.t has filter {short(cond.filter)} where the space has {curve!r}")
            values = cond.value if isinstance(cond.value, list) else [cond.value]
            if len(values) != self.anchors[curve]:
                raise NotInSpace(f"the {curve} curve has {len(values)} anchors; the space has {self.anchors[curve]}")
            for j, v in enumerate(values):
                self.t.put(params, f"t.{curve}.{j}", v)
        return params

    def _read_off(self, recipe: MergeRecipe) -> dict:
        """Each curve's anchors read off the recipe's t where the anchor sits, on a tensor of that curve's filter
        (the rest: on one no filter names)."""
        levels = [recipe.slices[0].parameters if recipe.slices else None, recipe.parameters]
        params: dict = {}
        for curve in self.filters + [REST]:
            k = self.anchors[curve]
            for j in range(k):
                try:
                    value = resolve(param_spec("slerp", "t"), levels, "" if curve == REST else curve, j / max(1, k - 1))
                except UserError as e:
                    raise NotInSpace(str(e)) from None
                self.t.put(params, f"t.{curve}.{j}", value)
        return params
