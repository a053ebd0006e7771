"""A search worker: a process (local, or a Ray actor) that builds candidates in memory and scores them.

The source models are loaded once (by the Materializer, lazily, then resident)
and the objectives are built once; each trial only materializes a candidate and
runs the objective stages. Workers never touch the Optuna study: each call
returns scores and timings, and the driver decides.

A trial is scored in stages so that the driver can prune between them: `begin`
builds the candidate and scores the first stage, `advance` scores the next stage
on the candidate still resident from `begin`. A worker keeps one candidate at a
time; the next `begin` replaces it. Each new candidate is announced to the
objectives (`new_candidate`), so a stage scores only the examples it adds to the
earlier stages of the same candidate.

Calls never raise for a bad candidate: an exception in materialize or score is
returned as {"ok": False, "error": ...}, so the worker stays up for the next trial.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from search.engine.omp_wait import sleep_when_idle

sleep_when_idle()  # a Ray actor imports this module before torch (search/engine/omp_wait.py)

# A stage: the (objective index, fidelity) pairs scored in one round trip.
StageJobs = list[tuple[int, Any]]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_line(e: BaseException) -> str:
    """'TypeName: first line of the message', for a reason that fits one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


class _Laps:
    """Seconds since the last lap, kept under a name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.last = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name], self.last = round(now - self.last, 3), now


def _import_model_code(models: dict[str, str]) -> None:
    """Import transformers' modeling code for the models' types now (seconds, on a small machine), so that
    the first candidate's live model does not wait for it. Best effort: a trial reports any real error."""
    import json

    try:
        import transformers
        from transformers.initialization import no_init_weights  # noqa: F401 (what building a model imports)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        for path in models.values():
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
            if model_type:
                MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.for_model(model_type))]
    except Exception:
        pass


def eval_tokens(objectives: list, device: str) -> int:
    """Padded tokens of the largest forward pass the objectives run (an objective that cannot say: the default)."""
    from search.engine.memory_estimate import DEFAULT_EVAL_TOKENS

    sizes = [o.eval_batch_tokens(device.split(":")[0]) for o in objectives]
    return max([DEFAULT_EVAL_TOKENS if t is None else t for t in sizes], default=0)


class Worker:
    """Run by search/workers/worker_pool.py as a local process or a Ray actor; plain Python, so it can be tested
    and read without either."""

    def __init__(
        self,
        worker_id: str,
        models: dict[str, str],
        objective_specs: list[dict],
        base_dir: str,
        seed: int | None = None,
        allow_pickle: bool = False,
        threads: int | None = None,
        send_examples: bool = False,
        adapters: dict[str, str] | None = None,
    ):
        # what the start costs, step by step (info()["startup_s"]; bench/bench_first_trial.py prints it)
        self.startup_s: dict[str, float] = {"began": time.time()}
        lap = _Laps(self.startup_s)
        import torch

        from objectives import build_objectives
        from search.engine.errors import UserError
        from search.engine.materialize import Materializer

        lap("imports")
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.seed = seed
        self.materializer = None  # made once the objectives say how large a batch they evaluate
        self.trial: int | None = None
        self.model = None
        self.tokenizer = None
        self.busy_s = 0.0
        # the paired pruner compares trials example by example: send the first objective's per-example results
        self.send_examples = send_examples
        # The driver checks the objectives' specs only; building them is the workers' (once each): what only
        # the built objectives can say wrong (an unknown lm-eval task, a metric the paired pruner cannot
        # compare) is kept here and handed to the driver by info(), which says it in one line.
        self.objectives, self.startup_error = [], None
        try:
            self.objectives = build_objectives(objective_specs, Path(base_dir))
            if send_examples:
                self.objectives[0].example_aggregations()
            lap("objectives")
            for objective in self.objectives:
                objective.prepare()  # lm-eval's requests: now, while the driver is busy, not in the first trial
            lap("requests")
        except UserError as e:
            self.startup_error = str(e)
        # the memory plan counts the largest forward pass any objective runs (search/engine/memory_estimate.py);
        # a model's LoRA adapter (alias -> folder) is merged in once, when the model first loads
        self.materializer = Materializer(models, self.device, adapters=adapters, allow_pickle=allow_pickle,
                                         eval_tokens=eval_tokens(self.objectives, self.device))
        _import_model_code(models)
        lap("model code")

    def info(self) -> dict[str, Any]:
        import socket

        ray = sys.modules.get("ray")  # a Ray actor's node; a local process has its host only
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
        return {"worker": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(), "node": node,
                "device": self.device, **self._sources_info(), "startup_error": self.startup_error,
                "startup_s": self.startup_s,
                "has_heldout": [getattr(o, "has_heldout", True) for o in self.objectives]}

    def _sources_info(self) -> dict[str, Any]:
        """How this worker keeps its sources (search/engine/memory_plan.py), and why, for the log and trials."""
        try:
            plan = self.materializer.memory_plan()
        except Exception as e:  # a model folder that cannot be read fails the trials that use it, not the start
            return {"sources": None, "sources_plan": one_line(e)}
        return {"sources": plan.mode, "sources_plan": plan.describe()}

    # ---- one trial, stage by stage -----------------------------------------

    def _raised_plan(self) -> dict[str, Any]:
        """The memory plan again when a recipe raised it (a larger output than the sources', intermediates):
        printed on the worker's stderr and handed back with the trial."""
        if not self.materializer.plan_raised:
            return {}
        self.materializer.plan_raised = False
        line = self.materializer.memory_plan().describe()
        print(f"worker {self.worker_id}: memory estimate raised for this recipe: {line}", file=sys.stderr, flush=True)
        return {"sources_plan": line}

    def _drop(self) -> None:
        self.trial, self.model, self.tokenizer = None, None, None

    def _new_candidate(self) -> None:
        # the objectives may reuse a stage's per-example results in the next stage of the
        # same candidate; the resident model object is the same for every candidate, so tell them
        for objective in self.objectives:
            objective.new_candidate()

    def _score(self, jobs: StageJobs) -> list[float]:
        import torch

        with torch.inference_mode():
            return [float(self.objectives[i].score(self.model, self.tokenizer, fidelity)) for i, fidelity in jobs]

    def _scored(self, t0: float, scores: list[float], **timings: float) -> dict[str, Any]:
        examples = self.objectives[0].example_values() if self.send_examples else None
        return self._result(t0, ok=True, scores=scores, examples=examples, **timings)

    def begin(self, trial: int, recipe_yaml: str, jobs: StageJobs) -> dict[str, Any]:
        """Build the candidate of `trial` and score its first stage."""
        from search.engine import recipe as recipes

        t0 = time.perf_counter()
        self._drop()
        try:
            stages = recipes.loads(recipe_yaml, where=f"trial {trial}")
            model = self.materializer.materialize(stages, seed=self.seed)
            self.tokenizer = self.materializer.tokenizer(stages)
            self._new_candidate()
            self.model, self.trial = model, trial
            t1 = time.perf_counter()
            scores = self._score(jobs)
        except Exception as e:  # a bad candidate fails its trial, not the worker
            self._drop()
            return self._result(t0, ok=False, error=one_line(e), traceback=traceback.format_exc(limit=8))
        t2 = time.perf_counter()
        return self._scored(t0, scores, materialize_s=t1 - t0, score_s=t2 - t1, **self._raised_plan())

    def advance(self, trial: int, jobs: StageJobs, last: bool = False) -> dict[str, Any]:
        """Score the next stage on the candidate `begin` left resident."""
        t0 = time.perf_counter()
        if self.trial != trial:
            return self._result(t0, ok=False, error=f"worker holds no candidate for trial {trial}")
        try:
            scores = self._score(jobs)
        except Exception as e:
            self._drop()
            return self._result(t0, ok=False, error=one_line(e), traceback=traceback.format_exc(limit=8))
        result = self._scored(t0, scores, score_s=time.perf_counter() - t0)
        if last:
            self._drop()
        return result

    def release(self) -> None:
        self._drop()

    def heldout(self, trial: int, recipe_yaml: str, objective_indices: list[int]) -> dict[str, Any]:
        """Score a finished trial again on the held-out split of each objective."""
        import torch

        from search.engine import recipe as recipes

        t0 = time.perf_counter()
        self._drop()
        try:
            stages = recipes.loads(recipe_yaml, where=f"trial {trial}")
            model = self.materializer.materialize(stages, seed=self.seed)
            tokenizer = self.materializer.tokenizer(stages)
            self._new_candidate()
            with torch.inference_mode():
                scores = [float(self.objectives[i].score_heldout(model, tokenizer)) for i in objective_indices]
            # the first objective's per-example results, where it keeps them: the run's paired margin
            examples = getattr(self.objectives[0], "heldout_example_values", lambda: None)()
        except Exception as e:
            return self._result(t0, ok=False, error=one_line(e), traceback=traceback.format_exc(limit=8))
        return self._result(t0, ok=True, scores=scores, examples=examples)

    def _result(self, t0: float, **fields: Any) -> dict[str, Any]:
        busy = time.perf_counter() - t0
        self.busy_s += busy
        return {"busy_s": busy, "worker_busy_total_s": self.busy_s, **fields}
