"""lm-eval tasks scored on the live, in-memory model.

    - kind: lmeval
      include_path: zoo/tasks            # local task folders (optional; registered tasks work too)
      tasks:                             # names, or mappings with per-task settings
        - fst_search
        - {task: nxt_search, metric: acc, weight: 2, heldout: nxt_heldout}
      metric: acc                        # default metric: an lm-eval metric name, or 'name,filter'
      limit: 256                         # examples per task for a full score, search and held-out (default: all)
      fidelities: [16, 64, 256]          # stages: the first N examples of every task
      subset_seed: null                  # null: stages are prefixes in file order; an int: of a seeded shuffle
      num_fewshot: 0
      batch_size: 64
      apply_chat_template: false         # or a template name
      direction: maximize

The score is the weighted mean over tasks of each task's metric (a group's score
is the mean over its leaf tasks). Held-out twin: a task named `X_search` is
re-scored on `X_heldout` when that task exists; `heldout:` names another. With no
twins at all the objective has no held-out split (`has_heldout` False) and
`score_heldout` returns the full search score.

Cost per trial is what it must be: tasks are built once per objective (datasets
loaded, documents indexed) and `lm_eval.evaluator.evaluate` is called directly,
without `simple_evaluate`'s per-call task loading and environment collection;
each task's requests are built once per stage size and reused. Wrapping the
model in lm-eval's HFLM costs ~0.2 ms, so every call wraps afresh and no
candidate outlives its trial through the objective; what is worth keeping across
trials, the tokenized requests, is kept per tokenizer.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# datasets reads these once, when first imported: they must be set before lm_eval imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval.api.task  # noqa: E402
import lm_eval.evaluator  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from objectives import Objective  # noqa: E402
from objectives.fidelity import check_fidelities, nested_subset  # noqa: E402
from objectives.spec import SpecReader  # noqa: E402
from search.errors import UserError  # noqa: E402

FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples for every trial
HELDOUT_CONVENTION = ("_search", "_heldout")  # X_search is re-scored on X_heldout


@dataclass
class TaskEntry:
    task: str  # a task or group name
    metric: str
    weight: float
    heldout: str | None


@contextmanager
def quiet_lm_eval(level: int = logging.ERROR):
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


class ResidentHFLM(HFLM):
    """HFLM whose (context, continuation) encodings live in a dict shared across wrappers.

    Encodings depend on the tokenizer only, and the same examples come back every
    trial. Progress bars, one per request type per call, are off.
    """

    def __init__(self, *args, encodings: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._encodings = encodings

    def _encode_pair(self, context: str, continuation: str):
        key = (context, continuation)
        if key not in self._encodings:
            self._encodings[key] = super()._encode_pair(context, continuation)
        return self._encodings[key]

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = True):
        return super().generate_until(requests, disable_tqdm=True)


@contextmanager
def no_dataset_progress_bars():
    """`datasets` draws a bar per split it prepares: noise when a worker builds its tasks."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextmanager
def no_progress_bars():
    """Silence the progress bar lm-eval draws while building a task's requests (a worker's log is no terminal)."""
    original = lm_eval.api.task.tqdm
    lm_eval.api.task.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = original


def reuse_requests(task) -> None:
    """Make `task` build its requests once per subset and hand the same ones back on later calls.

    `evaluate` rebuilds every request (few-shot context, templating) on each call,
    though nothing in them depends on the model. The Instances are kept and only
    their response slots, which `evaluate` fills, are emptied between calls.
    """
    build = task.build_all_requests
    built: dict[tuple, list] = {}

    def build_all_requests(*, limit=None, samples=None, **kwargs):
        # chat_template is a method of the (per-call) wrapper; tokenizer_name stands for what it does
        settings = sorted((k, v) for k, v in kwargs.items() if k != "chat_template")
        key = (limit, tuple(samples) if samples else None, repr(settings))
        if key not in built:
            with no_progress_bars():
                build(limit=limit, samples=samples, **kwargs)
            built[key] = task._instances
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = built[key]

    task.build_all_requests = build_all_requests


def parse_tasks(r: SpecReader) -> list[TaskEntry]:
    default_metric = r.str("metric", "acc")
    tasks = r.raw("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise r.fail("tasks", "expected a list of task names, e.g. [fst_search, nxt_search]")
    entries = []
    for i, item in enumerate(tasks):
        where = f"tasks[{i}]"
        if isinstance(item, str):
            item = {"task": item}
        if not isinstance(item, dict) or not isinstance(item.get("task"), str):
            raise r.fail(where, f"expected a task name or {{task: NAME, metric: acc, weight: 1}}, got {item!r}")
        unknown = set(item) - {"task", "metric", "weight", "heldout"}
        if unknown:
            raise r.fail(where, f"unknown field {sorted(unknown)[0]!r}; a task entry has task, metric, weight, heldout")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise r.fail(f"{where}.weight", f"expected a positive number, got {weight!r}")
        metric = item.get("metric", default_metric)
        heldout = item.get("heldout")
        if not isinstance(metric, str) or (heldout is not None and not isinstance(heldout, str)):
            raise r.fail(where, "metric and heldout must be strings")
        entries.append(TaskEntry(item["task"], metric, float(weight), heldout))
    return entries


def task_manager(include_path: list[Path] | None, names: list[str]) -> TaskManager:
    """Index local folders only when they hold every task named (skips a ~4 s index of built-in tasks)."""
    paths = [str(p) for p in include_path] if include_path else None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_subtasks or n in local.all_groups or n in local.all_tags for n in names):
            return local
    return TaskManager(include_path=paths)


def metric_value(results: dict, task: str, metric: str) -> float:
    """The value of `metric` ('acc' or 'acc,none') in lm-eval's results for `task`."""
    row = results["results"][task]
    if "," in metric:
        keys = [metric] if metric in row else []
    else:
        keys = [k for k in row if k.split(",")[0] == metric]  # acc_stderr,none is another metric
        if len(keys) > 1 and f"{metric},none" in keys:
            keys = [f"{metric},none"]
    if len(keys) != 1:
        available = sorted(k for k in row if "," in k and "_stderr" not in k)
        hint = "name one filter, e.g. 'exact_match,strict-match'" if keys else "use one of them"
        raise UserError(f"task {task!r} reports {', '.join(available)}, not one {metric!r}; {hint} as `metric`")
    value = row[keys[0]]
    if not isinstance(value, (int, float)):
        raise UserError(f"task {task!r} metric {keys[0]!r} is {value!r}, not a number")
    return float(value)


class LmEvalObjective(Objective):
    kind = "lmeval"

    def __init__(
        self,
        tasks: list[TaskEntry],
        name: str = "lmeval",
        include_path: list[Path] | None = None,
        limit: int | None = None,
        fidelities: list[int] | None = None,
        subset_seed: int | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 64,
        apply_chat_template: bool | str = False,
        system_instruction: str | None = None,
        direction: str = "maximize",
    ):
        self.entries, self.name, self.direction, self.fidelities = tasks, name, direction, fidelities
        self.limit, self.subset_seed, self.num_fewshot = limit, subset_seed, num_fewshot
        self.batch_size, self.apply_chat_template, self.system_instruction = batch_size, apply_chat_template, system_instruction
        self.last_details: dict[str, float] = {}
        # tokenizer -> its (context, continuation) encodings; weak, so a dropped tokenizer takes them along
        self._encodings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._subsets: dict[tuple, list[int]] = {}  # (task, stage size) -> document indices

        explicit = [e.heldout for e in tasks if e.heldout]
        with quiet_lm_eval(logging.WARNING):
            self.manager = task_manager(include_path, [e.task for e in tasks] + explicit)
            self._check_names([e.task for e in tasks], "tasks")
            self._check_names(explicit, "tasks[].heldout")
            self.search_tasks = self._load([e.task for e in tasks])
        self.heldout_names = self._resolve_heldout_names()
        self.has_heldout = self.heldout_names is not None
        self._heldout_tasks = None  # loaded on first use: most workers never re-score

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "LmEvalObjective":
        r = SpecReader(spec, where, base_dir)
        r.raw("kind")
        include = r.raw("include_path")
        include = [include] if isinstance(include, str) else include
        if include is not None and not (isinstance(include, list) and all(isinstance(p, str) for p in include)):
            raise r.fail("include_path", f"expected a folder or a list of folders, got {include!r}")
        paths = []
        for p in include or []:
            path = Path(p).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_dir():
                raise r.fail("include_path", f"{path} is not a folder; give task folders relative to the run spec's folder")
            paths.append(path)
        chat = r.raw("apply_chat_template", False)
        if not isinstance(chat, (bool, str)):
            raise r.fail("apply_chat_template", f"expected true, false or a template name, got {chat!r}")
        fidelities = check_fidelities(r.raw("fidelities"), where)
        limit = r.int("limit")
        if fidelities and limit and fidelities[-1] > limit:
            raise r.fail("fidelities", f"the last stage ({fidelities[-1]}) exceeds `limit` ({limit})")
        subset_seed = r.raw("subset_seed")
        if subset_seed is not None and (isinstance(subset_seed, bool) or not isinstance(subset_seed, int)):
            raise r.fail("subset_seed", f"expected an integer or null, got {subset_seed!r}")
        obj_args = dict(
            tasks=parse_tasks(r),
            name=r.str("name", "lmeval"),
            include_path=paths or None,
            limit=limit,
            fidelities=fidelities,
            subset_seed=subset_seed,
            num_fewshot=r.int("num_fewshot", None, minimum=0),
            batch_size=r.int("batch_size", 64),
            apply_chat_template=chat,
            system_instruction=r.str("system_instruction"),
            direction=r.direction("maximize"),
        )
        r.done()
        return cls(**obj_args)

    # --- set-up, once per worker ---------------------------------------------------------

    def _resolve_heldout_names(self) -> list[str] | None:
        """Each entry's held-out twin: `heldout:` if given, else X_search -> X_heldout when that task exists."""
        search_suffix, heldout_suffix = HELDOUT_CONVENTION
        names = []
        for e in self.entries:
            twin = e.heldout
            if twin is None and e.task.endswith(search_suffix):
                twin = e.task[: -len(search_suffix)] + heldout_suffix
                twin = twin if self._known(twin) else None
            names.append(twin)
        if not all(names):
            if any(names):
                lonely = next(e.task for e, n in zip(self.entries, names) if n is None)
                logging.getLogger("mergesearch").warning(
                    "objective %r: task %r has no held-out twin, so the objective has no held-out split; "
                    "name it X_search next to an X_heldout task, or give it `heldout: TASK`", self.name, lonely
                )
            return None
        return names

    def _known(self, name: str) -> bool:
        m = self.manager
        return name in m.all_subtasks or name in m.all_groups or name in m.all_tags

    def _check_names(self, names: list[str], field: str) -> None:
        for name in names:
            if not self._known(name):
                close = difflib.get_close_matches(name, self.manager.all_tasks, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else "check the name, or point include_path at its folder"
                raise UserError(f"{field}: lm-eval has no task {name!r}; {hint}")

    def _load(self, names: list[str]) -> dict:
        """Build the tasks (datasets loaded, few-shot set) and remember each entry's leaf tasks."""
        merged = {"tasks": {}, "groups": {}, "group_map": {}, "leaves": {}}
        for name in names:
            with no_dataset_progress_bars():
                loaded = self.manager.load([name])  # one at a time, so a group or tag maps to its own leaves
            merged["tasks"].update(loaded["tasks"])
            merged["groups"].update(loaded["groups"])
            merged["group_map"].update(loaded["group_map"])
            merged["leaves"][name] = list(loaded["tasks"])
        for task in merged["tasks"].values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            reuse_requests(task)
        return merged

    def _heldout(self) -> dict:
        if self._heldout_tasks is None:
            with quiet_lm_eval(logging.WARNING):
                self._heldout_tasks = self._load(self.heldout_names)
        return self._heldout_tasks

    def _wrap(self, model, tokenizer) -> ResidentHFLM:
        encodings = self._encodings.setdefault(tokenizer, {})
        with quiet_lm_eval():
            return ResidentHFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, encodings=encodings)

    # --- per trial -------------------------------------------------------------------------

    def _run(self, loaded: dict, names: list[str], model, tokenizer, size: int | None) -> dict[str, float]:
        """Per-entry metric on the first `size` examples (in the fixed order) of every task."""
        lm = self._wrap(model, tokenizer)
        if self.limit is not None:
            size = self.limit if size is None else min(size, self.limit)
        task_dict = {k: loaded[k] for k in ("tasks", "groups", "group_map")}
        samples = None
        if self.subset_seed is not None:
            # lm-eval scans every document for membership in `samples` on each call: fine for
            # evaluation sets of a few thousand; for larger ones prefer file order (no subset_seed).
            samples = {n: self._subset(n, t, size) for n, t in loaded["tasks"].items()}
            size = None
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(FEWSHOT_SEED)  # identical few-shot contexts every trial
        with quiet_lm_eval():
            results = lm_eval.evaluator.evaluate(
                lm,
                task_dict,
                limit=size,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self.apply_chat_template,
                system_instruction=self.system_instruction,
            )
        scores = {}
        for entry_name, entry in zip(names, self.entries):
            leaves = loaded["leaves"][entry_name]
            scores[entry_name] = sum(metric_value(results, t, entry.metric) for t in leaves) / len(leaves)
        return scores

    def _subset(self, name: str, task, size: int | None) -> list[int]:
        key = (name, size)
        if key not in self._subsets:
            self._subsets[key] = nested_subset(len(task.eval_docs), size, self.subset_seed)
        return self._subsets[key]

    def _combine(self, names: list[str], scores: dict[str, float]) -> float:
        self.last_details = dict(scores)
        total = sum(e.weight for e in self.entries)
        return sum(e.weight * scores[n] for n, e in zip(names, self.entries)) / total

    def task_scores(self, model, tokenizer, fidelity: int | None = None) -> dict[str, float]:
        names = [e.task for e in self.entries]
        return self._run(self.search_tasks, names, model, tokenizer, fidelity)

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        names = [e.task for e in self.entries]
        return self._combine(names, self._run(self.search_tasks, names, model, tokenizer, fidelity))

    def score_heldout(self, model, tokenizer) -> float:
        if not self.has_heldout:
            return self.score(model, tokenizer, None)
        return self._combine(self.heldout_names, self._run(self._heldout(), self.heldout_names, model, tokenizer, None))
