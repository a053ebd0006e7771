"""Baselines: the merges a person would write by hand, scored in every run before the search.

Each run scores these before its first trial, outside the trial budget and never
pruned, on every stage and on the held-out split:

- each source model alone, where the space's output has its shape;
- the space's defaults, named in each space's docstring (weights: the linear average
  and TIES at weight 1, density 0.5; slerp: t = 0.5; layout and expansion: the model
  as it is; moe: every model an expert; compose: each stage's default, chained);
- every `enqueue:` recipe.

`baselines: false` in the run spec turns them off; a list of names keeps those.

A baseline that is a point of the space (`space.params` finds the point, whichever way the
recipe is written: search/engine/same_merge.py) is also added to the study as a COMPLETE
trial marked with the user attribute `baseline`, with the space's own recipe for that
point, so the sampler and the pruner learn from it; nothing counts it as a trial. Every
baseline's result is kept on the study (user attribute `baselines`), so a resumed run
does not score it again, and written to trials.jsonl with `"baseline": <name>`, its
worker and its timings, as a trial's.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

from search.study import records
from search.engine import recipe as recipes
from search.engine.errors import UserError, short
from search.run.stages import Stage
from search.run.work import Work
from search.workers.worker_faults import WorkerDied
from search.workers.worker_pool import Slot, WorkerPool
from spaces.base import ReplayTrial, model_alone

MAX_ATTEMPTS = 2  # a baseline whose worker dies is scored once more, then reported as failed


@dataclass(frozen=True)
class Baseline:
    name: str
    recipe_yaml: str
    params: dict | None  # the point of the space that builds this recipe, when there is one
    point_yaml: str | None = None  # that point's recipe as the space writes it (the trial's recipe)


def choose_baselines(spec, space, infos: dict) -> list[Baseline]:
    """The run's baselines, as its spec's `baselines:` selects them (one recipe each, first name wins)."""
    found: dict[str, list] = {}
    shape = space.output_info()
    if shape is not None:
        for alias in space.used_models:
            info = infos.get(alias)
            if info is not None and _same_shape(info, shape):
                found[f"{alias} alone"] = [model_alone(alias, info.num_layers, dtype=getattr(space, "dtype", None))]
    for name, recipe in space.defaults().items():
        found.setdefault(name, recipes.as_stages(recipe))
    for path in spec.enqueue:
        found.setdefault(f"enqueued {Path(path).name}", recipes.load(path))
    if spec.baselines is False:
        return []
    if isinstance(spec.baselines, list):
        for name in spec.baselines:
            if name not in found:
                raise UserError(f"baselines: {short(name)} is not a baseline of this run; "
                                f"choose from {', '.join(found) or 'none'}, or write true or false")
        found = {n: found[n] for n in spec.baselines}
    out, seen = [], set()
    for name, stages in found.items():
        text = recipes.dump_stages(stages)
        if text in seen:
            continue  # the same merge under two names: score it once, under the first
        seen.add(text)
        params = _params_or_none(space, stages)
        point = None if params is None else recipes.dump_stages(recipes.as_stages(space.suggest(ReplayTrial(params))))
        out.append(Baseline(name, text, params, point))
    return out


def _same_shape(a, b) -> bool:
    return (a.model_type, a.num_layers, a.hidden_size) == (b.model_type, b.num_layers, b.hidden_size)


def _params_or_none(space, stages: list) -> dict | None:
    try:
        return space.params(stages if len(stages) > 1 else stages[0])
    except UserError:
        return None


# ---- scoring -----------------------------------------------------------------------


@dataclass
class _Scoring(Work):
    baseline: Baseline
    number: int  # what the worker calls it (negative: never a trial number)
    step: int = 0  # the next call: stage index, then len(stages) for the held-out score
    stages: list = field(default_factory=list)
    examples: Any = None  # the last stage's per-example results, for the paired pruner
    result: dict = None


def score_baselines(study: optuna.Study, setup, pool: WorkerPool, say) -> dict[str, dict]:
    """Score every baseline not scored yet over the pool's workers; returns name -> result, and records each
    on the study (and as a trial where it is a point of the space). A baseline still on its worker after
    the spec's trial_timeout is given up, and its worker replaced."""
    timeout = setup.spec.trial_timeout
    done: dict[str, dict] = dict(study.user_attrs.get(records.BASELINES_ATTR, {}))
    todo = collections.deque(  # numbered by their place among the run's baselines
        _Scoring(baseline=b, number=-1 - i) for i, b in enumerate(setup.baselines) if b.name not in done
    )
    free = collections.deque(pool.live())
    in_flight: dict[Any, tuple[Slot, _Scoring]] = {}
    examples: dict[str, Any] = {}  # the last stage's per-example results, for the paired pruner
    last_call = len(setup.stages) if setup.has_heldout else len(setup.stages) - 1
    while todo or in_flight:
        while todo and free:
            job, slot = todo.popleft(), free.popleft()
            job.attempt(slot.name)
            job.step, job.stages = 0, []
            in_flight[_call(pool, slot, job, setup)] = (slot, job)
        if not in_flight:
            break
        ready = pool.wait(list(in_flight), timeout=None if timeout is None else 0.5)
        if not ready:
            for ref, (slot, job) in list(in_flight.items()):
                if time.monotonic() - job.started >= timeout:
                    del in_flight[ref]
                    pool.replace(slot)  # the only way to stop a call a worker is running
                    say(f"baseline {job.baseline.name} failed: timed out after {timeout:g} s")
                    free.append(slot)
            continue
        slot, job = in_flight.pop(ready[0])
        try:
            result = pool.get(ready[0])
        except WorkerDied as e:
            reason = pool.worker_died(slot, e)
            if job.attempts < MAX_ATTEMPTS:
                todo.append(job)
            else:
                say(f"baseline {job.baseline.name} failed: {reason}")
            if not slot.retired:
                free.append(slot)
            continue
        slot.busy_s += result["busy_s"]
        slot.calls += 1
        job.took(result)
        if not result["ok"]:
            say(f"baseline {job.baseline.name} failed: {result['error']}")
        else:
            _keep(job, result, setup)
            if job.step <= last_call:
                in_flight[_call(pool, slot, job, setup)] = (slot, job)  # the same worker goes on with the next call
                continue
            job.finished()
            done[job.baseline.name] = _record(setup, job, slot)
            study.set_user_attr(records.BASELINES_ATTR, done)
            examples[job.baseline.name] = job.examples
        free.append(slot)
    # listed, and the points of the space joining the study, in the order of the run's baselines,
    # whichever finished first, so trial numbers and records do not depend on timing
    done = {**{b.name: done[b.name] for b in setup.baselines if b.name in done}, **done}
    for b in setup.baselines:
        rec = done.get(b.name)
        if rec is not None and b.params is not None and rec["trial"] is None:
            rec["trial"] = _add_trial(study, setup, b, rec, examples.get(b.name))
            study.set_user_attr(records.BASELINES_ATTR, done)
    study.set_user_attr(records.BASELINES_ATTR, done)
    return done


def _call(pool: WorkerPool, slot: Slot, job: _Scoring, setup):
    stages: list[Stage] = setup.stages
    b = job.baseline
    if job.step == 0:
        return pool.call(slot, "begin", job.number, b.recipe_yaml, stages[0].jobs)
    if job.step < len(stages):
        return pool.call(slot, "advance", job.number, stages[job.step].jobs, job.step == len(stages) - 1)
    return pool.call(slot, "heldout", job.number, b.recipe_yaml, list(range(len(setup.objective_names))))


def _keep(job: _Scoring, result: dict, setup) -> None:
    """One call's result: a stage's scores, or the held-out scores after the last stage."""
    if job.step < len(setup.stages):
        stage = setup.stages[job.step]
        scores = {setup.objective_names[i]: v for (i, _), v in zip(stage.jobs, result["scores"])}
        job.stages.append({"step": stage.step, "scores": scores})
        job.examples = result.get("examples")
    else:
        job.result = result
    job.step += 1


def _record(setup, job: _Scoring, slot: Slot) -> dict:
    latest: dict[str, float] = {}
    for s in job.stages:
        latest.update(s["scores"])
    return {"recipe": job.baseline.recipe_yaml, "params": job.baseline.params, "stages": job.stages,
            "values": [latest[n] for n in setup.objective_names],
            "heldout": job.result["scores"] if job.result else None,
            "heldout_examples": job.result.get("examples") if job.result else None, "trial": None,
            **job.record(slot)}


def _add_trial(study: optuna.Study, setup, baseline: Baseline, rec: dict, examples) -> int:
    """The baseline as a COMPLETE trial of the study, so the sampler and the pruner see it: its params, the
    space's recipe for them (what a search trial at that point would hold), its stages, worker and times."""
    fixed = optuna.trial.FixedTrial(baseline.params)
    setup.space.suggest(fixed)  # records each param's distribution, as a real trial would
    intermediate = {s["step"]: s["scores"][setup.objective_names[0]] for s in rec["stages"] if s["step"] is not None}
    # (a baseline scored by an older mergesearch, resumed, has no worker or timings: when is then now)
    work = {k: rec.get(k) for k in ("worker", "workers", "node", "sources", "sources_plan", "attempts", "timings")}
    record = {"recipe": baseline.point_yaml, "stages": rec["stages"], **work}
    timings = rec.get("timings") or {}
    trial = optuna.trial.FrozenTrial(
        number=-1, trial_id=-1, state=optuna.trial.TrialState.COMPLETE, value=None, values=rec["values"],
        datetime_start=_when(timings.get("dispatched")), datetime_complete=_when(timings.get("finished")),
        params=baseline.params, distributions=fixed.distributions, intermediate_values=intermediate,
        user_attrs={records.BASELINE_ATTR: baseline.name, records.RECORD_ATTR: record}, system_attrs={},
    )
    study.add_trial(trial)
    number = len(study.get_trials(deepcopy=False)) - 1
    if rec["heldout"] is not None:
        held = dict(study.user_attrs.get(records.HELDOUT_ATTR, {}))
        held[str(number)] = rec["heldout"]
        study.set_user_attr(records.HELDOUT_ATTR, held)
    if setup.send_examples and examples is not None:
        setup.pruner.record(number, examples)
    return number


def _when(timestamp: float | None) -> datetime:
    return datetime.fromtimestamp(timestamp) if timestamp is not None else datetime.now()


def baseline_records(study: optuna.Study) -> list[dict]:
    """trials.jsonl lines for the baselines that are not trials of the study (not points of the space)."""
    return [records.baseline_record(name, rec) for name, rec in study.user_attrs.get(records.BASELINES_ATTR, {}).items()
            if rec.get("trial") is None]
