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
      batch_tokens: 1024                 # padded tokens per batch (default 1024 on CPU, 32768 on GPU)
      batch_size: null                   # examples per batch: alone, a fixed count (lm-eval's batching);
                                         # with batch_tokens, a cap
      apply_chat_template: false         # or a template name
      direction: maximize

The score is the weighted mean over tasks of each task's metric (a group's score
is the mean over its leaf tasks). Held-out twin: a task named `X_search` is
re-scored on `X_heldout` when that task exists; `heldout:` names another. With no
twins at all the objective has no held-out split (`has_heldout` False) and
`score_heldout` returns the full search score.

Cost per trial is what it must be: tasks are built once per objective (datasets
loaded, documents indexed) and each task's requests (few-shot contexts, templated
prompts) once per worker, for the largest stage; a call runs only the requests of
the examples it scores, then applies lm-eval's own filters, per-document metrics
and aggregation (what `lm_eval.evaluator.evaluate` does, without its per-call
request building and environment collection). Wrapping the model in lm-eval's
HFLM costs ~0.2 ms, so every call wraps afresh; the (context, continuation)
encodings are kept per tokenizer.

Stages are incremental: the subsets are nested, so after `new_candidate()` (the
worker calls it whenever it builds a candidate) a stage scores only the examples
it adds to the earlier stages of the same candidate and aggregates the
per-example metrics of all of them, which gives the same score as scoring the
whole subset from scratch. Without `new_candidate()` every call scores its whole
subset; held-out scoring never reuses anything.

`example_values()` hands those per-example results of the current candidate to the
paired pruner (search/study/paired_pruner.py), which compares a trial with the best one
example by example; it needs metrics lm-eval aggregates by their mean or as perplexity.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# datasets reads these once, when first imported: they must be set before lm_eval imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval.api.task  # noqa: E402
import lm_eval.utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
# evaluate's own aggregation (per task, then groups), fed our per-example items; private to lm-eval,
# so tests/test_incremental_stages.py checks every stage against a call of `evaluate` itself
from lm_eval.evaluator_utils import _process_results  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from objectives import Objective  # noqa: E402
from objectives.fidelity import nested_subset  # noqa: E402
from objectives.lmeval_spec import TaskEntry, read_lmeval_spec  # noqa: E402
from objectives.token_batches import default_batch_tokens, in_original_order, token_batches  # noqa: E402
from search.engine.errors import UserError  # noqa: E402

FIXED_BATCH = 64  # examples per batch of generation requests, and of all requests without a token budget
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples for every trial
HELDOUT_CONVENTION = ("_search", "_heldout")  # X_search is re-scored on X_heldout


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
    trial. Progress bars, one per request type per call, are off. With `batch_tokens`,
    log-likelihood requests run in batches of at most that many padded tokens
    (objectives/token_batches.py); `batch_size` then caps the examples per batch.
    """

    def __init__(self, *args, encodings: dict, batch_tokens: int | None = None, max_batch: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._encodings = encodings
        self._batch_tokens, self._max_batch = batch_tokens, max_batch

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, override_bs=None):
        if self._batch_tokens is None or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
        # lm-eval's own order (longest first, then by tokens) keeps requests that share a context
        # next to each other, so its one-token-continuation cache still finds them in one batch.
        order = sorted(range(len(requests)), key=lambda i: (-_tokens(requests[i]), tuple(requests[i][1] + requests[i][2])))
        widths = [min(_tokens(requests[i]) - 1, self.max_length) for i in order]  # the input drops the last token
        batches = [[order[j] for j in batch] for batch in token_batches(widths, self._batch_tokens, self._max_batch)]
        fixed, results = self.batch_size_per_gpu, []
        try:
            for batch in batches:
                self.batch_size_per_gpu = len(batch)  # one of lm-eval's batches is exactly ours
                results.append(super()._loglikelihood_tokens([requests[i] for i in batch], disable_tqdm=True))
        finally:
            self.batch_size_per_gpu = fixed
        return in_original_order(batches, results)

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


def _tokens(request) -> int:
    """Context plus continuation tokens of one encoded log-likelihood request."""
    return len(request[1]) + len(request[2])


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


@contextmanager
def templates_compiled_once():
    """lm-eval compiles a task's Jinja templates again for every document it templates
    (`utils.apply_template`): 3 of the 4 s it took to build the demo's 1,024 requests. Compiled once
    per template string and rendered per document, the text is the same."""
    original = lm_eval.utils.apply_template
    compiled = functools.lru_cache(maxsize=256)(lm_eval.utils.env.from_string)
    lm_eval.utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        lm_eval.utils.apply_template = original


@dataclass
class RequestPool:
    """One task's requests, built once for the first `size` examples of the fixed order (None: all).

    The Instances are reused by every call: only their response slots, which the
    scoring fills, are emptied before they are run again.
    """

    size: int | None
    by_doc: dict[int, list[Instance]] = field(default_factory=dict)  # document index -> its requests, in order

    def covers(self, size: int | None) -> bool:
        return self.size is None or (size is not None and size <= self.size)


# Per-example metric items of one candidate: task -> document index -> {(metric, filter): item}.
ExampleItems = dict[str, dict[int, dict[tuple[str, str], object]]]


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


def _item_key(example: dict, metric: str, filter_key: str) -> tuple[str, str]:
    """The (metric, filter) key of `metric` in one example's items: the named filter, else "none"
    or the only one."""
    if filter_key:
        return (metric, filter_key)
    keys = [k for k in example if k[0] == metric]
    return (metric, "none") if (metric, "none") in keys else keys[0]


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
        batch_size: int | None = None,
        batch_tokens: int | None = None,
        apply_chat_template: bool | str = False,
        system_instruction: str | None = None,
        direction: str = "maximize",
    ):
        self.entries, self.name, self.direction, self.fidelities = tasks, name, direction, fidelities
        self.limit, self.subset_seed, self.num_fewshot = limit, subset_seed, num_fewshot
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.apply_chat_template, self.system_instruction = apply_chat_template, system_instruction
        self.last_details: dict[str, float] = {}
        # tokenizer -> its (context, continuation) encodings; weak, so a dropped tokenizer takes them along
        self._encodings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._subsets: dict[tuple, list[int]] = {}  # (task, stage size) -> document indices
        self._pools: dict[tuple, RequestPool] = {}  # (task, template key) -> its requests
        self._candidate: ExampleItems | None = None  # per-example results of the current candidate

        explicit = [e.heldout for e in tasks if e.heldout]
        with quiet_lm_eval(logging.WARNING):
            self.manager = task_manager(include_path, [e.task for e in tasks] + explicit)
            self._check_names([e.task for e in tasks], "tasks")
            self._check_names(explicit, "tasks[].heldout")
            self.search_tasks = self._load([e.task for e in tasks])
        self.heldout_names = self._resolve_heldout_names()
        self.has_heldout = self.heldout_names is not None
        self._heldout_tasks = None  # loaded on first use: most workers never re-score
        self._last_heldout: tuple[dict, list[str], ExampleItems] = ({}, [], {})

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "LmEvalObjective":
        return cls(**read_lmeval_spec(spec, where, base_dir))

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
            if getattr(task, "UNSAFE_CODE", False) or getattr(task, "MULTIMODAL", False):
                raise UserError(f"tasks: {task.config.task!r} runs untrusted code or needs images; "
                                "the lmeval objective scores text tasks only")
        return merged

    def _heldout(self) -> dict:
        if self._heldout_tasks is None:
            with quiet_lm_eval(logging.WARNING):
                self._heldout_tasks = self._load(self.heldout_names)
        return self._heldout_tasks

    def _wrap(self, model, tokenizer) -> ResidentHFLM:
        encodings = self._encodings.setdefault(tokenizer, {})
        budget = self.batch_tokens
        if budget is None and self.batch_size is None:
            budget = default_batch_tokens(model.device.type)
        with quiet_lm_eval():
            return ResidentHFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size or FIXED_BATCH,
                                encodings=encodings, batch_tokens=budget, max_batch=self.batch_size)

    def eval_batch_tokens(self, device_type: str) -> int | None:
        """The token budget of a batch (an example longer than it, alone, is not foreseen); with a fixed
        batch_size alone the widths are the examples', unknown before they are tokenized: None."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return default_batch_tokens(device_type) if self.batch_size is None else None

    def prepare(self) -> None:
        """Build every search task's requests for the largest stage now: a worker calls this as it starts,
        so its first trial does not. A chat template needs the candidate's tokenizer: then the first call does."""
        if self.apply_chat_template:
            return
        size = self.fidelities[-1] if self.fidelities else None
        if self.limit is not None:
            size = self.limit if size is None else min(size, self.limit)
        for name, task in self.search_tasks["tasks"].items():
            self._pool(name, task, None, size, {})

    # --- per trial -------------------------------------------------------------------------

    def new_candidate(self) -> None:
        """A new candidate is resident: forget the last one's per-example results, reuse from now on."""
        self._candidate = {}

    def _run(self, loaded: dict, names: list[str], model, tokenizer, size: int | None,
             items: ExampleItems) -> dict[str, float]:
        """Per-entry metric on the first `size` examples (in the fixed order) of every task.

        `items` holds per-example results already scored for this candidate; only the
        examples missing from it are run, and it is extended with them.
        """
        lm = self._wrap(model, tokenizer)
        if self.limit is not None:
            size = self.limit if size is None else min(size, self.limit)
        subsets, pools = {}, {}
        for name, task in loaded["tasks"].items():
            pools[name] = self._pool(name, task, lm, size, items)
            subsets[name] = self._subset(name, task, size)
        todo = {n: [d for d in subsets[n] if d not in items.get(n, {})] for n in subsets}
        self._score_examples(lm, loaded["tasks"], pools, todo, items)

        acc = {}
        for name, task in loaded["tasks"].items():
            raw = defaultdict(list)  # as evaluate collects them: per (metric, filter), in document order
            for d in subsets[name]:
                for key, value in items[name][d].items():
                    raw[key].append(value)
            acc[name] = {"task": task, "raw_metrics": raw, "logged_samples": []}
        with quiet_lm_eval():
            results = _process_results(acc, loaded["groups"], 0)._to_eval_results()
        scores = {}
        for entry_name, entry in zip(names, self.entries):
            leaves = loaded["leaves"][entry_name]
            scores[entry_name] = sum(metric_value(results, t, entry.metric) for t in leaves) / len(leaves)
        return scores

    def _pool(self, name: str, task, lm, size: int | None, items: ExampleItems) -> RequestPool:
        """The task's requests, covering `size`; built once, for the largest stage, so that every
        stage's examples have the same few-shot contexts and prompts whatever stage scores them."""
        template = getattr(lm, "tokenizer_name", "") if self.apply_chat_template else ""
        pool = self._pools.get((name, template))
        if pool is not None and pool.covers(size):
            return pool
        if size is not None and self.fidelities:
            largest = self.fidelities[-1] if self.limit is None else min(self.fidelities[-1], self.limit)
            size = max(size, largest)
        if self.subset_seed is None:
            limit, samples = size, None
        else:
            limit, samples = None, self._subset(name, task, size)
        task.set_fewshot_seed(FEWSHOT_SEED)  # identical few-shot contexts in every worker
        with no_progress_bars(), quiet_lm_eval(), templates_compiled_once():
            task.build_all_requests(
                limit=limit,
                samples=samples,
                rank=0,
                world_size=1,
                system_instruction=self.system_instruction,
                apply_chat_template=bool(self.apply_chat_template),
                fewshot_as_multiturn=False,
                chat_template=lm.apply_chat_template if self.apply_chat_template else None,
                tokenizer_name=template,
            )
        pool = RequestPool(size)
        for instance in task.instances:  # doc_id: position among `samples` when given
            doc = samples[instance.doc_id] if samples else instance.doc_id
            pool.by_doc.setdefault(doc, []).append(instance)
        for requests in pool.by_doc.values():
            requests.sort(key=lambda r: r.idx)
        self._pools[(name, template)] = pool
        for scored in (items, self._candidate or {}):
            scored.pop(name, None)  # scored with the old pool's requests: score again
        return pool

    def _score_examples(self, lm, tasks: dict, pools: dict, todo: dict[str, list[int]], items: ExampleItems) -> None:
        """Run the requests of the `todo` examples, all tasks together per request type (as
        `evaluate` does), then lm-eval's filters and per-document metrics into `items`."""
        by_type = defaultdict(list)
        for name, docs in todo.items():
            for d in docs:
                for request in pools[name].by_doc[d]:
                    request.resps, request.filtered_resps = [], {}
                    by_type[request.request_type].append(request)
        for request_type, requests in by_type.items():
            cloned = [r for r in requests for _ in range(r.repeats)]
            for response, request in zip(getattr(lm, request_type)(cloned), cloned, strict=True):
                request.resps.append(response)
        for name, docs in todo.items():
            if not docs:
                continue
            task, by_doc = tasks[name], pools[name].by_doc
            task._instances = [r for d in docs for r in by_doc[d]]
            task.apply_filters()
            done = items.setdefault(name, {})
            for filter_key in by_doc[docs[0]][0].filtered_resps:
                for d in docs:
                    requests = by_doc[d]
                    metrics = task.process_results(requests[0].doc, [r.filtered_resps[filter_key] for r in requests])
                    example = done.setdefault(d, {})
                    for metric, value in metrics.items():
                        example[(metric, filter_key)] = value

    def _subset(self, name: str, task, size: int | None) -> list[int]:
        key = (name, size)
        if key not in self._subsets:
            self._subsets[key] = nested_subset(len(task.eval_docs), size, self.subset_seed)
        return self._subsets[key]

    def _combine(self, names: list[str], scores: dict[str, float]) -> float:
        self.last_details = dict(scores)
        total = sum(e.weight for e in self.entries)
        return sum(e.weight * scores[n] for n, e in zip(names, self.entries)) / total

    def _search_items(self) -> ExampleItems:
        """The current candidate's results to extend, or a throwaway when no candidate was announced."""
        return self._candidate if self._candidate is not None else {}

    def task_scores(self, model, tokenizer, fidelity: int | None = None) -> dict[str, float]:
        names = [e.task for e in self.entries]
        return self._run(self.search_tasks, names, model, tokenizer, fidelity, self._search_items())

    def example_aggregations(self, loaded: dict | None = None, names: list[str] | None = None) -> dict[str, str]:
        """Each leaf task's aggregation of its entry's metric, "mean" or "perplexity" (what can be
        compared example by example); a UserError names any other. Search tasks unless `loaded`."""
        from lm_eval.api import metrics

        loaded = loaded or self.search_tasks
        known = {metrics.mean: "mean", metrics.perplexity: "perplexity"}
        out = {}
        for entry, name in zip(self.entries, names or [e.task for e in self.entries]):
            metric = entry.metric.split(",")[0]
            for leaf in loaded["leaves"][name]:
                fn = loaded["tasks"][leaf].aggregation().get(metric)
                if fn not in known:
                    raise UserError(f"pruner: paired compares scores that average their examples (or lm-eval's "
                                    f"perplexity); task {leaf!r} aggregates {metric!r} by "
                                    f"{getattr(fn, '__name__', fn)!r}; use successive_halving")
                out[leaf] = known[fn]
        return out

    def example_values(self) -> dict:
        """The current candidate's per-example results behind its last `score` (the examples of its
        stages so far), per search task with the task's aggregation and share of the score."""
        return self._example_values(self.search_tasks, [e.task for e in self.entries], self._search_items())

    def heldout_example_values(self) -> dict | None:
        """The per-example results behind the last `score_heldout`, in the form of `example_values`;
        None when a task's metric does not average its examples (no paired comparison then)."""
        loaded, names, items = self._last_heldout
        try:
            return self._example_values(loaded, names, items)
        except UserError:
            return None

    def _example_values(self, loaded: dict, names: list[str], items: ExampleItems) -> dict:
        aggregations = self.example_aggregations(loaded, names)
        total = sum(e.weight for e in self.entries)
        out = {}
        for entry, name in zip(self.entries, names):
            metric, _, filter_key = entry.metric.partition(",")
            leaves = loaded["leaves"][name]
            for leaf in leaves:
                values = {d: float(example[_item_key(example, metric, filter_key)])
                          for d, example in items.get(leaf, {}).items()}
                out[leaf] = {"aggregation": aggregations[leaf], "weight": entry.weight / total / len(leaves),
                             "values": values}
        return out

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        return self._combine([e.task for e in self.entries], self.task_scores(model, tokenizer, fidelity))

    def score_heldout(self, model, tokenizer) -> float:
        # fresh results, never the search's: the held-out score must not lean on what the search scored
        if self.has_heldout:
            loaded, names = self._heldout(), self.heldout_names
        else:
            loaded, names = self.search_tasks, [e.task for e in self.entries]
        items: ExampleItems = {}
        self._last_heldout = (loaded, names, items)
        return self._combine(names, self._run(loaded, names, model, tokenizer, None, items))
