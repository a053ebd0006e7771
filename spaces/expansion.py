"""Expansion counts: LLaMA Pro block expansion, new blocks copied in among a model's layers.

    space:
      kind: expansion
      model: a                  # the model to expand
      placement: [end, every]   # end | every | after, or a list to search
      count: [1, 8]             # end / after: how many new blocks (default [1, n/4]; at most 4n)
      every: [2, 8]             # every: a new block after every k-th layer (LLaMA Pro: 4)
      copy: previous            # each new block copies the layer it follows; or [0, d] to
                                #   search how many layers further back each copy reaches
      scale: 0.0                # scale of the new blocks' residual outputs (o_proj and down_proj;
                                #   dense and fc2 for phi); 0 makes each new block an identity
      dtype: bfloat16           # also out_dtype, tokenizer_source, max_layers, max_params

`end` appends the blocks after the last layer, `every` puts one after layers
k-1, 2k-1, ..., and `after` searches each block's position (after layer i).
The recipe is a passthrough stack in the seeds' shape: runs of original layers
as plain slices, each new block a one-layer slice with `scale` filters
[{filter: o_proj, value: s}, {filter: down_proj, value: s}, {value: 1.0}].
Params: `placement`, `count` or `every`, `after.<j>`, `copy.<j>`, `scale`.

Default (the run's baseline): the model as it is, unexpanded.
"""

from __future__ import annotations

from search.engine.errors import short
from search.engine.recipe import Conditional, InputSlice, MergeRecipe, OutputSlice

from .base import Space, model_alone, single
from .spec import IntKnob, NotInSpace, SpecReader

PLACEMENTS = ("end", "every", "after")


class ExpansionSpace(Space):
    kind = "expansion"

    def read(self, spec: SpecReader) -> None:
        self.model = spec.model("model")
        info = self.models[self.model]
        if info.residual_outputs is None:
            spec.fail("model", f"{short(self.model)} is a {info.model_type} model, whose output projections are unknown; "
                      "expand a llama, mistral, qwen2, gemma or phi model")
        self.check_depth_can_change(spec, [("model", self.model)])
        self.residual_outputs = info.residual_outputs
        self.used_models = [self.model]
        n = self.n = info.num_layers

        self.placement = spec.choice_knob("placement", PLACEMENTS, "end")
        placements = set(self.placement.choices)
        for key, users in (("count", {"end", "after"}), ("every", {"every"})):
            if spec.has(key) and not placements & users:
                spec.fail(key, f"only used by placement {' or '.join(sorted(users))}; remove it")
        # bounded, so that a typo (count: [1, 1000000]) is refused rather than sampled for hours
        self.count = spec.int_knob("count", [1, max(1, n // 4)], bounds=(1, 4 * n))
        self.every = spec.int_knob("every", [min(2, n), n], bounds=(1, n))
        self.after = IntKnob(0, n - 1)
        if spec.data.get("copy", "previous") == "previous":
            spec.take("copy", None)
            self.copy_back = None
        else:
            self.copy_back = spec.int_knob("copy", None, bounds=(0, n - 1))
        self.scale = spec.float_knob("scale", 0.0)
        self.read_output_options(spec)

    def defaults(self) -> dict[str, MergeRecipe]:
        """The model as it is: what an expansion has to beat."""
        return {f"{self.model} alone": model_alone(self.model, self.n, **self.output_options())}

    def output_info(self):
        info = self.models[self.model]
        if self.placement.fixed and self.placement.choices[0] in ("end", "after") and self.count.fixed:
            return info.with_layers(self.n + self.count.low)
        if self.placement.choices == ("every",) and self.every.fixed:
            return info.with_layers(self.n + self.n // self.every.low)
        return None

    def positions(self, trial, placement: str) -> list[int]:
        """After which original layer each new block goes, in order."""
        if placement == "end":
            return [self.n - 1] * self.count.suggest(trial, "count")
        if placement == "every":
            k = self.every.suggest(trial, "every")
            return [i for i in range(self.n) if (i + 1) % k == 0]
        count = self.count.suggest(trial, "count")
        return sorted(self.after.suggest(trial, f"after.{j}") for j in range(count))

    def build(self, trial) -> MergeRecipe:
        placement = self.placement.suggest(trial, "placement")
        positions = self.positions(trial, placement)
        scale = self.scale.suggest(trial, "scale")
        attn_out, mlp_out = self.residual_outputs
        new_block = {
            "scale": [
                Conditional(filter=attn_out, value=scale),
                Conditional(filter=mlp_out, value=scale),
                Conditional(value=1.0),
            ]
        }

        def plain(start: int, end: int) -> OutputSlice:
            return OutputSlice(sources=[InputSlice(model=self.model, layer_range=(start, end))])

        slices, done = [], 0  # `done`: original layers stacked so far
        for j, after in enumerate(positions):
            if after + 1 > done:
                slices.append(plain(done, after + 1))
                done = after + 1
            back = 0 if self.copy_back is None else self.copy_back.suggest(trial, f"copy.{j}")
            source = max(0, after - back)
            slices.append(
                OutputSlice(
                    sources=[InputSlice(model=self.model, layer_range=(source, source + 1), parameters=new_block)]
                )
            )
        if done < self.n:
            slices.append(plain(done, self.n))
        return MergeRecipe(merge_method="passthrough", slices=slices, **self.output_options())

    def propose_params(self, recipe) -> list[dict]:
        recipe = single(recipe)
        if not isinstance(recipe, MergeRecipe) or recipe.merge_method != "passthrough" or not recipe.slices:
            raise NotInSpace("a block expansion is a passthrough recipe with slices")
        positions, backs, scales, done = [], [], [], 0
        for i, s in enumerate(recipe.slices):
            if len(s.sources) != 1 or s.sources[0].model != self.model:
                raise NotInSpace(f"slices[{i}] is not one slice of {short(self.model)}")
            src = s.sources[0]
            start, end = src.layer_range
            scale = (src.parameters or {}).get("scale")
            if scale is None:
                if start != done:
                    raise NotInSpace(f"slices[{i}] starts at layer {start}; the original layers resume at {done}")
                done = end
                continue
            if done == 0 or end - start != 1:
                raise NotInSpace(f"slices[{i}] is a new block that is not one layer after an original one")
            positions.append(done - 1)
            backs.append(done - 1 - start)
            first = scale[0] if isinstance(scale, list) and scale else None
            scales.append(first.value if isinstance(first, Conditional) else scale)
        if done != self.n:
            raise NotInSpace(f"the original layers stop at {done}; the model has {self.n}")

        common: dict = {}
        if scales:
            self.scale.put(common, "scale", scales[0])
        if self.copy_back is not None:
            for j, (back, after) in enumerate(zip(backs, positions)):
                if back == after:  # a copy of layer 0: any reach of `after` or more stops there
                    back = max(back, self.copy_back.low)
                self.copy_back.put(common, f"copy.{j}", back)

        candidates, reasons = [], []
        for placement in self.placement.choices:
            params = dict(common)
            try:
                self.placement.put(params, "placement", placement)
                if placement == "end":
                    self.count.put(params, "count", len(positions))
                elif placement == "every":
                    self.every.put(params, "every", positions[0] + 1 if positions else self.every.high)
                else:
                    self.count.put(params, "count", len(positions))
                    for j, after in enumerate(positions):
                        self.after.put(params, f"after.{j}", after)
            except NotInSpace as e:
                reasons.append(str(e))
                continue
            candidates.append(params)
        if not candidates:
            raise NotInSpace(reasons[0])
        return candidates
