"""What a worker keeps in memory, part by part, estimated before the first source loads.

The estimate a worker prints and decides by (memory_plan.py) is the sum of:

- runtime: the process as it stands before any source (Python, torch, transformers, the
  objectives' libraries and data), measured (resident set) rather than guessed;
- sources: their bytes, all of them when kept (mapped or on the device); when streamed, only
  the window of the jobs in flight (the current and the next job's inputs);
- candidate: the live model a candidate is written into (and a multi-stage recipe's intermediates);
- temporaries: what a merge pass holds beyond its output, for the most demanding native method
  over these sources (merge_temporaries): TIES's sort of a task vector (12 bytes an element of
  the largest tensor, one sort per lane at a time) and its ranks, DARE's draws (4 bytes an
  element per model) and the whole-tensor buffer of its L1 norms, the family pass's scratch for the
  pieces in flight (PIECE_BYTES: small per CPU lane, GiBs for an accelerator's large pieces),
  conversions to a recipe dtype;
- evaluation: a forward pass of the largest batch the objectives run (evaluation_bytes): logits
  (tokens x vocabulary, in the model's dtype and twice in float32: the objective's cast and its
  log-softmax), the widest layer's activations, attention scores;
- cache: statistics kept across candidates (TIES's ranks, DARE's draws, slerp's norms), bounded by
  what the rest leaves (`cache_bound`), never more than these sources can use.

A small fixed allowance (ALLOCATOR_SLACK) covers the allocator's and libraries' own slack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Bytes per element of the largest tensor that a pass may hold (see the module docstring).
SORT_BYTES = 12  # |delta| in float32 (4) and the sort's indices (8); the ranks then take the float32s' place
RANK_BYTES = 4  # int32 ranks (magnitude_ranks.py), kept or not
DRAW_BYTES = 4  # int32 draws per model (random_stream.py)
KEPT_DRAW_BYTES = 2  # kept draws (random_stream.py): what DARE's cache holds per element and model
FLOAT_BYTES = 4
# The task-arithmetic family's scratch per element of a piece in flight (task_arithmetic.py, mask_ops.py):
# per model the task vector, its kept-mask, float32 copy, mask and products, and a dtype copy of them to
# sum (18); per element the sums, the divisor, the majority and the zero test (16). A CPU lane's piece is
# small (a few MiB in all); an accelerator's is up to DEVICE_PIECE elements (GiBs).
PIECE_BYTES_PER_MODEL = 18
PIECE_BYTES = 16
ALLOCATOR_SLACK = 64 << 20  # glibc arenas, torch's thread pools, lane scratch
# Tokens of a forward pass when an objective cannot say (a custom function's own batches).
DEFAULT_EVAL_TOKENS = 2048


@dataclass(frozen=True)
class SourceShapes:
    """What the estimate needs to know of the sources, from their headers."""

    total_bytes: int  # all sources
    count: int  # distinct sources
    largest_numel: int  # elements of the largest tensor of any source
    largest_job_bytes: int  # bytes of the largest tensor times the number of sources (a streamed job's inputs)
    elements: int  # elements of the largest source (what one candidate's pass reads of each source)
    itemsize: int  # bytes per element of the sources (2 for bf16)


@dataclass(frozen=True)
class MemoryNeed:
    runtime: int
    sources: int
    candidate: int
    temporaries: int
    evaluation: int
    cache_useful: int  # what the cache can use over these sources, at most
    window: int  # streamed: the sources' share in flight

    @property
    def required(self) -> int:
        """Everything but the cache (which is sized from what is left)."""
        return self.runtime + self.sources + self.candidate + self.temporaries + self.evaluation + ALLOCATOR_SLACK

    def streamed(self) -> "MemoryNeed":
        return replace(self, sources=self.window)


def source_shapes(sources: list[tuple[int, list[tuple[int, int]]]]) -> SourceShapes:
    """From each source's (file bytes, [(numel, itemsize) of every tensor])."""
    if not sources:
        return SourceShapes(0, 0, 0, 0, 0, 2)
    largest = max((numel for _, tensors in sources for numel, _ in tensors), default=0)
    itemsize = max((size for _, tensors in sources for _, size in tensors), default=2)
    return SourceShapes(
        total_bytes=sum(b for b, _ in sources),
        count=len(sources),
        largest_numel=largest,
        largest_job_bytes=largest * itemsize * len(sources),
        elements=max(sum(numel for numel, _ in tensors) for _, tensors in sources),
        itemsize=itemsize,
    )


def worker_need(shapes: SourceShapes, *, runtime: int, candidate: int, intermediates: int = 0,
                work_itemsize: int | None = None, keep_converted: bool = True, eval_tokens: int = 0,
                eval_config: dict | None = None, lanes: int = 1, piece_numel: int = 0, staging: bool = False,
                cache_limit: int | None = None) -> MemoryNeed:
    """A worker's need for these sources and the recipe it will build (see the module docstring).
    cache_limit: a bound the caller set on the cache (0: none kept)."""
    converted = 0
    if work_itemsize and work_itemsize != shapes.itemsize and keep_converted:
        converted = shapes.total_bytes * work_itemsize // shapes.itemsize  # sources kept in the recipe's dtype
    window = 2 * shapes.largest_job_bytes * (2 if staging else 1)  # this job's and the next one's inputs (and slots)
    return MemoryNeed(
        runtime=runtime,
        sources=shapes.total_bytes + converted,
        candidate=candidate + intermediates,
        temporaries=merge_temporaries(shapes, lanes, work_itemsize, piece_numel),
        evaluation=evaluation_bytes(eval_tokens, eval_config or {}, work_itemsize or shapes.itemsize),
        cache_useful=cache_useful(shapes) if cache_limit is None else min(cache_limit, cache_useful(shapes)),
        window=window,
    )


def merge_temporaries(shapes: SourceShapes, lanes: int, work_itemsize: int | None = None, piece_numel: int = 0) -> int:
    """Bytes a merge pass holds beyond its output, for the most demanding native method (TIES or DARE).
    piece_numel: the elements of the family pass's pieces in flight (all lanes'), whose scratch counts too."""
    n = shapes.largest_numel
    others = max(1, shapes.count - 1)
    work = work_itemsize or shapes.itemsize
    ties = min(lanes, others) * SORT_BYTES * n + others * RANK_BYTES * n
    dare = others * (DRAW_BYTES + KEPT_DRAW_BYTES) * n + max(work, FLOAT_BYTES) * n
    pieces = min(piece_numel, n) * (others * PIECE_BYTES_PER_MODEL + PIECE_BYTES)
    # inputs converted to a recipe dtype piece by piece (streamed; `mergesearch merge`): one buffer per input
    conversion = shapes.count * max(work, FLOAT_BYTES) * n if work != shapes.itemsize else 0
    return max(ties, dare) + pieces + conversion


def cache_useful(shapes: SourceShapes) -> int:
    """The most the statistics cache can hold for these sources: TIES's ranks of every task vector
    (4 bytes an element and model; DARE's kept draws take 2, slerp's statistics a few bytes a tensor)."""
    return max(0, shapes.count - 1) * RANK_BYTES * shapes.elements


def cache_bound(available: int, need: MemoryNeed) -> int:
    """The cache's size: half of what the rest leaves (the other half stays free: the machine's other
    processes, other workers on the node), at most what it can use."""
    return max(0, min(need.cache_useful, (available - need.required) // 2))


def evaluation_bytes(tokens: int, config: dict, itemsize: int) -> int:
    """A forward pass over `tokens` padded tokens of a causal LM of this config, at its peak."""
    if tokens <= 0:
        return 0
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 4096)
    inner = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 32000)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 32)
    logits = tokens * vocab * (itemsize + 2 * FLOAT_BYTES)
    activations = tokens * (8 * hidden + 3 * inner) * itemsize
    scores = tokens * heads * tokens * FLOAT_BYTES  # attention weights, if the kernel materializes them
    return logits + activations + scores


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
