"""Incremental fidelity stages of the lmeval objective.

After `new_candidate()`, a stage scores only the examples it adds to the earlier
stages of the same candidate and aggregates the per-example metrics of all of
them. The score must be exactly what lm-eval gives for the whole subset scored
from scratch (`lm_eval.evaluator.evaluate` on freshly loaded tasks, the usual
entry point), for a multiple-choice task with few-shot contexts on a model whose
answers depend on the input, and for a generation task.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval.evaluator
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_objectives import GEN, MC, lmeval, predict, write_task
from tiny_models import constant_llama, tiny_llama

import objectives.lmeval as lmeval_module
from objectives.fidelity import nested_subset

QUESTIONS = ["ab", "ba", "aab", "bba", "abab", "b", "a", "bab", "aaa", "bbb", "abb", "baa", "aba", "bb", "aa", "abba"]
GOLDS = "abbaababbbaababa"
ANSWERS = ["aaa", "aaa", "bbb", "bbb", "aaa", "bbb", "bbb", "bbb"]  # 'aaa' share: 1, .5, .375 at 2, 4, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A tiny Llama with large random weights: its choice between 'a' and 'b' depends on the question."""
    return tiny_llama(tmp_path_factory.mktemp("random_model"), seed=1, initializer_range=0.5, max_position_embeddings=128)


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory):
    """A tiny Llama that generates 'a' or 'b' whatever the input (see test_objectives.py)."""
    return constant_llama(tmp_path_factory.mktemp("constant_model"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_task(root / "mc", "mc", [{"q": q, "gold": "ab".index(g)} for q, g in zip(QUESTIONS, GOLDS)], MC)
    write_task(root / "gen", "gen", [{"q": f"q{i}", "answer": a} for i, a in enumerate(ANSWERS)], GEN)
    return root


def from_scratch(tasks_root, model, tokenizer, task: str, metric: str, num_fewshot: int, **subset) -> float:
    """lm-eval's own evaluate on freshly loaded tasks: the reference a stage must equal."""
    loaded = TaskManager(include_path=str(tasks_root), include_defaults=False).load([task])
    for t in loaded["tasks"].values():
        t.set_config(key="num_fewshot", value=num_fewshot)
        t.set_fewshot_seed(lmeval_module.FEWSHOT_SEED)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
    results = lm_eval.evaluator.evaluate(lm, loaded, bootstrap_iters=0, log_samples=False, **subset)
    return results["results"][task][f"{metric},none"]


class RequestCounter:
    """Counts the requests the objective sends to the model, per request type (calls through)."""

    def __init__(self, monkeypatch):
        self.counts: dict[str, int] = {}
        for kind in ("loglikelihood", "generate_until"):
            original = getattr(lmeval_module.ResidentHFLM, kind)

            def spy(lm, requests, disable_tqdm=True, kind=kind, original=original):
                self.counts[kind] = self.counts.get(kind, 0) + len(requests)
                return original(lm, requests, disable_tqdm)

            monkeypatch.setattr(lmeval_module.ResidentHFLM, kind, spy)

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def test_multiple_choice_stages_equal_from_scratch_and_score_only_new_examples(random_model, tasks, monkeypatch):
    model, tok = random_model
    counter = RequestCounter(monkeypatch)
    objective = lmeval(tasks, tasks=["mc"], num_fewshot=2, fidelities=[4, 8, 16])
    reference = [from_scratch(tasks, model, tok, "mc", "acc", 2, limit=n) for n in objective.fidelities]
    assert 0.2 < reference[-1] < 0.8  # the model's answers depend on the question: not a trivial score

    with torch.inference_mode():
        for trial in range(2):  # the second candidate must not see the first one's results
            objective.new_candidate()
            staged, requests = [], []
            for n in objective.fidelities:
                staged.append(objective.score(model, tok, n))
                requests.append(counter.take().get("loglikelihood", 0))
            assert staged == pytest.approx(reference, abs=0)
            assert requests == [2 * 4, 2 * (8 - 4), 2 * (16 - 8)]  # two choices per example, new examples only

    # without new_candidate() every call scores its whole subset (callers that never announce candidates)
    plain = lmeval(tasks, tasks=["mc"], num_fewshot=2, fidelities=[4, 8, 16])
    assert [plain.score(model, tok, n) for n in plain.fidelities] == pytest.approx(reference, abs=0)
    assert counter.take()["loglikelihood"] == 2 * (4 + 8 + 16)


def test_seeded_subsets_stages_equal_from_scratch(random_model, tasks, monkeypatch):
    model, tok = random_model
    counter = RequestCounter(monkeypatch)
    objective = lmeval(tasks, tasks=["mc"], fidelities=[4, 8, 16], subset_seed=7)
    reference = [from_scratch(tasks, model, tok, "mc", "acc", 0, samples={"mc": nested_subset(16, n, 7)})
                 for n in objective.fidelities]
    objective.new_candidate()
    assert [objective.score(model, tok, n) for n in objective.fidelities] == pytest.approx(reference, abs=0)
    assert counter.take()["loglikelihood"] == 2 * 16


def test_generation_stages_equal_from_scratch_and_score_only_new_examples(constant_model, tasks, monkeypatch):
    model, tok = constant_model
    counter = RequestCounter(monkeypatch)
    objective = lmeval(tasks, tasks=["gen"], metric="exact_match", fidelities=[2, 4, 8])
    for token, expected in [("a", [1.0, 0.5, 0.375]), ("b", [0.0, 0.5, 0.625])]:
        predict(model, token)  # a new candidate written into the same model object
        reference = [from_scratch(tasks, model, tok, "gen", "exact_match", 0, limit=n) for n in objective.fidelities]
        assert reference == pytest.approx(expected)
        objective.new_candidate()
        staged = []
        for n in objective.fidelities:
            staged.append(objective.score(model, tok, n))
            assert counter.take() == {"generate_until": n - (n // 2 if n > 2 else 0)}
        assert staged == pytest.approx(reference, abs=0)
    predict(model, "a")


def test_heldout_never_reuses_search_results(constant_model, tasks, monkeypatch):
    """With no held-out twin, score_heldout is the full search score, but scored afresh."""
    model, tok = constant_model
    counter = RequestCounter(monkeypatch)
    objective = lmeval(tasks, tasks=["gen"], metric="exact_match", fidelities=[2, 8])
    predict(model, "a")
    objective.new_candidate()
    assert objective.score(model, tok, 8) == pytest.approx(0.375)
    counter.take()
    predict(model, "b")  # a held-out re-score that (wrongly) reused results would still say 0.375
    assert objective.score_heldout(model, tok) == pytest.approx(0.625)
    assert counter.take() == {"generate_until": 8}
    predict(model, "a")
