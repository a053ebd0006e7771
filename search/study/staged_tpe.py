"""TPE that learns from pruned trials: a trial pruned at the last stage before the full score is
ranked by an estimate of its final score.

Optuna's TPE splits trials into a good and a bad group by their final value, and puts a
pruned trial (no final value) behind every finished one, however close it came. A trial
stopped at the last stage before the full score came close: its score there, on most of the
examples, ranks it almost as the full score would (BENCHMARKS.md, "Search: stage scores":
on the demo, 128 of 256 examples rank the best random merges with a Spearman correlation of
0.99, where the first 16 give 0.62).

Every trial scored its stages on the same examples, so the gap between that stage's score
and the final score is much the same for every trial. This sampler shows TPE the study with
each trial pruned at that stage read as finished, at its score there plus the mean gap over
the trials that finished. Trials pruned at earlier, noisier stages stay pruned, behind the
rest: read as near-best, the many trials a pruner stops early around the best so far made
TPE sample ever closer to it and settle there (BENCHMARKS.md, "Search: pruning").

A study without reported stages (no pruner, or several objectives), or before any trial
has finished, reads unchanged: the sampler is then Optuna's TPE, proposal for proposal.

Past `history` finished trials (default 500) a single-objective study is read thinned
(search/study/tpe_history.py), so a proposal costs the same however long the run; `history: null`
reads every trial, as Optuna's TPE does.
"""

from __future__ import annotations

import copy
import math
import statistics

import optuna
from optuna.samplers._tpe.sampler import default_gamma
from optuna.trial import FrozenTrial, TrialState

from search.study.study_view import StudyView
from search.study.tpe_history import thin_history

DEFAULT_HISTORY = 500


def stage_gaps(trials: list[FrozenTrial]) -> dict[int, float]:
    """Per reported step: the mean of (final value - score at that step) over the finished trials."""
    gaps: dict[int, list[float]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and t.values and len(t.values) == 1 and math.isfinite(t.values[0]):
            for step, score in t.intermediate_values.items():
                if math.isfinite(score):
                    gaps.setdefault(step, []).append(t.values[0] - score)
    return {step: statistics.fmean(g) for step, g in gaps.items()}


def read_pruned_as_finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials with each one pruned at the deepest step the finished trials reported read as
    COMPLETE at its estimated final score (its score there plus the step's mean gap); other pruned
    trials stay pruned. Returns copies; the study is untouched."""
    if not any(t.state == TrialState.PRUNED for t in trials):
        return trials
    gaps = stage_gaps(trials)
    deepest = max(gaps, default=None)
    out = []
    for t in trials:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            score = t.intermediate_values[step]
            if step == deepest and math.isfinite(score):
                t = copy.copy(t)
                t.state = TrialState.COMPLETE
                t.values = [score + gaps[step]]
        out.append(t)
    return out


class StagedTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, reading a single-objective study's trials through `read_pruned_as_finished`, then
    thinned to `history` finished trials (None: all of them)."""

    def __init__(self, *args, history: int | None = DEFAULT_HISTORY, **kwargs):
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be a positive whole number of trials or null, not {history!r}")
        super().__init__(*args, **kwargs)
        self._history = history

    def _view(self, study: optuna.Study):
        if len(study.directions) != 1:
            return study
        if self._history is None:
            return StudyView(study, read_pruned_as_finished)
        gamma, maximize = self._gamma or default_gamma, study.direction == optuna.study.StudyDirection.MAXIMIZE
        return StudyView(study, lambda trials: thin_history(read_pruned_as_finished(trials), self._history,
                                                           gamma, maximize))

    def sample_relative(self, study, trial, search_space):
        return super().sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return super().sample_independent(self._view(study), trial, param_name, param_distribution)
