"""Optuna samplers by name, seeded.

`tpe` is the default: multivariate (parameters are modelled jointly — a slerp
curve's anchors interact) with the constant liar, so that trials still running on
other workers count as pending and asynchronous workers do not all sample the
same point. In a pruned search it also learns from the trials stopped at the last stage
before the full score, at an estimate of their final score (search/study/staged_tpe.py);
`optuna.samplers.TPESampler` by dotted path is Optuna's own, which ranks every pruned
trial behind every finished one.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import optuna

from search.engine.errors import UserError, short
from search.study.staged_tpe import StagedTPESampler

SINGLE_OBJECTIVE_ONLY = ("cmaes",)


def _by_name(name: str, seed: int, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    s = optuna.samplers
    if name == "tpe":
        return StagedTPESampler(**{"multivariate": True, "constant_liar": True, "seed": seed, **options})
    if name == "cmaes":
        return s.CmaEsSampler(**{"seed": seed, **options})
    if name == "gp":
        return s.GPSampler(**{"seed": seed, **options})
    if name == "nsga2":
        return s.NSGAIISampler(**{"seed": seed, **options})
    if name == "random":
        return s.RandomSampler(**{"seed": seed, **options})
    if name == "qmc":
        # scrambled, or the seed would change nothing
        return s.QMCSampler(**{"seed": seed, "scramble": True, "warn_asynchronous_seeding": False, **options})
    raise UserError(f"sampler: unknown sampler {short(name)}; use tpe, cmaes, gp, nsga2, random, qmc or a dotted class path")


def sampler_class(path: str) -> type[optuna.samplers.BaseSampler]:
    """The class a dotted path names, checked to be an Optuna sampler before anything calls it:
    a spec's `sampler: {name: os.system, ...}` must not run a command."""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError, TypeError):  # TypeError: a relative path, `..x`
        raise UserError(f"sampler: cannot import {short(path)}; check the dotted path") from None
    if not (inspect.isclass(cls) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise UserError(f"sampler: {short(path)} is not an optuna sampler (a subclass of optuna.samplers.BaseSampler)")
    return cls


def _by_path(path: str, seed: int, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    cls = sampler_class(path)
    try:
        accepts_seed = "seed" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts_seed = False
    return cls(**({"seed": seed, **options} if accepts_seed else options))


def build_sampler(
    name: str, seed: int, n_objectives: int = 1, options: dict[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    options = dict(options or {})
    if n_objectives > 1 and name in SINGLE_OBJECTIVE_ONLY:
        raise UserError(f"sampler: {name} handles one objective and this run has {n_objectives}; use nsga2 or tpe")
    try:
        return _by_path(name, seed, options) if "." in name else _by_name(name, seed, options)
    except (TypeError, ValueError) as e:  # an unknown option, or a value the sampler refuses
        raise UserError(f"sampler: bad options for {name}: {e}; check the options") from None
