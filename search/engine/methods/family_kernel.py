"""The task-arithmetic family's CPU pass for bfloat16 as one C loop: mergekit's ops, every rounding kept.

mergekit computes TIES or DARE as a sequence of whole-tensor torch ops, each a pass that rounds its
result to bfloat16 (the engine's torch path: ~45 ops a piece). The same arithmetic written per element in C — float32 ops (compiled with
-ffp-contract=off: no fused multiply-add, so every product and sum rounds as torch's does), each
result rounded to bfloat16 (round to nearest even, as torch converts) where mergekit's op rounds —
reads the inputs and writes the output once. Exact except for NaN: which of two NaNs an op returns
and the bits torch writes for one depend on its code path (vector loop or scalar tail), so a piece
that meets a NaN is handed back and built again by the torch ops (task_arithmetic.py).

The loop is compiled once per machine with the system's C compiler (`cc`) into a shared library
kept in ~/.cache/mergesearch/kernels (named by a hash of its source, flags and CPU) and called through
ctypes, which lets go of the GIL: the CPU's lanes run it side by side. Without a compiler, or with
MERGESEARCH_KERNEL=0, the torch ops build every piece. tests/test_family_kernel.py checks the loop
against them and against mergekit, bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
MAX_MODELS = 16
# -ffp-contract=off: no fused multiply-add (each product and sum rounds, as torch's ops round);
# -fno-trapping-math lets comparisons vectorize (it changes no value, only which FP flags may be raised);
# -march=native: this CPU's vector width (4x the baseline's here); the library's name includes the CPU's flags.
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
# how a model's kept-mask is given (task_arithmetic.py's _loop_keep: all kept, values < bound, all zero)
KEEP_ALL, KEEP_BELOW_I16, KEEP_BELOW_I32, KEEP_ZERO = 0, 1, 2, 3

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define BLOCK 256

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* float32 -> bfloat16, round to nearest even (torch's conversion; a NaN is the caller's) */
static inline uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t)(u >> 16); }
static inline float rounded(float f) { return from_bf16(to_bf16(f)); }

/* keep[j] (1 or 0) of elements [0, len) of a model's kept-mask */
static inline void kept(float *keep, int len, int kind, const void *values, int64_t bound)
{
    int32_t below = (int32_t)bound;  /* ranks and draws are int32 or int16: so is any bound that splits them */
    if (kind == 1) { const int16_t *v = values; for (int j = 0; j < len; j++) keep[j] = (float)((int32_t)v[j] < below); }
    else if (kind == 2) { const int32_t *v = values; for (int j = 0; j < len; j++) keep[j] = (float)(v[j] < below); }
    else for (int j = 0; j < len; j++) keep[j] = 1.0f;
}

/* One piece of n elements, in blocks; returns 1 if a NaN was met (the piece is then not to be used). */
int family_bf16(int64_t n, int m, const uint16_t *base, const uint16_t *const *xs,
                const int *keep_kind, const void *const *keep_values, const int64_t *keep_bound,
                const int *has_factor, const float *factor, const float *weight,
                int consensus, int normalize, float divisor, int has_lambda, float lambda_, uint16_t *out)
{
    float d[16][BLOCK], b[BLOCK], keep[BLOCK], sum[BLOCK], m_sum[BLOCK], w_sum[BLOCK];
    int bad = 0;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int len = n - at < BLOCK ? (int)(n - at) : BLOCK;
        for (int j = 0; j < len; j++) { b[j] = from_bf16(base[at + j]); sum[j] = 0.0f; }
        for (int r = 0; r < m; r++) {
            float *v = d[r];
            const uint16_t *x = xs[r] + at;
            if (keep_kind[r] == 3) {
                for (int j = 0; j < len; j++) v[j] = 0.0f;    /* density 0: torch.zeros_like */
            } else {
                int width = keep_kind[r] == 1 ? 2 : 4;
                kept(keep, len, keep_kind[r], keep_values[r] ? (const char *)keep_values[r] + width * at : 0, keep_bound[r]);
                for (int j = 0; j < len; j++) v[j] = rounded(from_bf16(x[j]) - b[j]) * keep[j];  /* (x - base) * mask */
                if (has_factor[r]) { float f = factor[r]; for (int j = 0; j < len; j++) v[j] = rounded(v[j] * f); }
            }
            float w = weight[r];
            for (int j = 0; j < len; j++) {
                v[j] = rounded(v[j] * w);                     /* deltas * weights */
                bad |= v[j] != v[j];
                sum[j] = sum[j] + v[j];                       /* .sum(dim=0): from 0, in float32 */
            }
        }
        if (consensus) {                                      /* get_mask(method="sum") and its two sums */
            for (int j = 0; j < len; j++) { keep[j] = rounded(sum[j]) >= 0.0f ? 1.0f : -1.0f; m_sum[j] = 0.0f; w_sum[j] = 0.0f; }
            for (int r = 0; r < m; r++) {
                float w = weight[r];
                for (int j = 0; j < len; j++) {
                    float agree = (float)(d[r][j] * keep[j] > 0.0f);  /* sign(x) == majority */
                    m_sum[j] = m_sum[j] + d[r][j] * agree;
                    w_sum[j] = w_sum[j] + w * agree;
                }
            }
            for (int j = 0; j < len; j++) {
                float div = rounded(w_sum[j]);
                sum[j] = rounded(m_sum[j]);
                m_sum[j] = div == 0.0f ? 1.0f : div;
            }
        } else {
            for (int j = 0; j < len; j++) { sum[j] = rounded(sum[j]); m_sum[j] = divisor; }
        }
        for (int j = 0; j < len; j++) {
            float mixed = sum[j];
            if (normalize) mixed = rounded(mixed / m_sum[j]);
            if (has_lambda) mixed = rounded(mixed * lambda_);
            float o = b[j] + mixed;
            bad |= o != o;
            out[at + j] = to_bf16(o);
        }
    }
    return bad;
}

/* |(x - base) * mask| of one model over n elements (DARE's L1 norm after masking); 1 if a NaN was met. */
int masked_abs_bf16(int64_t n, const uint16_t *x, const uint16_t *base, int keep_kind, const void *keep_values,
                    int64_t keep_bound, uint16_t *out)
{
    float keep[BLOCK];
    int bad = 0;
    int width = keep_kind == 1 ? 2 : 4;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int len = n - at < BLOCK ? (int)(n - at) : BLOCK;
        kept(keep, len, keep_kind, keep_values ? (const char *)keep_values + width * at : 0, keep_bound);
        for (int j = 0; j < len; j++) {
            float v = rounded(from_bf16(x[at + j]) - from_bf16(base[at + j])) * keep[j];
            bad |= v != v;
            out[at + j] = to_bf16(v) & 0x7FFFu;
        }
    }
    return bad;
}
"""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def library() -> ctypes.CDLL | None:
    """The compiled loop (compiled on first use and kept), or None: no compiler, or MERGESEARCH_KERNEL=0."""
    global _library, _tried
    if os.environ.get("MERGESEARCH_KERNEL") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            _library = _load()
    return _library


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        LOG.info("no C compiler: the family's merge passes run as torch ops")
        return None
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS) + compiler + _cpu()).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MERGESEARCH_KERNEL_DIR", Path.home() / ".cache" / "mergesearch" / "kernels"))
    path = folder / f"family-{digest}.so"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, built = Path(tmp) / "family.c", Path(tmp) / "family.so"
                src.write_text(SOURCE)
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(src)], check=True, capture_output=True, timeout=120)
                os.replace(built, path)  # whole or not at all: another process may be loading it
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        LOG.warning("could not build the family's C loop (%s); its merge passes run as torch ops", e)
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.family_bf16.argtypes = [i64, ctypes.c_int, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float, pointer]
    lib.family_bf16.restype = ctypes.c_int
    lib.masked_abs_bf16.argtypes = [i64, pointer, pointer, ctypes.c_int, pointer, i64, pointer]
    lib.masked_abs_bf16.restype = ctypes.c_int
    return lib


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags (a home folder may be
    shared by machines of other CPUs)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


class FamilyCall:
    """One tensor's arguments of family_bf16, bound once; `run(start, end)` builds a piece of it."""

    def __init__(self, lib: ctypes.CDLL, base: torch.Tensor, xs: list[torch.Tensor], keeps: list[tuple[int, int, int]],
                 factors: list[float | None], weights: list[float], consensus: bool, normalize: bool,
                 divisor: float, lam: float, out: torch.Tensor):
        m = len(xs)
        self.lib, self.m = lib, m
        self.base, self.out = base.data_ptr(), out.data_ptr()
        self.xs = [x.data_ptr() for x in xs]
        self.kinds = (ctypes.c_int * m)(*[k[0] for k in keeps])
        self.values = [k[1] for k in keeps]
        self.bounds = (ctypes.c_int64 * m)(*[k[2] for k in keeps])
        self.has_factor = (ctypes.c_int * m)(*[f is not None for f in factors])
        self.factors = (ctypes.c_float * m)(*[f or 0.0 for f in factors])
        self.weights = (ctypes.c_float * m)(*weights)
        self.rest = (int(consensus), int(normalize), ctypes.c_float(divisor), int(lam != 1), ctypes.c_float(lam))

    def run(self, start: int, end: int) -> bool:
        """Build elements [start, end); False if a NaN was met (the caller builds the piece otherwise)."""
        xs = (ctypes.c_void_p * self.m)(*[p + 2 * start for p in self.xs])
        values = (ctypes.c_void_p * self.m)(*[p + (2 if k == KEEP_BELOW_I16 else 4) * start if p else 0
                                              for p, k in zip(self.values, self.kinds)])
        return self.lib.family_bf16(end - start, self.m, self.base + 2 * start, xs, self.kinds, values, self.bounds,
                                    self.has_factor, self.factors, self.weights, *self.rest, self.out + 2 * start) == 0


def masked_abs(lib: ctypes.CDLL, x: torch.Tensor, base: torch.Tensor, keep: tuple[int, int, int], out: torch.Tensor,
               start: int, end: int) -> bool:
    """out[start:end] = |(x - base) * mask| in bfloat16; False if a NaN was met."""
    kind, values, bound = keep
    width = 2 if kind == KEEP_BELOW_I16 else 4
    return lib.masked_abs_bf16(end - start, x.data_ptr() + 2 * start, base.data_ptr() + 2 * start, kind,
                               values + width * start if values else 0, bound, out.data_ptr() + 2 * start) == 0
