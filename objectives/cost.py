"""Cost terms for multi-objective searches: parameter count or number of layers (smaller is cheaper).

    - {kind: cost, measure: params}      # unique parameters (tied embeddings count once)
    - {kind: cost, measure: layers}      # config.num_hidden_layers
"""

from __future__ import annotations

from pathlib import Path

from objectives import Objective
from objectives.spec import SpecReader

MEASURES = ("params", "layers")


def parameter_count(model) -> int:
    # model.parameters() yields a tied tensor once, so tied embeddings are not double counted.
    return sum(p.numel() for p in model.parameters())


def layer_count(model) -> int:
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    return int(text_config.num_hidden_layers)


class CostObjective(Objective):
    kind = "cost"

    def __init__(self, measure: str, name: str | None = None, direction: str = "minimize"):
        self.measure = measure
        self.name = name or measure
        self.direction = direction
        self.fidelities = None
        self.has_heldout = False  # a model's size has no held-out split

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "CostObjective":
        r = SpecReader(spec, where, base_dir)
        r.raw("kind")
        if not r.has("measure"):
            raise r.fail("measure", f"missing; expected one of {', '.join(MEASURES)}")
        obj = cls(r.str("measure", choices=MEASURES), r.str("name"), r.direction("minimize"))
        r.done()
        return obj

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        return float(parameter_count(model) if self.measure == "params" else layer_count(model))

    def score_heldout(self, model, tokenizer) -> float:
        return self.score(model, tokenizer)

    def eval_batch_tokens(self, device_type: str) -> int | None:
        return 0  # counts parameters or layers: no forward pass
