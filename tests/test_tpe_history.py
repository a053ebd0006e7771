"""TPE's thinned history (search/study/tpe_history.py): the good group Optuna's TPE picks is kept whole,
the rest sampled evenly, running trials kept; checked against Optuna's own split of the trials."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers._tpe.sampler import _split_trials, default_gamma
from optuna.trial import TrialState, create_trial

from search.engine.errors import UserError
from search.study.samplers import build_sampler
from search.study.tpe_history import thin_history

DISTS = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}


def study_with(n: int, direction: str, pruned_every: int = 0, running: int = 3) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    rng = random.Random(n)
    for i in range(n):
        params = {"x": rng.random(), "y": rng.random()}
        if pruned_every and i % pruned_every == 0:
            study.add_trial(create_trial(params=params, distributions=DISTS, state=TrialState.PRUNED,
                                         intermediate_values={0: params["x"]}))
        else:
            study.add_trial(create_trial(params=params, distributions=DISTS, value=params["x"] - params["y"]))
    for _ in range(running):
        study.ask({"x": DISTS["x"], "y": DISTS["y"]})
    return study


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_good_group_is_optunas_and_the_rest_is_sampled_evenly(direction):
    study = study_with(2000, direction, pruned_every=7)
    trials = study.get_trials(deepcopy=False)
    thinned = thin_history(trials, 400, default_gamma, direction == "maximize")
    finished = [t for t in thinned if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 400
    assert [t.number for t in thinned if t.state == TrialState.RUNNING] == [2000, 2001, 2002]
    assert [t.number for t in thinned] == sorted(t.number for t in thinned)
    # Optuna's own split: the good group from the thinned trials is the one from all of them
    full_good, _ = _split_trials(study, [t for t in trials if t.state != TrialState.RUNNING], default_gamma(1997))
    thin_good, _ = _split_trials(study, finished, default_gamma(len(finished)))
    assert [t.number for t in thin_good] == [t.number for t in full_good] and len(full_good) == 25
    # the others are spread over the whole run, not its start or end
    numbers = sorted(t.number for t in finished if t.number not in {g.number for g in full_good})
    gaps = [b - a for a, b in zip(numbers, numbers[1:])]
    assert max(gaps) <= 2 * (2000 / 375) and numbers[0] < 10 and numbers[-1] > 1990


def test_under_the_limit_or_a_good_group_of_pruned_trials_reads_every_trial():
    trials = study_with(300, "minimize").get_trials(deepcopy=False)
    assert thin_history(trials, 300, default_gamma, False) == trials
    mostly_pruned = study_with(600, "minimize", pruned_every=1).get_trials(deepcopy=False)
    assert thin_history(mostly_pruned, 100, default_gamma, False) == mostly_pruned


def test_the_default_sampler_reads_a_long_study_thinned_and_history_null_reads_it_whole():
    study = study_with(700, "minimize")
    trial = study.ask()
    seen = {}
    for history in (None, 500):
        sampler = build_sampler("tpe", 0, options={} if history == 500 else {"history": None})
        seen[history] = len(sampler._view(study)._get_trials(states=(TrialState.COMPLETE,)))
        assert set(sampler.sample_relative(study, trial, DISTS)) == {"x", "y"}
    assert seen == {None: 700, 500: 500}
    with pytest.raises(UserError, match="history must be a positive whole number"):
        build_sampler("tpe", 0, options={"history": 0})
