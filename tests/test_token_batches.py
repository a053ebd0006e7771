"""Evaluation batches sized by a token budget (objectives/token_batches.py).

The pure function: no batch over its budget (unless one example alone is), every
example exactly once, results put back in the original order. Through the lmeval
objective on the toy zoo's tasks: the model sees batches within the budget, and
the scores are those of lm-eval's fixed-size batches.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_objectives import lmeval
from tiny_models import tiny_llama

from objectives.token_batches import default_batch_tokens, in_original_order, token_batches
from objectives.zoo.skills import SKILLS, eval_split
from objectives.zoo.tasks import write_task_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("seed", range(20))
def test_batches_stay_within_budget_cover_every_example_once_and_restore_order(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 200))]
    budget = rng.choice([1, 7, 40, 64, 500, 10_000])
    cap = rng.choice([None, 1, 3, 64])
    batches = token_batches(lengths, budget, cap)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1
        assert cap is None or len(batch) <= cap
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    # results computed per batch land at their examples' positions
    results = [[f"r{i}" for i in batch] for batch in batches]
    assert in_original_order(batches, results) == [f"r{i}" for i in range(len(lengths))]


def test_batches_are_full_longest_first_and_ties_keep_their_order():
    assert token_batches([3, 5, 5, 2, 2, 2, 9], budget=10) == [[6], [1, 2], [0, 3, 4], [5]]
    assert token_batches([4, 4, 4, 4], budget=100, max_examples=3) == [[0, 1, 2], [3]]
    assert token_batches([], budget=10) == []
    with pytest.raises(ValueError):
        token_batches([1], budget=0)
    assert default_batch_tokens("cpu") < default_batch_tokens("cuda")


@pytest.fixture(scope="module")
def zoo_tasks(tmp_path_factory):
    """The zoo's task folders (fst, nxt, cnt, max) with 48 examples each; no model trained."""
    root = tmp_path_factory.mktemp("zoo_tasks")
    rng, seen = random.Random(0), set()
    for skill in ("fst", "nxt", "cnt", "max"):
        rows = eval_split(SKILLS[skill], rng, 48, seen)
        write_task_folder(root / skill, skill, {"search": rows}, root / skill)
    return root


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """Large random weights: answers and likelihoods differ from example to example."""
    return tiny_llama(tmp_path_factory.mktemp("model"), seed=3, initializer_range=0.5, max_position_embeddings=128)


def forward_shapes(model):
    shapes = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)), with_kwargs=True)
    return shapes, handle


@pytest.mark.parametrize("budget", [24, 100, 4096])
def test_token_budget_scores_equal_fixed_batches_on_zoo_tasks(zoo_tasks, random_model, budget):
    model, tok = random_model
    tasks = [{"task": f"{s}_search", "metric": m} for s in ("fst", "nxt", "cnt", "max") for m in ("acc",)]
    fixed = lmeval(zoo_tasks, tasks=tasks, batch_size=16)
    by_tokens = lmeval(zoo_tasks, tasks=tasks, batch_tokens=budget)
    with torch.inference_mode():
        fixed.new_candidate()
        reference = fixed.task_scores(model, tok)
        shapes, handle = forward_shapes(model)
        try:
            by_tokens.new_candidate()
            scores = by_tokens.task_scores(model, tok)
        finally:
            handle.remove()
    assert scores == reference
    assert all(b * t <= budget or b == 1 for b, t in shapes)
    assert len(shapes) > 1 if budget < 4096 else len(shapes) >= 1
    # the per-example log-likelihoods behind the scores agree too (perplexity is their mean)
    ppl = [{"task": t["task"], "metric": "perplexity"} for t in tasks]
    with torch.inference_mode():
        a, b = (lmeval(zoo_tasks, tasks=ppl, **kw) for kw in ({"batch_size": 16}, {"batch_tokens": budget}))
        assert b.task_scores(model, tok) == pytest.approx(a.task_scores(model, tok), rel=1e-6)
