"""A run's set-up: everything checked before the run folder, the study or the workers exist, then the study.

`prepare_run` builds the space, checks the model files it merges (search/spec/model_check.py,
headers only), checks the objectives' specs (the workers build them), the stage plan,
the pruner and the sampler, reads the enqueued recipes and finds the storage; any bad
input is a UserError here, so nothing is left behind.
`open_study` creates the study (or loads it for --resume, checking the spec did
not change) and writes run.json.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from search.study import records
from search.run.baselines import Baseline, choose_baselines
from search.engine import recipe as recipes
from search.engine.errors import UserError
from search.spec.model_check import check_models, writes_tokenizer
from search.study.paired_pruner import PairedPruner
from search.study.pruners import build_pruner
from search.spec.runspec import RunSpec
from search.study.samplers import build_sampler
from search.run.stages import Stage, plan_stages
from search.study.storage import default_url, has_study, mask, open_storage


HAS_HELDOUT_ATTR = "has_heldout"  # study user attr: whether the objectives have a held-out split


@dataclass
class RunSetup:
    spec: RunSpec
    space: Any
    objective_names: list[str]
    directions: list[str]
    multi: bool  # several objectives: a Pareto front, no pruning
    has_heldout: bool | None  # None until the workers have built the objectives (learn_from_workers)
    stages: list[Stage]
    pruner: optuna.pruners.BasePruner
    send_examples: bool  # the paired pruner needs each stage's per-example results
    sampler: optuna.samplers.BaseSampler
    enqueued_params: list[dict]  # enqueued recipes that are not baselines: the first trials
    baselines: list[Baseline]
    storage_url: str
    storage_shown: str  # masked: the only form that is printed or written
    storage: Any  # None until the run folder may be created


def prepare_run(spec: RunSpec, resume: bool) -> RunSetup:
    from objectives import describe_objectives
    from spaces import build_space
    from spaces.model_info import read_model_infos

    run_dir = spec.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: a file is in the way of the run folder; move it or choose another `name:`")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what matters
    infos = read_model_infos(spec.models)
    space = build_space(spec.space, infos)
    # compose stages name intermediate models too: only the spec's own models have files
    check_models(spec.models, [m for m in space.used_models if m in spec.models], spec.allow_pickle,
                 {a: i.vocab_size for a, i in infos.items()}, writes_tokenizer(spec.space), spec.adapters)
    # checked from their specs: the workers build them (lm-eval's tasks take seconds to import and build),
    # and say what only the built objectives know (search/workers/worker.py, learn_from_workers)
    objectives = describe_objectives(spec.objectives, spec.base_dir)
    fidelities = [list(o.fidelities) if o.fidelities else None for o in objectives]
    multi = len(objectives) > 1
    prune = not multi and spec.pruner != "none"
    pruner = build_pruner(spec.pruner if prune else "none", fidelities[0] if prune else None)
    send_examples = isinstance(pruner, PairedPruner)
    if send_examples and not objectives[0].reports_examples:
        # (a metric it cannot compare fails as the workers build the objective, before any trial)
        raise UserError(f"pruner: paired compares trials example by example, which only the lmeval "
                        f"objective reports ({objectives[0].name} is {objectives[0].kind}); use "
                        "successive_halving")
    sampler = build_sampler(spec.sampler_name, spec.seed, len(objectives), spec.sampler_options)
    baselines = choose_baselines(spec, space, infos)
    enqueued_params = []
    for path in spec.enqueue if spec.baselines is False else []:  # else each is a baseline
        stages = recipes.load(path)
        try:
            enqueued_params.append(space.params(stages if len(stages) > 1 else stages[0]))
        except UserError as e:
            raise UserError(f"enqueue: {path} is not a point of this space: {e}") from None
    storage_url = spec.storage or default_url(run_dir)
    setup = RunSetup(
        spec=spec,
        space=space,
        objective_names=[o.name for o in objectives],
        directions=[o.direction for o in objectives],
        multi=multi,
        # objectives without a held-out split would only repeat the search score: nothing to re-score then
        has_heldout=_any_known([o.has_heldout for o in objectives]),
        stages=plan_stages(fidelities, prune),
        pruner=pruner,
        send_examples=send_examples,
        sampler=sampler,
        enqueued_params=enqueued_params,
        baselines=baselines,
        storage_url=storage_url,
        storage_shown=mask(storage_url),
        # no study yet: the database is created once the run folder may be
        storage=None if spec.storage is None and not (run_dir / "study.db").exists() else open_storage(storage_url),
    )
    exists = setup.storage is not None and has_study(setup.storage, spec.name)
    if exists and not resume:
        raise UserError(
            f"{run_dir}: a study named {spec.name!r} already exists in {setup.storage_shown}; "
            "pass --resume to continue it, or choose another `name:`"
        )
    if resume and not exists:
        raise UserError(
            f"--resume: no study named {spec.name!r} in {setup.storage_shown}; run without --resume to start one"
        )
    return setup


def _any_known(flags: list[bool | None]) -> bool | None:
    """True if any is, None while any is unknown (a worker will say), else False."""
    return True if any(flags) else (None if None in flags else False)


def learn_from_workers(setup: RunSetup, info: dict) -> None:
    """What only the built objectives know, from a started worker's info(): whether any has a held-out split."""
    if "has_heldout" in info:
        setup.has_heldout = any(info["has_heldout"])


def open_study(setup: RunSetup, resume: bool) -> optuna.Study:
    spec = setup.spec
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    if setup.storage is None:
        setup.storage = open_storage(setup.storage_url)
    if resume:
        study = optuna.load_study(
            study_name=spec.name, storage=setup.storage, sampler=setup.sampler, pruner=setup.pruner
        )
        asked = len(study.get_trials(deepcopy=False))
        if asked:
            # a seeded sampler started again would draw the points it drew before: go on from a seed moved
            # by the study's size, so a resumed run explores on (and resuming the same study repeats exactly)
            seed = (spec.seed + asked) % 2**32
            setup.sampler = build_sampler(spec.sampler_name, seed, len(setup.directions), spec.sampler_options)
            study = optuna.load_study(
                study_name=spec.name, storage=setup.storage, sampler=setup.sampler, pruner=setup.pruner
            )
        identity = jsonable(spec.identity())
        before = study.user_attrs.get("identity")
        if before is not None and before != identity:
            changed = [k for k in identity if before.get(k) != identity[k]]
            raise UserError(
                f"--resume: the spec's {', '.join(changed)} changed since the study started; "
                "restore them or start a new run under another `name:`"
            )
        if list(study.directions) != [_direction(d) for d in setup.directions]:
            raise UserError("--resume: the objectives' directions changed since the study started; restore them")
        if setup.has_heldout is None:  # as the workers said when the study started (unknown: assume one)
            setup.has_heldout = study.user_attrs.get(HAS_HELDOUT_ATTR, True)
        recover_interrupted(study)
    else:
        study = optuna.create_study(
            study_name=spec.name,
            storage=setup.storage,
            sampler=setup.sampler,
            pruner=setup.pruner,
            directions=setup.directions,
        )
        study.set_user_attr("identity", jsonable(spec.identity()))
        study.set_user_attr("objectives", setup.objective_names)
        study.set_user_attr(HAS_HELDOUT_ATTR, setup.has_heldout)  # for a --resume, before any worker says
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2: nothing the user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(setup.objective_names)  # optuna-dashboard names the objectives by them
        for params in setup.enqueued_params:
            study.enqueue_trial(params, user_attrs={"enqueued": True})
    meta = {
        "name": spec.name,
        "spec": str(spec.spec_path) if spec.spec_path else None,
        "storage": setup.storage_shown,
        "objectives": setup.objective_names,
        "directions": setup.directions,
        "seed": spec.seed,
        "model_paths": spec.models,
        "adapter_paths": spec.adapters,  # the LoRA adapter merged into a model, by alias (its `lora:`)
        "model_names": spec.model_names,  # the public names exports, the report and model cards write
        "stages": [s.step for s in setup.stages],
        # what a model card says of the search (search/results/run_card.py)
        "settings": {"space": spec.space, "sampler": spec.sampler_name, "pruner": spec.pruner, "trials": spec.trials,
                     "timeout": spec.timeout, "objectives": spec.objectives, "allow_pickle": spec.allow_pickle},
    }
    path = spec.run_dir / "run.json"
    if resume:  # what the last session measured (utilization, ...) stays until this one replaces it
        meta = {**_previous_meta(path), **meta}
    records.write_atomic(path, to_json(meta))
    return study


def _previous_meta(path) -> dict:
    try:
        meta = records.read_json(path)
    except (OSError, ValueError):  # missing or corrupt: rewritten whole from the spec and the study
        return {}
    return meta if isinstance(meta, dict) else {}


def recover_interrupted(study: optuna.Study) -> None:
    """Trials a killed driver left RUNNING: mark them FAIL ("interrupted") and enqueue their params again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        requeue(study, t)


def requeue(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """One trial that will not finish now: FAIL ("interrupted", not counted) and its params enqueued again.
    A retry interrupted in turn is requeued the same way, so each chain of retries ends in one finished trial."""
    study._storage.set_trial_user_attr(t._trial_id, records.REASON_ATTR, records.INTERRUPTED)
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    # an enqueued trial caught before its space asked for anything has its params only as fixed_params;
    # one not sampled at all has none, and its re-run is a fresh sample
    params = {**t.system_attrs.get("fixed_params", {}), **t.params}
    study.enqueue_trial(params, user_attrs={"retry_of": t.number})


def _direction(d: str) -> optuna.study.StudyDirection:
    return optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def to_json(x: Any) -> str:
    return json.dumps(x, indent=2, default=str) + "\n"
