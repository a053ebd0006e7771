"""The paired pruner: trials compared with the best one example by example (search/study/paired_pruner.py)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from search.study.paired_pruner import PairedPruner, paired_z


def examples(values, aggregation="mean", weight=1.0, task="t"):
    return {task: {"aggregation": aggregation, "weight": weight, "values": dict(enumerate(values))}}


def test_identical_examples_are_not_worse():
    x = np.random.default_rng(0).random(64)
    assert paired_z(examples(x), examples(x), "maximize") == 0.0


def test_z_is_the_score_difference_over_its_paired_standard_error():
    rng = np.random.default_rng(1)
    best = rng.random(100)
    current = best - 0.05 + rng.normal(0, 0.1, 100)  # worse by 0.05 on average, noisy per example
    d = current - best
    expected = -d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))  # maximize: lower is worse
    assert paired_z(examples(current), examples(best), "maximize") == pytest.approx(expected)
    assert paired_z(examples(current), examples(best), "minimize") == pytest.approx(-expected)


def test_perplexity_is_worse_when_log_likelihoods_drop():
    rng = np.random.default_rng(2)
    best = -rng.random(64)  # per-example log-likelihoods
    worse = best - 0.3 + rng.normal(0, 0.05, 64)
    z = paired_z(examples(worse, "perplexity"), examples(best, "perplexity"), "minimize")
    assert z > 10
    # only the examples both scored are compared: a later stage of the best covers the earlier one's
    longer_best = examples(list(best) + list(-rng.random(64)), "perplexity")
    assert paired_z(examples(worse, "perplexity"), longer_best, "minimize") == pytest.approx(z)


def test_the_noise_of_the_examples_decides():
    """The same mean difference is significant on consistent examples and not on noisy ones."""
    rng = np.random.default_rng(3)
    best = rng.random(32)
    consistent = best - 0.05 + rng.normal(0, 0.01, 32)
    noisy = best - 0.05 + rng.normal(0, 0.5, 32)
    assert paired_z(examples(consistent), examples(best), "maximize") > 1.64
    assert paired_z(examples(noisy), examples(best), "maximize") < 1.64


def test_pruner_compares_with_the_best_completed_trial():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = PairedPruner()
    study = optuna.create_study(direction="maximize", pruner=pruner)
    rng = np.random.default_rng(4)
    good = rng.random(64)

    first = study.ask()
    first.report(float(good.mean()), 16)
    pruner.record(first.number, examples(good - 0.5))
    assert not first.should_prune()  # nothing completed to compare with
    study.tell(first, float(good.mean()) - 0.5)

    best = study.ask()
    pruner.record(best.number, examples(good))
    study.tell(best, float(good.mean()))

    bad, close = study.ask(), study.ask()
    for trial, values in [(bad, good - 0.3 + rng.normal(0, 0.05, 64)), (close, good + rng.normal(0, 0.05, 64))]:
        trial.report(float(values.mean()), 16)
        pruner.record(trial.number, examples(values))
    assert bad.should_prune()  # worse than `best`, not just than `first`
    assert not close.should_prune()


def test_after_a_resume_it_compares_with_the_best_trial_it_saw():
    """A resumed run's pruner has not seen the examples of the trials before the resume: until it
    has, it stops nothing; then it compares with the best completed trial it saw."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = PairedPruner()
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.add_trial(optuna.trial.create_trial(value=10.0))  # the study's best, from before the resume
    rng = np.random.default_rng(5)
    seen = rng.random(64)

    early = study.ask()
    early.report(0.0, 16)
    pruner.record(early.number, examples(seen - 0.5))
    assert not early.should_prune()
    study.tell(early, state=optuna.trial.TrialState.FAIL)

    first = study.ask()
    pruner.record(first.number, examples(seen))
    study.tell(first, float(seen.mean()))
    worse = study.ask()
    worse.report(0.0, 16)
    pruner.record(worse.number, examples(seen - 0.3 + rng.normal(0, 0.05, 64)))
    assert worse.should_prune()
