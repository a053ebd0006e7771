"""Objectives on tiny real models whose answers are known by construction.

A "constant" model is a real Llama (saved as safetensors, loaded by transformers)
whose weights make it predict one token whatever the input: attention and MLP
outputs are zeroed, so the last hidden state is the same for every position, and
the LM head maps that state onto one token. Setting which token, in place, on
one resident model is how the search changes a candidate's weights, so the tests
also show that a wrapper reused across trials sees new weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import optuna
import pytest
import torch
import transformers
import yaml

from objectives import build_objectives
from objectives.fidelity import check_fidelities, nested_subset
from objectives.zoo.tokenizer import VOCAB
from search.engine.errors import UserError
from search.study.paired_pruner import PairedPruner
from standins import make_standin
from tiny_models import constant_llama

STRENGTH = 20.0


# --- fixtures --------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory):
    """A tiny Llama + the zoo's char tokenizer, from a real HF folder; predicts 'a' until told otherwise."""
    model, tokenizer = constant_llama(tmp_path_factory.mktemp("model"))
    predict(model, "a")
    return model, tokenizer


def predict(model, *tokens: str, weights: tuple[float, ...] | None = None) -> None:
    """Make `model` prefer `tokens[0]` (logit STRENGTH * weight) over everything else, in place."""
    weights = weights or (1.0,) * len(tokens)
    with torch.no_grad():
        head = model.lm_head.weight
        head.zero_()
        for token, w in zip(tokens, weights):
            head[VOCAB[token]] = STRENGTH * w / head.shape[1]


def write_task(folder: Path, name: str, rows: list[dict], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **config,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(full))


MC = {  # multiple choice: pick 'a' or 'b'
    "output_type": "multiple_choice",
    "doc_to_text": "{{q}}>",
    "doc_to_choice": ["a", "b"],
    "doc_to_target": "{{gold}}",
    "target_delimiter": "",
    "metric_list": [{"metric": "acc"}],
}
GEN = {  # generate three characters, exact match
    "output_type": "generate_until",
    "doc_to_text": "{{q}}>",
    "doc_to_target": "{{answer}}",
    "target_delimiter": "",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
    "metric_list": [{"metric": "exact_match"}],
}
GREEDY = {  # teacher-forced: is the whole continuation the greedy one (the zoo's scoring)
    "output_type": "loglikelihood",
    "doc_to_text": "{{q}}>",
    "doc_to_target": "{{answer}}",
    "target_delimiter": "",
    "metric_list": [{"metric": "acc"}],
}

# gold answers of the 'pick' tasks: every prefix of the search split has its own share of 'a'
SEARCH_GOLDS = "aabaababbbaaabab"  # 16 docs; 'a' share of the first 2/4/8/16: 1, .75, .625, .5625
HELDOUT_GOLDS = "bbbbbbabbbbbbabb"  # held-out disagrees: mostly 'b'
PPL_ANSWERS = ["a", "aa", "ab", "a", "aaa", "b", "a", "aa"] * 4  # 32 docs, mostly 'a'


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for split, golds in [("search", SEARCH_GOLDS), ("heldout", HELDOUT_GOLDS)]:
        write_task(root / "pick", f"pick_{split}", [{"q": f"q{i}", "gold": "ab".index(g)} for i, g in enumerate(golds)], MC)
        # 'agree' has the same split for both: held-out re-scoring must not change anything
        write_task(root / "agree", f"agree_{split}", [{"q": f"q{i}", "gold": "ab".index(g)} for i, g in enumerate(SEARCH_GOLDS)], MC)
    (root / "pick" / "pick_both.yaml").write_text(yaml.safe_dump({"group": "pick_both", "task": ["pick_search", "pick_heldout"]}))
    answers = ["aaa", "bbb", "aaa", "aab", "aaa", "ccc"]
    write_task(root / "gen", "gen", [{"q": f"q{i}", "answer": a} for i, a in enumerate(answers)], GEN)
    continuations = ["a", "a", "ab", "b", "a", "aa"]  # greedy under 'a': a, a, -, -, a, aa
    write_task(root / "greedy", "greedy", [{"q": f"q{i}", "answer": a} for i, a in enumerate(continuations)], GREEDY)
    write_task(root / "ppl", "ppl", [{"q": f"q{i}", "answer": a} for i, a in enumerate(PPL_ANSWERS)],
               {**GREEDY, "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]})
    return root


def lmeval(tasks_root: Path, **spec):
    return build_objectives([{"kind": "lmeval", "include_path": str(tasks_root), **spec}], tasks_root)[0]


def share(golds: str, letter: str) -> float:
    return golds.count(letter) / len(golds)


# --- lmeval -------------------------------------------------------------------------------------


def test_lmeval_multiple_choice_scores_follow_the_weights_in_place(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["pick_search"])
    assert (objective.direction, objective.fidelities) == ("maximize", None)
    predict(model, "a")
    with torch.inference_mode():  # as the search's workers call it
        assert objective.score(model, tok) == pytest.approx(share(SEARCH_GOLDS, "a"))
    predict(model, "b")  # same object, new weights: nothing cached may hide them
    assert objective.score(model, tok) == pytest.approx(share(SEARCH_GOLDS, "b"))
    predict(model, "a")


def test_lmeval_generation_exact_match(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["gen"], metric="exact_match")
    predict(model, "a")
    assert objective.score(model, tok) == pytest.approx(3 / 6)  # generates "aaa"
    predict(model, "c")
    assert objective.score(model, tok) == pytest.approx(1 / 6)
    predict(model, "a")


def test_lmeval_teacher_forced_greedy_match_is_acc(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["greedy"])
    predict(model, "a")
    assert objective.score(model, tok) == pytest.approx(4 / 6)


def test_lmeval_weights_combine_tasks(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=[{"task": "pick_search", "weight": 3}, {"task": "gen", "metric": "exact_match"}])
    predict(model, "a")
    assert objective.score(model, tok) == pytest.approx((3 * share(SEARCH_GOLDS, "a") + 0.5) / 4)
    assert objective.last_details == pytest.approx({"pick_search": share(SEARCH_GOLDS, "a"), "gen": 0.5})


def test_lmeval_group_scores_the_mean_of_its_tasks(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["pick_both"])
    predict(model, "a")
    assert objective.score(model, tok) == pytest.approx((share(SEARCH_GOLDS, "a") + share(HELDOUT_GOLDS, "a")) / 2)


def test_fidelity_stages_are_nested_prefixes_identical_across_trials(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["pick_search"], fidelities=[2, 4, 8, 16])
    predict(model, "a")
    first = [objective.score(model, tok, n) for n in objective.fidelities]
    assert first == pytest.approx([share(SEARCH_GOLDS[:n], "a") for n in objective.fidelities])
    predict(model, "b")  # another trial in between
    objective.score(model, tok, 4)
    predict(model, "a")
    assert [objective.score(model, tok, n) for n in objective.fidelities] == first


def test_seeded_subsets_are_nested_and_scored_as_such(constant_model, tasks):
    for n_docs, seed in [(16, 0), (1000, 3)]:
        subsets = [set(nested_subset(n_docs, n, seed)) for n in (2, 4, 8, 16)]
        assert all(len(s) == n for s, n in zip(subsets, (2, 4, 8, 16)))
        assert all(a < b for a, b in zip(subsets, subsets[1:]))  # strictly nested
        assert subsets == [set(nested_subset(n_docs, n, seed)) for n in (2, 4, 8, 16)]  # identical each time
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["pick_search"], fidelities=[2, 4, 8], subset_seed=5)
    predict(model, "a")
    for n in objective.fidelities:
        expected = sum(SEARCH_GOLDS[i] == "a" for i in nested_subset(16, n, 5)) / n
        assert objective.score(model, tok, n) == pytest.approx(expected)


def test_fewshot_contexts_are_the_same_in_every_worker_and_trial(constant_model, tasks):
    model, tok = constant_model

    def contexts(objective, n):
        objective.score(model, tok, n)
        return [i.arguments for i in objective.search_tasks["tasks"]["pick_search"].instances]

    one, other = (lmeval(tasks, tasks=["pick_search"], num_fewshot=2, fidelities=[4, 8]) for _ in range(2))
    first = contexts(one, 4)
    assert first[0][0].count(">") == 3  # two solved examples, then the question
    assert contexts(one, 8)[: len(first)] == first  # the larger stage extends the smaller
    assert contexts(one, 4) == first == contexts(other, 4)  # next trial, another worker


def test_limit_caps_the_full_score(constant_model, tasks):
    model, tok = constant_model
    objective = lmeval(tasks, tasks=["pick_search"], limit=4)
    predict(model, "a")
    assert objective.score(model, tok) == pytest.approx(share(SEARCH_GOLDS[:4], "a"))


def test_heldout_rescoring_changes_the_pick_only_when_heldout_disagrees(constant_model, tasks):
    model, tok = constant_model
    candidates = {"always_a": "a", "always_b": "b"}
    for task, pick_changes in [("pick_search", True), ("agree_search", False)]:
        objective = lmeval(tasks, tasks=[task])  # held-out twin found by name: X_search -> X_heldout
        assert objective.has_heldout
        search, heldout = {}, {}
        for name, token in candidates.items():
            predict(model, token)
            search[name] = objective.score(model, tok)
            heldout[name] = objective.score_heldout(model, tok)
        top = sorted(search, key=search.get, reverse=True)  # the top-k (k=2) of the search
        pick = max(top, key=heldout.get)
        assert top[0] == "always_a"
        assert (pick != top[0]) == pick_changes
    predict(model, "a")


def test_heldout_twin_by_explicit_name_and_absent(constant_model, tasks):
    model, tok = constant_model
    predict(model, "a")
    explicit = lmeval(tasks, tasks=[{"task": "agree_search", "heldout": "pick_heldout"}])
    assert explicit.score_heldout(model, tok) == pytest.approx(share(HELDOUT_GOLDS, "a"))
    none = lmeval(tasks, tasks=["gen"], metric="exact_match")
    assert not none.has_heldout
    assert none.score_heldout(model, tok) == none.score(model, tok)
    partial = lmeval(tasks, tasks=["pick_search", {"task": "gen", "metric": "exact_match"}])
    assert not partial.has_heldout  # only a complete set of twins makes a held-out split


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"tasks": ["pick_serch"]}, "did you mean pick_search"),
        ({"tasks": ["pick_search"], "fidelities": [8, 4]}, "increasing"),
        ({"tasks": ["pick_search"], "limt": 3}, "unknown field 'limt'"),
        ({"tasks": [{"task": "pick_search", "weight": -1}]}, "weight"),
        ({"tasks": ["pick_search"], "limit": 4, "fidelities": [2, 8]}, "exceeds `limit`"),
    ],
)
def test_lmeval_bad_specs_are_one_line_errors(tasks, spec, message):
    with pytest.raises(UserError, match=message) as e:
        lmeval(tasks, **spec)
    assert "\n" not in str(e.value)


def test_lmeval_unknown_metric_names_the_ones_reported(constant_model, tasks):
    model, tok = constant_model
    with pytest.raises(UserError, match="acc,none"):
        lmeval(tasks, tasks=["pick_search"], metric="f1").score(model, tok)


# --- pruning ------------------------------------------------------------------------------------


PICK = {"tasks": ["pick_search"], "fidelities": [4, 8, 16]}  # acc, maximize
PPL = {"tasks": [{"task": "ppl", "metric": "perplexity"}], "fidelities": [8, 16, 32], "direction": "minimize"}


@pytest.mark.parametrize(
    "make_pruner, objective_spec, max_stages",
    [
        (lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0), PICK, 1),
        (lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2), PICK, 2),
        # on 'pick', 'b' against 'a' is worse on 3 of the first 4 examples, not significantly; on 'ppl'
        # (answers mostly 'a's) it is worse on almost every example
        (PairedPruner, PPL, 1),
    ],
    ids=["median", "successive_halving", "paired"],
)
def test_pruning_stops_bad_candidates_early(constant_model, tasks, make_pruner, objective_spec, max_stages):
    """Candidates with x < 0.4 answer 'b' (bad on every stage); the pruner must stop them early."""
    model, tok = constant_model
    objective = lmeval(tasks, **objective_spec)
    pruner = make_pruner()
    stages_run: dict[int, int] = {}

    def run_trial(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        predict(model, "a" if x >= 0.4 else "b")
        objective.new_candidate()
        stages_run[trial.number] = 0
        for step, n in enumerate(objective.fidelities):
            value = objective.score(model, tok, n)
            stages_run[trial.number] += 1
            if isinstance(pruner, PairedPruner):  # as the driver does for it
                pruner.record(trial.number, objective.example_values())
            trial.report(value, step)
            if n != objective.fidelities[-1] and trial.should_prune():
                raise optuna.TrialPruned()
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=objective.direction, sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=pruner)
    study.optimize(run_trial, n_trials=16)
    predict(model, "a")

    bad = {t.number for t in study.trials if t.params["x"] < 0.4}
    pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    assert pruned <= bad  # a good candidate is never stopped
    first_good = min(t.number for t in study.trials if t.number not in bad)
    late_bad = {n for n in bad if n > max(first_good, 3)}  # once a good one has been seen
    assert late_bad and late_bad <= pruned
    assert all(stages_run[n] <= max_stages for n in late_bad)  # never paid for the full evaluation
    assert study.best_trial.number not in bad


@pytest.mark.parametrize("metric", ["perplexity", "acc"])
def test_example_values_rebuild_the_score(constant_model, tasks, metric):
    """What the paired pruner compares: per-example values whose aggregation is the stage's score."""
    model, tok = constant_model
    objective = lmeval(tasks, tasks=[{"task": "ppl", "metric": metric}, {"task": "pick_search", "metric": "acc"}],
                       fidelities=[8, 16])
    predict(model, "a", "b", weights=(1.0, 0.6))
    objective.new_candidate()
    for n in objective.fidelities:
        score = objective.score(model, tok, n)
        rebuilt = 0.0
        for task in objective.example_values().values():
            mean = float(np.mean(list(task["values"].values())))
            assert len(task["values"]) == n
            rebuilt += task["weight"] * (math.exp(-mean) if task["aggregation"] == "perplexity" else mean)
        assert rebuilt == pytest.approx(score)
    predict(model, "a")


# --- perplexity ---------------------------------------------------------------------------------


def test_perplexity_of_a_uniform_model_is_the_vocab_size(constant_model, tmp_path):
    model, tok = constant_model
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    objective = build_objectives([{"kind": "perplexity", "path": "corpus.txt", "tokens": 300, "context": 32}], tmp_path)[0]
    assert (objective.name, objective.direction) == ("perplexity", "minimize")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the vocabulary
    assert objective.score(model, tok) == pytest.approx(model.config.vocab_size, rel=1e-5)
    predict(model, "a")


def test_perplexity_ranks_models_and_reads_jsonl_with_heldout(constant_model, tmp_path):
    model, tok = constant_model
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": "a" * 30}) + "\n" for _ in range(5)))
    (tmp_path / "b.txt").write_text("b" * 150)
    objective = build_objectives(
        [{"kind": "perplexity", "path": "a.jsonl", "field": "body", "heldout_path": "b.txt", "tokens": 128, "fidelities": [32, 128]}],
        tmp_path,
    )[0]
    predict(model, "a")
    on_a = objective.score(model, tok, 32)
    assert on_a < objective.score_heldout(model, tok)  # predicts 'a' well, 'b' badly
    predict(model, "b")
    assert objective.score(model, tok, 32) > on_a
    predict(model, "a")
    # The 32-token stage is a prefix of the 128-token one: tokenized once, cut, not re-read.
    stream = next(iter(objective._streams.values()))
    assert len(stream) == 128 and stream[0].item() == VOCAB["<s>"]


def test_perplexity_bad_field_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(UserError, match="c.jsonl:1: no text field 'body'"):
        build_objectives([{"kind": "perplexity", "path": "c.jsonl", "field": "body"}], tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        build_objectives([{"kind": "perplexity", "path": "missing.txt"}], tmp_path)


# --- custom -------------------------------------------------------------------------------------

CUSTOM_SOURCE = '''
def head_norm(model, tokenizer, fidelity):
    return {"norm": float(model.lm_head.weight.detach().norm()), "fidelity": float(fidelity or -1)}

def vocab(model, tokenizer, fidelity):
    return len(tokenizer)

def not_a_number(model, tokenizer, fidelity):
    return "high"
'''


def test_custom_from_a_file_and_from_a_module(constant_model, tmp_path, monkeypatch):
    model, tok = constant_model
    (tmp_path / "scores.py").write_text(CUSTOM_SOURCE)
    objective = build_objectives(
        [{"kind": "custom", "function": "scores.py:head_norm", "key": "fidelity", "fidelities": [4, 8], "direction": "minimize"}],
        tmp_path,
    )[0]
    assert (objective.name, objective.direction, objective.fidelities) == ("head_norm", "minimize", [4, 8])
    assert objective.score(model, tok, 8) == 8.0
    assert objective.last_details["norm"] == pytest.approx(float(model.lm_head.weight.detach().norm()))
    assert not objective.has_heldout and objective.score_heldout(model, tok) == -1.0

    monkeypatch.syspath_prepend(str(tmp_path))
    module_objective = build_objectives(
        [{"kind": "custom", "name": "v", "function": "scores:vocab", "heldout_function": "scores:vocab"}], tmp_path
    )[0]
    assert module_objective.score(model, tok) == len(tok) == module_objective.score_heldout(model, tok)


def test_custom_errors(constant_model, tmp_path):
    model, tok = constant_model
    (tmp_path / "scores.py").write_text(CUSTOM_SOURCE)
    with pytest.raises(UserError, match="has no function 'nope'"):
        build_objectives([{"kind": "custom", "function": "scores.py:nope"}], tmp_path)
    with pytest.raises(UserError, match="cannot import"):
        build_objectives([{"kind": "custom", "function": "no_such_module_xyz:f"}], tmp_path)
    several = build_objectives([{"kind": "custom", "function": "scores.py:head_norm"}], tmp_path)[0]
    with pytest.raises(UserError, match="set `key`"):
        several.score(model, tok)
    text = build_objectives([{"kind": "custom", "function": "scores.py:not_a_number"}], tmp_path)[0]
    with pytest.raises(UserError, match="expected a number"):
        text.score(model, tok)


# --- cost ---------------------------------------------------------------------------------------


def test_cost_counts_parameters_once_and_layers(tmp_path):
    objectives = build_objectives([{"kind": "cost", "measure": "params"}, {"kind": "cost", "measure": "layers"}], tmp_path)
    assert [(o.name, o.direction, o.fidelities) for o in objectives] == [("params", "minimize", None), ("layers", "minimize", None)]
    for arch, layers in [("llama", 3), ("gemma", 2)]:  # gemma ties its embeddings: counted once
        model = transformers.AutoModelForCausalLM.from_pretrained(make_standin(tmp_path / arch, arch, layers, seed=1))
        config = model.config
        h, v, i = config.hidden_size, config.vocab_size, config.intermediate_size
        kv = config.num_key_value_heads * (config.head_dim if arch == "gemma" else h // config.num_attention_heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o, k, v, mlp, two norms
        heads = 1 if arch == "gemma" else 2  # embeddings, and an untied LM head
        assert objectives[0].score(model, None) == per_layer * layers + heads * v * h + h
        assert objectives[1].score(model, None) == layers == objectives[1].score_heldout(model, None)
    assert not any(o.has_heldout for o in objectives)


# --- build_objectives ---------------------------------------------------------------------------


def test_several_objectives_and_spec_errors(tmp_path):
    both = build_objectives([{"kind": "cost", "measure": "params"}, {"kind": "cost", "measure": "params", "name": "size2"}], tmp_path)
    assert [o.name for o in both] == ["params", "size2"]
    for specs, message in [
        ([], "non-empty list"),
        ([{"kind": "bleu"}], r"objectives\[0\]\.kind: expected one of lmeval, perplexity, custom, cost"),
        ([{"kind": "cost"}], "measure: missing"),
        ([{"kind": "cost", "measure": "params"}] * 2, "used twice"),
        ([{"kind": "cost", "measure": "params", "direction": "up"}], "direction"),
    ]:
        with pytest.raises(UserError, match=message):
            build_objectives(specs, tmp_path)
    assert check_fidelities(None, "x") is None
    with pytest.raises(UserError):
        check_fidelities([0, 4], "x")
