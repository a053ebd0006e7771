"""Materializer: turn a recipe into tensors or a live model, in memory, as mergekit 0.1.5 builds it.

Source models are loaded once, on first use, and kept: memory-mapped on the CPU
(shared with the node's other workers), copied to the GPU when they fit there, or
left mapped and streamed to it job by job when they do not (memory_plan.py,
streaming.py); every mode gives the same bits. `state_dict()`
gives exactly the tensors `mergekit-yaml` would write (same names, shapes,
dtypes and bytes). `materialize()` gives a live transformers model for search
workers: a candidate is written into the preallocated parameters of a resident
model of its shape, and tensors the recipe takes unchanged point at the source
tensors instead of being copied, so a candidate costs one pass over the tensors
it actually merges and memory stays flat from one candidate to the next.

Multi-stage recipes (mergekit-multi) run stage by stage; a later stage names an
earlier one by its `name:`. Intermediates stay in memory, in the dtype
mergekit-multi would have written them in, so the next stage sees the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from search.engine.checkpoint_layout import convert_tensors, converted_infos
from search.engine.errors import UserError
from search.engine.lora import Adapter, check_fits, split_adapter
from search.engine.lora_merge import load_adapter, with_adapter
from search.engine.hf_config import hf_config
from search.engine.memory_estimate import SORT_BYTES, MemoryNeed, source_shapes, worker_need
from search.engine.memory_plan import STREAMED, MemoryPlan, forced_mode, plan_memory
from search.engine.methods import Context, Inputs, StatCache
from search.engine.methods.lanes import lane_count
from search.engine.methods.task_arithmetic import pieces_in_flight
from search.engine.plan import Job, ModelInfo, StagePlan, plan_stage, promoted_dtype
from search.engine.recipe import MoERecipe, Recipe, as_stages, check_stage_names
from search.engine.sources import (
    CONVERT_PIECE,
    SourceModel,
    TensorInfo,
    convert_into,
    load_source,
    read_config,
    read_tensor_infos,
    source_bytes,
)
from search.engine.stage_tokenizers import StageTokenizers
from search.engine.streaming import SourceStream, StreamedJobs
from search.engine.tokenizer_config import stage_setting

if TYPE_CHECKING:  # transformers is imported where it is used: `mergesearch merge` rarely needs it
    import transformers


def resolve_adapter_path(name: str, adapter: str, model_map: dict[str, str]) -> Path:
    """The local folder of the adapter of `name` (`model+adapter`): mapped, or a folder of that name."""
    if adapter in model_map:
        return Path(model_map[adapter]).expanduser()
    if Path(adapter).expanduser().is_dir():
        return Path(adapter).expanduser()
    raise UserError(
        f"model {name}: adapter {adapter} is neither mapped nor a local folder; "
        f"pass --model-map {adapter}=/path/to/adapter or use a local path"
    )


def resolve_model_path(name: str, model_map: dict[str, str]) -> Path:
    """The local folder a recipe's model name stands for: mapped, or a folder of that name."""
    if name in model_map:
        path = Path(model_map[name]).expanduser()
        if not path.is_dir():
            raise UserError(f"model {name}: mapped to {path}, which does not exist; fix the path in --model-map")
        return path
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            return path
    except OSError:  # a name longer than the file system allows, say: there is no such folder
        pass
    raise UserError(
        f"model {name}: neither mapped nor a local folder (no hub is reachable); "
        f"pass --model-map {name}=/path/to/folder or use a local path"
    )


# Scratch slots (Context.scratch) of converted inputs: slot + input index, and slot - 1 for the
# float32 piece a conversion goes through; clear of the methods' own.
_CONVERSION_SLOTS = 100


class Materializer:
    def __init__(
        self,
        models: dict[str, str | Path],
        device: str = "cpu",
        *,
        adapters: dict[str, str | Path] | None = None,
        allow_pickle: bool = False,
        cache_bytes: int | None = None,
        resident_models: int = 2,
        keep_converted: bool = True,
        memory_limit: int | None = None,
        sources: str | None = None,
        stage_sources: bool = False,
        eval_tokens: int = 0,
        one_shot: bool = False,
    ):
        """models: name as written in recipes -> local HF folder (names that are local
        folders themselves need no entry); a name `model+adapter` reads both parts so, as mergekit
        does. adapters: name -> a LoRA adapter folder merged into that model (a run spec's `lora:`).
        cache_bytes bounds the per-pair statistics
        kept across candidates (None: sized by the memory plan from what is left);
        resident_models bounds the preallocated live models (one per output shape).
        keep_converted: keep each source tensor converted to a recipe's `dtype:` for the
        next candidate (a copy of the sources in that dtype); False converts tensor by
        tensor into reused buffers. memory_limit: bytes this process may use (default:
        MERGESEARCH_MEMORY_LIMIT, else the device's free memory and what the process holds);
        sources: "streamed" or "resident" forces the mode instead. stage_sources: copy
        streamed sources into staging buffers on the device job by job (always done when
        streaming to a GPU; True does it on the CPU too: a GPU's streamed path, run
        without a GPU). eval_tokens: padded tokens of the largest forward pass the caller
        evaluates candidates with (its share of the memory plan). one_shot: one build
        (`mergesearch merge`): nothing is kept for a next candidate (no cache, no converted
        sources), and each source tensor's pages are let go once its job is done."""
        self.model_map = {k: str(v) for k, v in models.items()}
        self.adapters = {k: str(v) for k, v in (adapters or {}).items()}
        self._adapters: dict[str, tuple[Adapter, dict[str, torch.Tensor]]] = {}
        self.device = device
        self.allow_pickle = allow_pickle
        self._cache_bytes = 0 if one_shot else cache_bytes
        self.cache = StatCache(self._cache_bytes or 0)
        self._sources: dict[str, SourceModel] = {}
        self._infos: dict[str, ModelInfo] = {}
        self._tokenizers = StageTokenizers(self.path, lambda name: self.info(name).config.get("vocab_size"), self.cache)
        self._resident: OrderedDict[str, _ResidentModel] = OrderedDict()
        self._resident_limit = resident_models
        self._buffers: dict = {}  # scratch buffers, reused by every pass of every candidate
        self.keep_converted = keep_converted and not one_shot
        self.one_shot = one_shot
        self.eval_tokens = eval_tokens
        self.memory_limit = memory_limit
        self.plan_raised = False  # the memory plan grew for a recipe (memory_plan); the caller may say so
        self._forced_mode = sources
        self._memory: MemoryPlan | None = None
        self._runtime: int | None = None  # the process's own memory when the plan was made
        self._stage_sources = stage_sources
        self._stream: SourceStream | None = None

    # ---- sources -----------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The folder of a model's config and weights (the base model's, for `model+adapter`)."""
        return resolve_model_path(split_adapter(name)[0], self.model_map)

    def adapter_path(self, name: str) -> Path | None:
        """The LoRA adapter folder merged into model `name`, or None."""
        if name in self.adapters:
            return Path(self.adapters[name]).expanduser()
        _, adapter = split_adapter(name)
        return None if adapter is None else resolve_adapter_path(name, adapter, self.model_map)

    def adapter(self, name: str) -> tuple[Adapter, dict[str, torch.Tensor]] | None:
        """Model `name`'s adapter and its weights, read once; None for a model without one."""
        folder = self.adapter_path(name)
        if folder is None:
            return None
        if name not in self._adapters:
            self._adapters[name] = load_adapter(split_adapter(name)[1] or name, folder, self.allow_pickle)
        return self._adapters[name]

    def source(self, name: str) -> SourceModel:
        """A source model, loaded on first use and kept (on the device, or mapped on the host when streamed);
        its adapter, if it has one, merged in once."""
        if name not in self._sources:
            where = "cpu" if self.streamed else self.device  # streamed: mapped on the host, copied per job
            adapter = self.adapter(name)
            # an adapter is merged on the CPU, as mergekit does, then the result goes where sources live
            src = load_source(name, self.path(name), where if adapter is None else "cpu", self.allow_pickle)
            convert_tensors(src.config, src.tensors)
            self._sources[name] = src if adapter is None else with_adapter(src, *adapter, where)
        return self._sources[name]

    def memory_plan(self, plans: list | None = None) -> MemoryPlan:
        """How the sources are kept and what the worker's memory holds (search/engine/memory_plan.py), decided
        before the first source loads from the sources of the model map (and of `plans`). A later recipe
        that needs more (a larger output, intermediates, a dtype conversion) raises the estimate (and
        `plan_raised`); the mode stays as decided."""
        if self._memory is not None and not plans:
            return self._memory
        need = memory_need(self, plans)
        if self._memory is None:
            mode = forced_mode(self._forced_mode, str(self.device)) if self._forced_mode is not None else None
            self._memory = plan_memory(need, str(self.device), self.memory_limit, mode=mode)
            if mode is not None:
                self._memory = dataclasses.replace(self._memory, limit_from="forced")
        else:
            kept = need.streamed() if self._memory.mode == STREAMED else need
            if kept.required > self._memory.need.required:
                self._memory = dataclasses.replace(plan_memory(need, str(self.device), self.memory_limit, mode=self._memory.mode),
                                                   limit_from=self._memory.limit_from)
                self.plan_raised = True
        if self._cache_bytes is None:
            self.cache.max_bytes = self._memory.cache_bytes
        return self._memory

    @property
    def streamed(self) -> bool:
        return self.memory_plan().mode == STREAMED

    def _keeps_converted(self) -> bool:
        return self.keep_converted and not self.streamed  # streamed: no converted copy of the sources

    def add_source(self, source: SourceModel) -> None:
        """Make an already loaded model available to recipes under `source.name` (kept resident)."""
        self._sources[source.name] = source
        self._infos.pop(source.name, None)

    def info(self, name: str) -> ModelInfo:
        """Config and tensor shapes of a source, from its files' headers (no tensor is read)."""
        if name not in self._infos:
            if name in self._sources:
                src = self._sources[name]
                tensors = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in src.tensors.items()}
                self._infos[name] = ModelInfo(name, src.config, tensors)
            else:
                path = self.path(name)
                config = read_config(name, path)
                tensors = converted_infos(config, read_tensor_infos(name, path, self.allow_pickle))
                adapter = self.adapter(name)
                if adapter is not None:  # it changes tensors, never their shapes or dtypes
                    lora, weights = adapter
                    shapes = {k: tuple(v.shape) for k, v in weights.items()}
                    check_fits(lora, shapes, {k: t.shape for k, t in tensors.items()}, split_adapter(name)[0])
                self._infos[name] = ModelInfo(name, config, tensors)
        return self._infos[name]

    # ---- planning ----------------------------------------------------------------

    def plan(self, recipe: Recipe | list[Recipe]) -> list[StagePlan | MoERecipe]:
        """Validate every stage against its models before any tensor work."""
        stages = as_stages(recipe)
        check_stage_names(stages)
        plans: list[StagePlan | MoERecipe] = []
        earlier: dict[str, ModelInfo] = {}
        named: dict[str, Recipe] = {}
        for k, stage in enumerate(stages):
            where = "recipe" if len(stages) == 1 else f"recipe (document {k + 1})"
            if isinstance(stage, MoERecipe):
                if k != len(stages) - 1:
                    raise UserError(f"{where}: a mergekit-moe stage must be the last stage; move it to the end")
                plans.append(stage)
                continue
            info = lambda n: earlier[n] if n in earlier else self.info(n)  # noqa: E731
            vocabulary = self._tokenizers.vocabulary(stage, named, lambda n: earlier[n].config.get("vocab_size"), where)
            plan = plan_stage(stage, info, where, vocabulary_size=vocabulary.size if vocabulary else None)
            if vocabulary is not None:
                plan.vocabulary = vocabulary
                for job in plan.jobs:  # what mergekit would fail on while merging, found now
                    if job.vocabulary_axis is not None:
                        rows = [info(m).tensors[n].shape[job.vocabulary_axis] for m, n in zip(job.models, job.tensors)]
                        self._tokenizers.row_plan(plan, job, rows, where)
            if stage.chat_template:  # a template mergekit could not set, or `auto` left to chance: refused now
                self._tokenizers.stage_origin(stage, named, where)
            if stage.name:
                earlier[stage.name] = plan.output
                named[stage.name] = stage
            plans.append(plan)
        return plans

    # ---- building ----------------------------------------------------------------

    def state_dict(
        self, recipe: Recipe | list[Recipe], seed: int | None = None, out: dict[str, torch.Tensor] | None = None,
        pages=None,
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config.json as a dict, output tensors by name), exactly as mergekit would write them.

        Tensors a recipe takes unchanged are the resident source tensors themselves:
        read them, do not modify them in place.

        out: optional buffers, by output name, of the final stage's shapes and dtypes
        (`plan(recipe)[-1].output.tensors`), e.g. views of memory-mapped safetensors
        files (search/engine/output.py's MappedShards): each result is computed into, or
        copied into, its buffer. `mergesearch merge` uses it to skip a copy of the
        whole model. pages: optional, with release(name), called for each buffer of `out` once its
        tensor is written (MappedShards: the process then holds one output tensor's pages at a time)."""
        plans = self.plan(recipe)
        return self._build(plans, seed, outputs=None if out is None else _GivenBuffers(out, pages))

    def materialize(self, recipe: Recipe | list[Recipe], seed: int | None = None) -> transformers.PreTrainedModel:
        """A live model in eval mode. Models of the same output shape are one resident model,
        rewritten in place: do not keep a reference to the previous candidate's model."""
        plans = self.plan(recipe)
        final = plans[-1]
        if isinstance(final, MoERecipe):
            for resident in self._resident.values():  # drop the last mixture's tensors before making the next
                resident.release()
            config, tensors = self._build(plans, seed, outputs=None)
            if "auto_map" in config:  # DeepSeek-MoE: its model is remote code transformers 5 lacks
                raise UserError(
                    f"{config['architectures'][0]}: mergekit-moe writes this recipe as a model whose code transformers 5 "
                    "lacks, so it cannot be scored; build it with `mergesearch merge`, or use no shared expert (a Mixtral)"
                )
            resident = self._resident_model(config, list(tensors), next(iter(tensors.values())).dtype)
            if resident is None:
                return _model_from_tensors(config, tensors, self.device)
            for name, tensor in tensors.items():
                resident.assign(name, tensor, aliased=True)
            return resident.model
        dtype = final.output.tensors[final.jobs[0].name].dtype  # the dtype mergekit would store
        resident = self._resident_model(final.config, [j.name for j in final.jobs], dtype)
        if resident is None:  # names that do not map onto transformers' parameters
            config, tensors = self._build(plans, seed, outputs=None)
            return _model_from_tensors(config, tensors, self.device)
        self._build(plans, seed, outputs=resident)
        return resident.model

    def tokenizer(self, recipe: Recipe | list[Recipe]) -> transformers.PreTrainedTokenizerBase:
        """The tokenizer mergekit would save with the merge: the one a tokenizer setting builds, else the base
        model's, with the chat template a `chat_template:` sets. The same object for every candidate of one
        setting and template: do not modify it."""
        stages = as_stages(recipe)
        if any(stage_setting(s) or getattr(s, "chat_template", None) for s in stages):
            self.plan(stages)  # builds their vocabularies (or finds them built), checks their templates
        return self._tokenizers.output_tokenizer(stages)

    # ---- internals ---------------------------------------------------------------

    def _build(self, plans, seed, outputs: "_ResidentModel | None"):
        self.memory_plan(plans)  # decided before the first source loads
        self.cache.new_candidate()
        earlier: dict[str, SourceModel] = {}
        config, tensors = {}, {}
        for k, plan in enumerate(plans):
            last = k == len(plans) - 1
            if isinstance(plan, MoERecipe):
                from search.engine.moe import build_moe  # the MoE helper's module; only MoE recipes need it

                config, tensors = build_moe(plan, lambda n: earlier[n] if n in earlier else self.source(n), seed, self.device)
                continue
            # mergekit-multi runs each stage as its own mergekit run: each reseeds.
            generator = None
            if seed is not None and plan.method.randomized:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                if not plan.method.native:
                    torch.manual_seed(seed)  # mergekit's own kernels draw from torch's global stream
            config, tensors = plan.config, self._run_stage(plan, earlier, generator, outputs if last else None)
            if plan.recipe.name and not last:
                earlier[plan.recipe.name] = SourceModel(plan.recipe.name, Path(f"<stage {plan.recipe.name}>"), config, tensors)
        return config, tensors

    def _run_stage(self, plan: StagePlan, earlier: dict[str, SourceModel], generator, outputs: "_ResidentModel | None"):
        ctx = Context(cache=self.cache, generator=generator, buffers=self._buffers, sort_bound=_sort_bound(plan) if self.one_shot else None)
        results: dict[str, torch.Tensor] = {}
        jobs = list(plan.execution_order())
        streamed = self._streamed_jobs(jobs, earlier)
        try:
            for k, job in enumerate(jobs):
                staged = streamed.take(k) if streamed is not None else None
                if streamed is None and self.streamed and k + 1 < len(jobs):
                    self._read_ahead(jobs[k + 1], earlier)
                pages = getattr(outputs, "pages", None)
                self._run_job(plan, job, earlier, ctx, staged, results, outputs)
                if pages is not None:
                    pages.release(job.name)
                if streamed is not None:
                    streamed.done(k)
                if self.one_shot or self.streamed:  # keep only the jobs in flight of the sources' pages
                    for m, n in zip(job.models, job.tensors):
                        if m not in earlier:
                            self.source(m).release([n])
        finally:
            if streamed is not None:
                streamed.close()
        ctx.out = None
        # The output in plan order (pre, layers, post), like mergekit's shards.
        return {j.name: results[j.name] for j in plan.jobs}

    def _run_job(self, plan: StagePlan, job: Job, earlier, ctx: Context, staged, results: dict, outputs) -> None:
        """One output tensor: merged (or taken) from its inputs, kept in `results` and given to `outputs`."""
        inputs, transient = self._inputs(plan, job, earlier, ctx, staged)
        native = inputs.tensors[0].dtype
        target = outputs.owned.get(job.name) if outputs is not None else None
        ctx.out = target if (target is not None and target.dtype == native) else None
        if job.take_only_input:
            result = inputs.tensors[0]
        else:
            result = plan.method.merge(inputs, job.shared, job.per_input, ctx)
        if plan.out_dtype is not None and result.dtype != plan.out_dtype:
            if target is not None and target.dtype == plan.out_dtype:
                result = target.copy_(result)
            else:
                result = result.to(plan.out_dtype)
        aliased = any(result is t for t in inputs.tensors)
        if any(result is t for t in transient):  # a buffer the next tensor's conversion reuses
            result = target.copy_(result) if ctx.out is not None else result.clone()
            aliased = False
        results[job.name] = result
        if outputs is not None:
            outputs.assign(job.name, result, aliased=aliased)

    def _streamed_jobs(self, jobs: list[Job], earlier: dict[str, SourceModel]) -> StreamedJobs | None:
        """Streamed sources copied to the device job by job, or None where the passes read them in place."""
        if not (self._stage_sources or (self.streamed and torch.device(self.device).type != "cpu")):
            return None
        if self._stream is None:
            self._stream = SourceStream(self.device)
        host = [[None if m in earlier else self.source(m).tensors[n] for m, n in zip(j.models, j.tensors)] for j in jobs]
        return StreamedJobs(self._stream, host)

    def _read_ahead(self, job: Job, earlier: dict[str, SourceModel]) -> None:
        """Streamed on the CPU: the kernel starts reading the next job's mapped pages while this one computes."""
        for m, n in zip(job.models, job.tensors):
            if m not in earlier:
                self.source(m).read_ahead([n])

    def _inputs(self, plan: StagePlan, job: Job, earlier: dict[str, SourceModel], ctx: Context,
                staged: list[torch.Tensor | None] | None = None) -> tuple[Inputs, list[torch.Tensor]]:
        """The job's inputs in the work dtype, and which of them live in reused buffers (conversions,
        streamed staging slots). staged: the job's source tensors already copied to the device."""
        sources = [earlier[m] if m in earlier else self.source(m) for m in job.models]
        dtypes = [s.tensors[n].dtype for s, n in zip(sources, job.tensors)]
        work = plan.dtype or promoted_dtype(dtypes)
        tensors, keys, transient = [], [], []
        keep_converted = self._keeps_converted()
        for slot, (m, s, n) in enumerate(zip(job.models, sources, job.tensors)):
            resident = m not in earlier  # intermediates change with every candidate: never cached
            is_staged = staged is not None and staged[slot] is not None
            stored = staged[slot] if is_staged else s.tensors[n]
            if is_staged and stored.dtype == work:  # a staging slot, refilled two jobs later
                tensors.append(stored)
                transient.append(stored)
            elif not is_staged and (stored.dtype == work or (resident and keep_converted)):
                tensors.append(s.tensor(n, work))
            else:
                buffer = ctx.scratch(_CONVERSION_SLOTS + slot, stored.numel(), work, stored.device)
                piece = ctx.scratch(_CONVERSION_SLOTS - 1, CONVERT_PIECE, torch.float32, stored.device)
                tensors.append(convert_into(buffer.view(stored.shape), stored, piece))
                transient.append(tensors[-1])
            keys.append((m, n, work) if resident else None)
        if plan.vocabulary is not None and job.vocabulary_axis is not None:
            tensors, keys = self._tokenizers.reindexed(plan, job, tensors, keys)
            transient = [t for t in transient if any(t is x for x in tensors)]
        return Inputs(name=job.name, tensors=tensors, keys=keys, base_index=job.base_index), transient

    def _resident_model(self, config: dict, names: list[str], dtype: torch.dtype) -> "_ResidentModel | None":
        """The live model for outputs of this config and dtype, made once (LRU of `resident_models`)."""
        key = json.dumps(config, sort_keys=True) + str(dtype)
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        resident = _ResidentModel.create(config, dtype, self.device, names)
        if resident is None:
            return None
        self._resident[key] = resident
        while len(self._resident) > self._resident_limit:
            self._resident.popitem(last=False)
        return resident


class _ResidentModel:
    """One live model whose parameters are rewritten per candidate.

    Each parameter has an owned buffer allocated once (never touched until a
    candidate computes into it); a parameter a candidate takes unchanged points
    at the source tensor instead, and back at its owned buffer when computed again."""

    def __init__(self, model: transformers.PreTrainedModel, params: dict[str, torch.nn.Parameter]):
        self.model = model
        self.params = params
        self.owned = {name: p.data for name, p in params.items()}

    @classmethod
    def create(cls, config: dict, dtype: torch.dtype, device: str, names: list[str]) -> "_ResidentModel | None":
        import transformers
        from transformers.initialization import no_init_weights

        cfg = hf_config(config)
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.tie_weights()  # no_init_weights also skips tying
        model.to(device).eval().requires_grad_(False)
        params = dict(model.named_parameters())
        if set(params) - set(names) or set(names) - set(dict(model.named_parameters(remove_duplicate=False))):
            return None
        return cls(model, {n: params[n] for n in names if n in params})

    def release(self) -> None:
        """Point every parameter back at its owned buffer, letting go of the tensors it was pointed at."""
        for name, p in self.params.items():
            p.data = self.owned[name]

    def assign(self, name: str, tensor: torch.Tensor, aliased: bool) -> None:
        """Point parameter `name` at a source tensor (aliased) or put `tensor` in its owned buffer."""
        p = self.params.get(name)
        if p is None:
            return  # a tied parameter, written through its twin
        own = self.owned[name]
        if aliased and tensor.dtype == own.dtype and tensor.shape == own.shape and tensor.device == own.device:
            p.data = tensor
            return
        if tensor is not own:
            own.copy_(tensor)
        p.data = own


class _GivenBuffers:
    """Output buffers a caller of state_dict(out=...) provides: every result ends up in its buffer."""

    def __init__(self, buffers: dict[str, torch.Tensor], pages=None):
        self.owned = buffers
        self.pages = pages

    def assign(self, name: str, tensor: torch.Tensor, aliased: bool) -> None:
        own = self.owned.get(name)
        if own is None or tensor is own:
            return
        if tensor.dtype != own.dtype or tensor.shape != own.shape:
            raise RuntimeError(f"{name}: result is {tensor.dtype}{list(tensor.shape)}, its buffer {own.dtype}{list(own.shape)}")
        own.copy_(tensor)


def _model_from_tensors(config: dict, tensors: dict[str, torch.Tensor], device: str) -> transformers.PreTrainedModel:
    """A model from tensors whose names need transformers' own checkpoint conversion (MoE)."""
    import tempfile

    import transformers
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=next(iter(tensors.values())).dtype)
    return model.to(device).eval().requires_grad_(False)


def _sort_bound(plan: StagePlan) -> int:
    """Elements a one-shot build sorts at once (TIES's ranks, SORT_BYTES each): one sort of the largest tensor,
    or as many as the output's bytes hold. mergekit sorts one task vector at a time but holds every input
    (its peak is at least their sum), so that much side by side still peaks below it."""
    infos = plan.output.tensors.values()
    largest = max((math.prod(t.shape) for t in infos), default=0)
    return max(largest, sum(t.numel_bytes for t in infos) // SORT_BYTES)


def memory_need(mat: Materializer, plans: list | None = None) -> MemoryNeed:
    """What a worker building `plans` (else candidates of its sources' shape) needs (memory_estimate.py).
    The sources are those of the model map and of the plans, each distinct folder once; names that
    resolve to none are skipped (a model no recipe may use; its error comes when one does)."""
    names = list(mat.model_map)
    for p in plans or []:
        names += _read_models(p) if isinstance(p, StagePlan) else p.referenced_models()
    sources, seen, first_config = [], set(), None
    for name in dict.fromkeys(names):
        try:
            if name in mat._sources and not mat._sources[name].mapped:  # added as tensors (add_source)
                key, size = ("added", name), sum(t.numel() * t.element_size() for t in mat._sources[name].tensors.values())
            else:
                key = mat.path(name).resolve()
                size = source_bytes(name, key, mat.allow_pickle)
            if key in seen:
                continue
            seen.add(key)
            info = mat.info(name)
        except UserError:
            continue
        first_config = first_config or info.config
        sources.append((size, [(math.prod(t.shape), t.dtype.itemsize) for t in info.tensors.values()]))
    shapes = source_shapes(sources)
    final = (plans or [None])[-1]
    candidate, config, work = max((s for s, _ in sources), default=0), first_config or {}, None
    if isinstance(final, StagePlan):
        candidate, config = sum(t.numel_bytes for t in final.output.tensors.values()), final.config
        work = final.dtype.itemsize if final.dtype is not None else None
    elif isinstance(final, MoERecipe):
        candidate = _moe_bytes(mat, final)
    intermediates = sum(sum(t.numel_bytes for t in p.output.tensors.values()) for p in (plans or [])[:-1] if isinstance(p, StagePlan))
    return worker_need(
        shapes, runtime=_runtime_bytes(mat), candidate=candidate, intermediates=intermediates, work_itemsize=work,
        keep_converted=mat.keep_converted, eval_tokens=mat.eval_tokens, eval_config=config,
        lanes=lane_count(mat.device), piece_numel=pieces_in_flight(mat.device),
        staging=mat._stage_sources or torch.device(mat.device).type != "cpu",
        cache_limit=mat._cache_bytes,
    )


def _moe_bytes(mat: Materializer, recipe: MoERecipe) -> int:
    """A mixture's size: the base's tensors outside its MLPs, plus every expert's MLPs (the base's shape)."""
    try:
        tensors = mat.info(recipe.base_model).tensors
    except UserError:
        return 0
    mlp = sum(t.numel_bytes for n, t in tensors.items() if ".mlp." in n)
    return sum(t.numel_bytes for t in tensors.values()) - mlp + mlp * len(recipe.experts)


def _runtime_bytes(mat: Materializer) -> int:
    """What the process holds already, measured once: its resident set on the CPU, torch's allocations on a
    GPU; less the sources already in that memory (added as tensors), which the estimate counts as sources."""
    if mat._runtime is None:
        device = torch.device(mat.device)
        held = resident_set_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
        loaded = sum(t.numel() * t.element_size() for s in mat._sources.values() if not s.mapped
                     for t in s.tensors.values() if t.device.type == device.type)
        mat._runtime = max(0, held - loaded)
    return mat._runtime


def resident_set_bytes() -> int:
    """This process's resident set now (VmRSS), 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_models(plan: StagePlan) -> list[str]:
    return [m for job in plan.jobs for m in job.models]


__all__ = ["Materializer", "resolve_model_path"]
