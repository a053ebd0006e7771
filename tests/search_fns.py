"""Score functions for the search tests: `kind: custom` objectives, called inside Ray workers.

A test writes a tiny module next to its run spec that binds one of these with its
arguments (a target file, a marker file), e.g. `score = closeness(str(tmp_path / "target.pt"))` written out as a literal path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# A fixed batch of token ids every candidate is run on (the stand-in vocabulary has 96 tokens).
PROBE = torch.arange(4, 4 + 2 * 24).remainder(90).add(4).reshape(2, 24)


def state_fingerprint(state: dict[str, torch.Tensor]) -> float:
    """One float64 number that changes with any tensor: sum of each tensor against a fixed wave."""
    total = 0.0
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float64).flatten()
        wave = torch.cos(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + len(name))
        total += float((t * wave).sum())
    return total


def fingerprint(model, tokenizer, fidelity) -> float:
    """Scores a candidate by its exact weights, so a test can tell which tensors were scored."""
    return state_fingerprint(model.state_dict())


def probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE.to(model.device)).logits.float().cpu()


def closeness(target_path: str):
    """-MSE between a candidate's logits and a hidden target merge's logits on PROBE (0 = the target)."""
    cache: dict[str, torch.Tensor] = {}

    def score(model, tokenizer, fidelity) -> float:
        if "target" not in cache:
            cache["target"] = torch.load(target_path)
        logits = probe_logits(model)
        if logits.shape != cache["target"].shape:
            return -1e3  # another depth or vocabulary cannot be the target
        return -float(((logits - cache["target"]) ** 2).mean())

    return score


def staged(per_stage_penalty: float = 0.0):
    """A fidelity-aware fingerprint: stage `fidelity` adds fidelity * penalty (stages compare across trials)."""

    def score(model, tokenizer, fidelity) -> float:
        return fingerprint(model, tokenizer, fidelity) + (fidelity or 0) * per_stage_penalty

    return score


def sleepy(seconds: float, inner=fingerprint):
    """The inner score after a fixed delay: trials that take time, for concurrency and fault tests."""

    def score(model, tokenizer, fidelity) -> float:
        time.sleep(seconds)
        return inner(model, tokenizer, fidelity)

    return score


def kill_times(counter: str, inner=fingerprint):
    """Kills its own worker process mid-trial while the number in file `counter` is above 0 (counting down)."""

    def score(model, tokenizer, fidelity) -> float:
        path = Path(counter)
        left = int(path.read_text())
        if left > 0:
            path.write_text(str(left - 1))
            os._exit(17)
        return inner(model, tokenizer, fidelity)

    return score


def fail_when(predicate):
    """Raises on candidates `predicate(model)` picks, to test failed trials."""

    def score(model, tokenizer, fidelity) -> float:
        if predicate(model):
            raise RuntimeError("this candidate cannot be scored")
        return fingerprint(model, tokenizer, fidelity)

    return score
