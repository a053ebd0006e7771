"""Slice layouts: passthrough stacks of layers from one or more models.

    space:
      kind: layout
      mode: dus                 # dus | interleave | free
      models: [a]               # one or more models of one family and width
      dtype: bfloat16           # also out_dtype, tokenizer_source, max_layers, max_params

    # mode dus: depth up-scaling, as SOLAR: [0, n-m] of the first model + [m, n] of the last
      m: [1, 31]                # layers dropped at each seam (SOLAR: n = 32, m = 8); default [1, n-1]

    # mode interleave: overlapping windows, as Cerebrum: [0, w], [s, s+w], [2s, 2s+w], ...
      width: [2, 16]            # layers per slice (default [2, n/2])
      stride: [1, 16]           # from one slice's start to the next (default [1, width's high])
                                # slices alternate over the models; a last [n-w, n] closes the stack

    # mode free: any sequence of (model, start, end)
      slices: [1, 8]            # how many slices (at most 4x the deepest model's layers)
      length: [1, 32]           # layers per slice; a slice ends at the model's last layer at most
      max_layers: 48            # the bound on total layers (a constraint: longer stacks are pruned)

Params: dus `m`; interleave `width`, `stride`; free `slices`, then per slice i
`slice.<i>.model` (when several models), `slice.<i>.start`, `slice.<i>.length`.
With models of different depths, start and length are asked per model
(`slice.<i>.<model>.start`, ...), each in that model's own range.

Defaults (the run's baselines): each model as it is, all its layers in order.
"""

from __future__ import annotations

from search.engine.errors import short
from search.engine.recipe import InputSlice, MergeRecipe, OutputSlice

from .base import Space, listed, model_alone, single
from .spec import ChoiceKnob, IntKnob, NotInSpace, SpecReader

MODES = ("dus", "interleave", "free")


def interleave_ranges(n: int, width: int, stride: int) -> list[tuple[int, int]]:
    """[0, w], [s, s+w], ... while inside n layers; then [n-w, n] if the last layer is not yet covered."""
    ranges = []
    start = 0
    while start + width <= n:
        ranges.append((start, start + width))
        start += stride
    if ranges[-1][1] < n:
        ranges.append((n - width, n))
    return ranges


class LayoutSpace(Space):
    kind = "layout"

    def read(self, spec: SpecReader) -> None:
        self.mode = spec.string("mode")
        if self.mode not in MODES:
            spec.fail("mode", f"{short(self.mode)} is not one of {', '.join(MODES)}")
        self.sources = spec.model_list("models", min_count=1, max_count=2 if self.mode == "dus" else None)
        self.check_same_family(spec, listed("models", self.sources))
        self.check_depth_can_change(spec, listed("models", self.sources))
        self.used_models = list(self.sources)
        self.depth = {m: self.models[m].num_layers for m in self.sources}
        shallowest, deepest = min(self.depth.values()), max(self.depth.values())

        if self.mode == "dus":
            if shallowest < 2:
                spec.fail("models", "depth up-scaling needs models of at least 2 layers")
            self.m = spec.int_knob("m", [1, shallowest - 1], bounds=(1, shallowest - 1))
        elif self.mode == "interleave":
            if shallowest != deepest:
                spec.fail("models", f"interleaving needs models of one depth; these have {sorted(set(self.depth.values()))}")
            n = shallowest
            self.width = spec.int_knob("width", [min(2, n), max(min(2, n), n // 2)], bounds=(1, n))
            self.stride = spec.int_knob("stride", [1, self.width.high], bounds=(1, n))
        else:
            # bounded, so that a typo (slices: [1, 1000000]) is refused rather than sampled for hours
            self.count = spec.int_knob("slices", [1, 8], bounds=(1, max(8, 4 * deepest)))
            self.length = spec.int_knob("length", [1, deepest], bounds=(1, deepest))
            self.model_choice = ChoiceKnob(tuple(self.sources))
            self.per_model = shallowest != deepest
            self.start = {m: IntKnob(0, n - 1) for m, n in self.depth.items()}
            # a model shallower than the length range gets the range cut to its depth
            self.lengths = {
                m: IntKnob(min(self.length.low, n), min(self.length.high, n)) for m, n in self.depth.items()
            }
        self.read_output_options(spec)

    def defaults(self) -> dict[str, MergeRecipe]:
        """Each model as it is: what a layout has to beat."""
        return {f"{m} alone": model_alone(m, self.depth[m], **self.output_options()) for m in self.sources}

    def output_info(self):
        first = self.models[self.sources[0]]
        if self.mode == "dus" and self.m.fixed:
            a, b = self.sources[0], self.sources[-1]
            return first.with_layers(self.depth[a] + self.depth[b] - 2 * self.m.low)
        if self.mode == "interleave" and self.width.fixed and self.stride.fixed:
            ranges = interleave_ranges(self.depth[self.sources[0]], self.width.low, self.stride.low)
            return first.with_layers(sum(e - s for s, e in ranges))
        return None

    def build(self, trial) -> MergeRecipe:
        if self.mode == "dus":
            m = self.m.suggest(trial, "m")
            a, b = self.sources[0], self.sources[-1]
            layout = [(a, 0, self.depth[a] - m), (b, m, self.depth[b])]
        elif self.mode == "interleave":
            width = self.width.suggest(trial, "width")
            stride = self.stride.suggest(trial, "stride")
            n = self.depth[self.sources[0]]
            ranges = interleave_ranges(n, width, stride)
            layout = [(self.sources[i % len(self.sources)], s, e) for i, (s, e) in enumerate(ranges)]
        else:
            layout = []
            for i in range(self.count.suggest(trial, "slices")):
                model = self.model_choice.suggest(trial, f"slice.{i}.model")
                at = self._free_name(i, model)
                start = self.start[model].suggest(trial, f"{at}.start")
                length = self.lengths[model].suggest(trial, f"{at}.length")
                layout.append((model, start, min(start + length, self.depth[model])))
        slices = [OutputSlice(sources=[InputSlice(model=m, layer_range=(s, e))]) for m, s, e in layout]
        return MergeRecipe(merge_method="passthrough", slices=slices, **self.output_options())

    def propose_params(self, recipe) -> list[dict]:
        layout = read_passthrough_layout(single(recipe))
        if self.mode == "dus":
            if len(layout) != 2:
                raise NotInSpace(f"it has {len(layout)} slices; depth up-scaling has 2")
            params: dict = {}
            self.m.put(params, "m", layout[1][1])
            return [params]
        if self.mode == "interleave":
            width = layout[0][2] - layout[0][1]
            strides = [layout[1][1] - layout[0][1]] if len(layout) > 1 else []
            # When the last window is the closing [n-w, n], several strides give one layout: try each.
            strides += [s for s in range(self.stride.low, self.stride.high + 1) if s not in strides]
            out = []
            for stride in strides:
                params = {}
                self.width.put(params, "width", width)
                if self.stride.low <= stride <= self.stride.high:
                    self.stride.put(params, "stride", stride)
                    out.append(params)
            return out
        params = {}
        self.count.put(params, "slices", len(layout))
        for i, (model, start, end) in enumerate(layout):
            self.model_choice.put(params, f"slice.{i}.model", model)
            at = self._free_name(i, model)
            self.start[model].put(params, f"{at}.start", start)
            length = end - start
            if end == self.depth[model] and length < self.lengths[model].low:
                length = self.lengths[model].low  # a longer slice is cut at the model's last layer
            self.lengths[model].put(params, f"{at}.length", length)
        return [params]

    def _free_name(self, i: int, model: str) -> str:
        return f"slice.{i}.{model}" if self.per_model else f"slice.{i}"


def read_passthrough_layout(recipe) -> list[tuple[str, int, int]]:
    """(model, start, end) per slice of a plain passthrough stack; NotInSpace for anything else."""
    if not isinstance(recipe, MergeRecipe) or recipe.merge_method != "passthrough" or not recipe.slices:
        raise NotInSpace("a slice layout is a passthrough recipe with slices")
    layout = []
    for i, s in enumerate(recipe.slices):
        if len(s.sources) != 1 or s.sources[0].parameters or s.parameters or s.base_model:
            raise NotInSpace(f"slices[{i}] is not a single source without parameters")
        src = s.sources[0]
        layout.append((src.model, *src.layer_range))
    return layout
