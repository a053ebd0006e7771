"""MoE expert picks: which fine-tunes become experts of a MoE built on a base (mergekit-moe): a Mixtral
from a llama or mistral base, a Qwen3-MoE from a qwen3 base (search/engine/moe.py).

    space:
      kind: moe
      base: base                # a llama, mistral or qwen3 model: attention, norms and embeddings
      models: [a, b, c, d]      # the candidate experts, same shape as the base
      experts: [2, 4]           # how many of them become experts (default [2, N]; N = all)
      experts_per_token: 2      # a number fixes it, a pair searches it (default 2)
      gate_mode: [hidden, random]  # hidden | cheap_embed | random | uniform_random, or a list
      prompts:                  # positive-prompt pool per model (hidden / cheap_embed need one
        a: ["fst:", "first letter"]  #   for every model)
        b: ["nxt:"]
        c: ["cnt:", "how many"]
        d: ["max:"]
      pick_prompts: true        # search which prompts of each pool an expert gets (false: all)
      dtype: bfloat16           # also max_layers, max_params

Which experts: each model gets a score `expert.<model>` in [0, 1] and the
`experts` highest-scoring ones are taken (ties: the earlier model), in the order of
`models` -- every sample is a valid pick, none is pruned. Each prompt of an
expert's pool is kept or not (`prompt.<model>.<i>`: true/false); keeping none
means the whole pool. A candidate with fewer experts than experts_per_token is
pruned. Params: `gate_mode`, `experts_per_token`, `experts`, `expert.<model>`
(unless every model is always an expert), `prompt.<model>.<i>`.

Default (the run's baseline): every model an expert with all its prompts, the first
gate mode listed, and the lowest experts_per_token.
"""

from __future__ import annotations

from optuna import TrialPruned

from search.engine.errors import short
from search.engine.recipe import Expert, MoERecipe

from .base import MERGE_DTYPES, Space, listed, single
from .spec import ChoiceKnob, FloatKnob, NotInSpace, SpecReader

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# mergekit-moe asks for positive prompts for every gate but random (uniform_random validates them too)
NEEDS_PROMPTS = ("hidden", "cheap_embed", "uniform_random")
PICK = ChoiceKnob((True, False))
SCORE = FloatKnob(0.0, 1.0)


class MoESpace(Space):
    kind = "moe"

    def read(self, spec: SpecReader) -> None:
        self.base = spec.model("base")
        if self.models[self.base].model_type not in ("llama", "mistral", "qwen3"):
            spec.fail("base", f"{short(self.base)} is a {self.models[self.base].model_type} model; "
                      "MoE assembly builds a Mixtral from a llama or mistral base, a Qwen3-MoE from a qwen3 base")
        self.pool = spec.model_list("models", min_count=1)
        self.check_same_shape(spec, [("base", self.base)] + listed("models", self.pool))
        self.used_models = [self.base] + [m for m in self.pool if m != self.base]
        n = len(self.pool)
        self.num_experts = spec.int_knob("experts", [min(2, n), n], bounds=(1, n))
        self.per_token = spec.int_knob("experts_per_token", min(2, n), bounds=(1, n))
        self.gate_mode = spec.choice_knob("gate_mode", GATE_MODES, "hidden")

        prompts = spec.take("prompts", {})
        if not isinstance(prompts, dict):
            spec.fail("prompts", "expected a mapping: model name -> list of prompts")
        for model, pool in prompts.items():
            if model not in self.pool:
                spec.fail(f"prompts.{model}", f"not one of models {self.pool}")
            if not isinstance(pool, list) or not pool or not all(isinstance(p, str) and p for p in pool):
                spec.fail(f"prompts.{model}", "expected a non-empty list of prompt strings")
            if len(set(pool)) != len(pool):
                spec.fail(f"prompts.{model}", "lists a prompt twice; list each once")
        for mode in self.gate_mode.choices:
            if mode in NEEDS_PROMPTS:
                for model in self.pool:
                    if model not in prompts:
                        spec.fail("prompts", f"gate_mode {mode} needs positive prompts for every model; add prompts.{model}")
        self.prompts = prompts
        self.pick_prompts = spec.boolean("pick_prompts", True)
        self.dtype = spec.string("dtype", None)
        if self.dtype is not None and self.dtype not in MERGE_DTYPES:
            spec.fail("dtype", f"{short(self.dtype)} is not one of {', '.join(MERGE_DTYPES)}")

    def defaults(self) -> dict[str, MoERecipe]:
        """Every model an expert with all its prompts, the first gate mode, the lowest experts_per_token."""
        gate = self.gate_mode.choices[0]
        experts = [Expert(source_model=m, positive_prompts=list(self.prompts[m]) if gate in NEEDS_PROMPTS else None)
                   for m in self.pool]
        return {"all experts": MoERecipe(base_model=self.base, experts=experts, gate_mode=gate,
                                         experts_per_token=self.per_token.low, dtype=self.dtype)}

    def _all_experts(self) -> bool:
        return self.num_experts.low == len(self.pool)

    def _picks_prompts(self, model: str) -> bool:
        return self.pick_prompts and len(self.prompts[model]) > 1

    def build(self, trial) -> MoERecipe:
        gate = self.gate_mode.suggest(trial, "gate_mode")
        per_token = self.per_token.suggest(trial, "experts_per_token")
        if self._all_experts():
            chosen = list(self.pool)
        else:
            count = self.num_experts.suggest(trial, "experts")
            scores = {m: SCORE.suggest(trial, f"expert.{m}") for m in self.pool}
            # top `count` by score; sorted() is stable, so equal scores keep the order of `models`
            top = set(sorted(self.pool, key=lambda m: -scores[m])[:count])
            chosen = [m for m in self.pool if m in top]
        if len(chosen) < per_token:
            raise TrialPruned(f"{len(chosen)} experts picked but experts_per_token is {per_token}")

        experts = []
        for model in chosen:
            prompts = None
            if gate in NEEDS_PROMPTS:
                pool = self.prompts[model]
                if self._picks_prompts(model):
                    prompts = [p for i, p in enumerate(pool) if PICK.suggest(trial, f"prompt.{model}.{i}")]
                    prompts = prompts or list(pool)  # keeping none means no preference: all of them
                else:
                    prompts = list(pool)
            experts.append(Expert(source_model=model, positive_prompts=prompts))
        return MoERecipe(
            base_model=self.base, experts=experts, gate_mode=gate, experts_per_token=per_token, dtype=self.dtype
        )

    def propose_params(self, recipe) -> list[dict]:
        recipe = single(recipe)
        if not isinstance(recipe, MoERecipe):
            raise NotInSpace("it is not a mergekit-moe recipe (no experts:)")
        params: dict = {}
        self.gate_mode.put(params, "gate_mode", recipe.gate_mode)
        self.per_token.put(params, "experts_per_token", recipe.experts_per_token)
        chosen = [e.source_model for e in recipe.experts]
        for model in chosen:
            if model not in self.pool:
                raise NotInSpace(f"expert {short(model)} is not one of the space's models {self.pool}")
        if not self._all_experts():
            self.num_experts.put(params, "experts", len(chosen))
            for model in self.pool:
                SCORE.put(params, f"expert.{model}", 1.0 if model in chosen else 0.0)
        if recipe.gate_mode in NEEDS_PROMPTS:
            for expert in recipe.experts:
                if self._picks_prompts(expert.source_model):
                    given = expert.positive_prompts or []
                    for i, prompt in enumerate(self.prompts[expert.source_model]):
                        PICK.put(params, f"prompt.{expert.source_model}.{i}", prompt in given)
        return [params]
