"""Baselines: the merges a person would write by hand, scored in every run beside the search.

Each run scores these, outside the trial budget and never pruned, on every stage and
on the held-out split (those that are points of the space before the first trial, the
others once the trials are done: `before_and_after_the_search`):

- each source model alone, where the space's output has its shape;
- the space's defaults, named in each space's docstring (weights: the linear average
  and TIES at weight 1, density 0.5; slerp: t = 0.5; layout and expansion: the model
  as it is; moe: every model an expert; compose: each stage's default, chained);
- every `enqueue:` recipe.

`baselines: false` in the run spec turns them off; a list of names keeps those.

A baseline that is a point of the space is also added to the study as a COMPLETE
trial marked with the user attribute `baseline`, so the sampler and the pruner learn
from it; nothing counts it as a trial. Every baseline's result is kept on the study
(user attribute `baselines`), so a resumed run does not score it again, and written
to trials.jsonl with `"baseline": <name>`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search.study import records
from search.engine import recipe as recipes
from search.engine.errors import UserError, short
from search.run.stages import Stage
from search.workers.worker_faults import WorkerDied
from search.workers.worker_pool import Slot, WorkerPool
from spaces.base import model_alone

MAX_ATTEMPTS = 2  # a baseline whose worker dies is scored once more, then reported as failed


@dataclass(frozen=True)
class Baseline:
    name: str
    recipe_yaml: str
    params: dict | None  # the point of the space that gives this recipe, when there is one


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
        out.append(Baseline(name, text, _params_or_none(space, stages)))
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
class _Scoring:
    baseline: Baseline
    number: int  # what the worker calls it (negative: never a trial number)
    step: int = 0  # the next call: stage index, then len(stages) for the held-out score
    attempts: int = 0
    started: float = 0.0  # driver clock at this attempt's first call, for trial_timeout
    stages: list = None
    examples: Any = None  # the last stage's per-example results, for the paired pruner
    result: dict = None


def before_and_after_the_search(baselines: list[Baseline]) -> tuple[list[Baseline], list[Baseline]]:
    """The baselines to score before the first trial is asked, and those that can wait until the trials are
    done. Points of the space join the study, so the sampler must see them before trial 0: they go first.
    The others only stand beside the winner in the verdict; scoring them first would hold back the first
    trial (by 17 s on the demo, whose 9 baselines are all outside its space)."""
    return [b for b in baselines if b.params is not None], [b for b in baselines if b.params is None]


def score_baselines(study: optuna.Study, setup, pool: WorkerPool, say, which: list[Baseline] | None = None
                    ) -> dict[str, dict]:
    """Score every baseline (of `which`, default all) not scored yet over the pool's workers; returns
    name -> result, and records each on the study (and as a trial where it is a point of the space). A
    baseline still on its worker after the spec's trial_timeout is given up, and its worker replaced."""
    timeout = setup.spec.trial_timeout
    done: dict[str, dict] = dict(study.user_attrs.get(records.BASELINES_ATTR, {}))
    chosen = {b.name for b in (setup.baselines if which is None else which)}
    todo = collections.deque(  # numbered by their place among all the run's baselines, whichever are scored now
        _Scoring(b, number=-1 - i) for i, b in enumerate(setup.baselines) if b.name in chosen and b.name not in done
    )
    free = collections.deque(pool.live())
    in_flight: dict[Any, tuple[Slot, _Scoring]] = {}
    examples: dict[str, Any] = {}  # the last stage's per-example results, for the paired pruner
    last_call = len(setup.stages) if setup.has_heldout else len(setup.stages) - 1
    while todo or in_flight:
        while todo and free:
            job, slot = todo.popleft(), free.popleft()
            job.attempts, job.step, job.stages, job.started = job.attempts + 1, 0, [], time.monotonic()
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
        if not result["ok"]:
            say(f"baseline {job.baseline.name} failed: {result['error']}")
        else:
            _keep(job, result, setup)
            if job.step <= last_call:
                in_flight[_call(pool, slot, job, setup)] = (slot, job)  # the same worker goes on with the next call
                continue
            done[job.baseline.name] = _record(setup, job)
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


def _record(setup, job: _Scoring) -> dict:
    latest: dict[str, float] = {}
    for s in job.stages:
        latest.update(s["scores"])
    return {"recipe": job.baseline.recipe_yaml, "params": job.baseline.params, "stages": job.stages,
            "values": [latest[n] for n in setup.objective_names], "attempts": job.attempts,
            "heldout": job.result["scores"] if job.result else None,
            "heldout_examples": job.result.get("examples") if job.result else None, "trial": None}


def _add_trial(study: optuna.Study, setup, baseline: Baseline, rec: dict, examples) -> int:
    """The baseline as a COMPLETE trial of the study, so the sampler and the pruner see it."""
    fixed = optuna.trial.FixedTrial(baseline.params)
    setup.space.suggest(fixed)  # records each param's distribution, as a real trial would
    intermediate = {s["step"]: s["scores"][setup.objective_names[0]] for s in rec["stages"] if s["step"] is not None}
    record = {"recipe": rec["recipe"], "stages": rec["stages"], "attempts": rec["attempts"]}
    trial = optuna.trial.create_trial(
        params=baseline.params,
        distributions=fixed.distributions,
        values=rec["values"],
        intermediate_values=intermediate,
        user_attrs={records.BASELINE_ATTR: baseline.name, records.RECORD_ATTR: record},
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


def baseline_records(study: optuna.Study) -> list[dict]:
    """trials.jsonl lines for the baselines that are not trials of the study (not points of the space)."""
    out = []
    for name, rec in study.user_attrs.get(records.BASELINES_ATTR, {}).items():
        if rec.get("trial") is None:
            out.append({"trial": None, "baseline": name, "state": "COMPLETE", "values": rec["values"],
                        "heldout": rec["heldout"], "params": {}, "recipe": rec["recipe"], "stages": rec["stages"],
                        "reason": None})
    return out
