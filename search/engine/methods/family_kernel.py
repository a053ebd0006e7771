"""The task-arithmetic family's CPU pass as one C loop: mergekit's ops, every rounding kept.

mergekit computes TIES or DARE as a sequence of whole-tensor torch ops, each a pass that rounds its
result to the tensors' dtype (the engine's torch path: ~45 ops a piece). The same arithmetic written
per element in C — float32 ops (compiled with -ffp-contract=off: no fused multiply-add, so every
product and sum rounds as torch's does), each result rounded to bfloat16 or float16 (round to
nearest even, as torch converts) where mergekit's op rounds — reads the inputs and writes the
output once. float32 takes the same loop, every op rounding by itself, over up to four task vectors
(beyond, torch's float32 sum over the models adds in an order of its own: the torch ops build it).
Exact except for NaN: which of two NaNs an op returns and the bits torch writes for one depend on its
code path (vector loop or scalar tail), so a piece that meets a NaN is handed back and built again by
the torch ops (task_arithmetic.py).

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
import string
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
MAX_MODELS = 16
F32_MODELS = 4
# -ffp-contract=off: no fused multiply-add (each product and sum rounds, as torch's ops round);
# -fno-trapping-math lets comparisons vectorize (it changes no value, only which FP flags may be raised);
# -march=native: this CPU's vector width (4x the baseline's here); the library's name includes the CPU's flags.
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
# how a model's kept-mask is given (task_arithmetic.py's _loop_keep: all kept, values < bound, all zero)
KEEP_ALL, KEEP_BELOW_I16, KEEP_BELOW_I32, KEEP_ZERO = 0, 1, 2, 3

# The loop is written once over a float type T stored as S (its conversions from_T, to_T and rounded_T,
# round to nearest even as torch's) and compiled for bfloat16, float16 and float32: _typed() instantiates
# TYPED per type.
COMMON = r"""
#include <stdint.h>
#include <string.h>

#define BLOCK 256

static inline float f32_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float from_bf16(uint16_t h) { return f32_of((uint32_t)h << 16); }
/* float32 -> bfloat16, round to nearest even (torch's conversion; a NaN is the caller's) */
static inline uint16_t to_bf16(float f) { uint32_t u = bits_of(f); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t)(u >> 16); }
static inline float rounded_bf16(float f) { return from_bf16(to_bf16(f)); }

/* float16 -> float32, exact, in integer and float ops the compiler vectorizes (its _Float16 conversions
   it does not): a normal half's exponent rebiased by a multiply, a subnormal's value as a difference */
static inline float from_f16(uint16_t h)
{
    uint32_t twice = (uint32_t)h << 17;                                  /* exponent and mantissa; no sign */
    float normal = f32_of((twice >> 4) + (0xE0u << 23)) * 0x1.0p-112f;  /* bias 15 -> 127 (inf, NaN: 255) */
    float subnormal = f32_of((twice >> 17) | (126u << 23)) - 0.5f;      /* (0.5 + m * 2^-24) - 0.5 */
    uint32_t magnitude = twice < (1u << 27) ? bits_of(subnormal) : bits_of(normal);
    return f32_of(((uint32_t)(h & 0x8000u) << 16) | magnitude);
}
/* float32 -> float16, round to nearest even (the IEEE conversion, as torch's): |f| scaled so that what
   overflows float16 becomes inf, then added to the power of two at which the float32 sum rounds off
   exactly the bits float16 has no room for (checked against the hardware's conversion for every float) */
static inline uint16_t to_f16(float f)
{
    uint32_t w = bits_of(f), twice = w + w;
    float scaled = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t bias = twice & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;                     /* float16's subnormals: one bias */
    uint32_t r = bits_of(f32_of((bias >> 1) + 0x07800000u) + scaled);
    uint32_t magnitude = ((r >> 13) & 0x7C00u) + (r & 0x0FFFu);
    return (uint16_t)(((w >> 16) & 0x8000u) | (twice > 0xFF000000u ? 0x7E00u : magnitude));  /* NaN: the caller's */
}
/* from_f16(to_f16(f)) in half the ops (checked for every float): a normal result keeps 10 of float32's
   23 mantissa bits (round to nearest even, as to_bf16 keeps 7), one past 65504 is inf; under 2^-14
   float16 steps by 2^-24, the step of float32's own rounding of 0.5 + |f| */
static inline float rounded_f16(float f)
{
    uint32_t u = bits_of(f), magnitude = u & 0x7FFFFFFFu;
    float normal = f32_of((magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) & ~0x1FFFu);
    float subnormal = (f32_of(magnitude) + 0.5f) - 0.5f;
    float r = f32_of(magnitude) < 0x1.0p-14f ? subnormal : (normal > 65504.0f ? __builtin_inff() : normal);
    return f32_of(bits_of(r) | (u & 0x80000000u));
}

/* float32: every op rounds to float32 by itself */
static inline float from_f32(float f) { return f; }
static inline float to_f32(float f) { return f; }
static inline float rounded_f32(float f) { return f; }

/* keep[j] (1 or 0) of elements [0, len) of a model's kept-mask */
static inline void kept(float *keep, int len, int kind, const void *values, int64_t bound)
{
    int32_t below = (int32_t)bound;  /* ranks and draws are int32 or int16: so is any bound that splits them */
    if (kind == 1) { const int16_t *v = values; for (int j = 0; j < len; j++) keep[j] = (float)((int32_t)v[j] < below); }
    else if (kind == 2) { const int32_t *v = values; for (int j = 0; j < len; j++) keep[j] = (float)(v[j] < below); }
    else for (int j = 0; j < len; j++) keep[j] = 1.0f;
}
"""

TYPED = r"""
/* One piece of n elements, in blocks; returns 1 if a NaN was met (the piece is then not to be used). */
int family_$T(int64_t n, int m, const $S *base, const $S *const *xs,
              const int *keep_kind, const void *const *keep_values, const int64_t *keep_bound,
              const int *has_factor, const float *factor, const float *weight,
              int consensus, int normalize, float divisor, int has_lambda, float lambda_, $S *out)
{
    float d[16][BLOCK], b[BLOCK], keep[BLOCK], sum[BLOCK], m_sum[BLOCK], w_sum[BLOCK];
    int bad = 0;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int len = n - at < BLOCK ? (int)(n - at) : BLOCK;
        for (int j = 0; j < len; j++) { b[j] = from_$T(base[at + j]); sum[j] = 0.0f; }
        for (int r = 0; r < m; r++) {
            float *v = d[r];
            const $S *x = xs[r] + at;
            if (keep_kind[r] == 3) {
                for (int j = 0; j < len; j++) v[j] = 0.0f;    /* density 0: torch.zeros_like */
            } else {
                int width = keep_kind[r] == 1 ? 2 : 4;
                kept(keep, len, keep_kind[r], keep_values[r] ? (const char *)keep_values[r] + width * at : 0, keep_bound[r]);
                for (int j = 0; j < len; j++) v[j] = rounded_$T(from_$T(x[j]) - b[j]) * keep[j];  /* (x - base) * mask */
                /* * (before / after): in T, or in float32 then rounded (float16's DARE on the CPU): the same */
                if (has_factor[r]) { float f = factor[r]; for (int j = 0; j < len; j++) v[j] = rounded_$T(v[j] * f); }
            }
            float w = weight[r];
            for (int j = 0; j < len; j++) {
                v[j] = rounded_$T(v[j] * w);                  /* deltas * weights */
                bad |= v[j] != v[j];
                sum[j] = sum[j] + v[j];                       /* .sum(dim=0): from 0, in float32 */
            }
        }
        if (consensus) {                                      /* get_mask(method="sum") and its two sums */
            for (int j = 0; j < len; j++) { keep[j] = rounded_$T(sum[j]) >= 0.0f ? 1.0f : -1.0f; m_sum[j] = 0.0f; w_sum[j] = 0.0f; }
            for (int r = 0; r < m; r++) {
                float w = weight[r];
                for (int j = 0; j < len; j++) {
                    float agree = (float)(d[r][j] * keep[j] > 0.0f);  /* sign(x) == majority */
                    m_sum[j] = m_sum[j] + d[r][j] * agree;
                    w_sum[j] = w_sum[j] + w * agree;
                }
            }
            for (int j = 0; j < len; j++) {
                float div = rounded_$T(w_sum[j]);
                sum[j] = rounded_$T(m_sum[j]);
                m_sum[j] = div == 0.0f ? 1.0f : div;
            }
        } else {
            for (int j = 0; j < len; j++) { sum[j] = rounded_$T(sum[j]); m_sum[j] = divisor; }
        }
        for (int j = 0; j < len; j++) {
            float mixed = sum[j];
            if (normalize) mixed = rounded_$T(mixed / m_sum[j]);
            if (has_lambda) mixed = rounded_$T(mixed * lambda_);
            float o = b[j] + mixed;
            bad |= o != o;
            out[at + j] = to_$T(o);
        }
    }
    return bad;
}

/* |(x - base) * mask| of one model over n elements (DARE's L1 norm after masking), into T (out_f32 0)
   or float32 (out_f32 1: float16's DARE on the CPU works in float32); 1 if a NaN was met. */
int masked_abs_$T(int64_t n, const $S *x, const $S *base, int keep_kind, const void *keep_values,
                  int64_t keep_bound, int out_f32, void *out)
{
    float keep[BLOCK], v[BLOCK];
    int bad = 0;
    int width = keep_kind == 1 ? 2 : 4;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int len = n - at < BLOCK ? (int)(n - at) : BLOCK;
        kept(keep, len, keep_kind, keep_values ? (const char *)keep_values + width * at : 0, keep_bound);
        for (int j = 0; j < len; j++) {
            v[j] = rounded_$T(from_$T(x[at + j]) - from_$T(base[at + j])) * keep[j];
            bad |= v[j] != v[j];
        }
        if (out_f32) { float *o = (float *)out + at; for (int j = 0; j < len; j++) o[j] = __builtin_fabsf(v[j]); }
        else { $S *o = ($S *)out + at; for (int j = 0; j < len; j++) o[j] = to_$T(__builtin_fabsf(v[j])); }
    }
    return bad;
}
"""


def _typed(t: str, storage: str) -> str:
    return string.Template(TYPED).substitute(T=t, S=storage)


SOURCE = COMMON + _typed("bf16", "uint16_t") + _typed("f16", "uint16_t") + _typed("f32", "float")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}

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
    pointer, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for t in DTYPES.values():
        family, masked = getattr(lib, f"family_{t}"), getattr(lib, f"masked_abs_{t}")
        family.argtypes = [i64, c_int, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                           c_int, c_int, ctypes.c_float, c_int, ctypes.c_float, pointer]
        family.restype = c_int
        masked.argtypes = [i64, pointer, pointer, c_int, pointer, i64, c_int, pointer]
        masked.restype = c_int
    return lib


def builds(dtype: torch.dtype, models: int = 1) -> bool:
    """Whether the loop builds a pass over `models` task vectors of dtype here (none without a compiler).
    float32's sums over the models are torch's plain additions in model order only up to F32_MODELS
    (torch's outer sum keeps four partial sums); 16-bit ones are rebuilt so up to MAX_MODELS (mask_ops.py)."""
    return dtype in DTYPES and models <= (F32_MODELS if dtype == torch.float32 else MAX_MODELS) and library() is not None


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags (a home folder may be
    shared by machines of other CPUs)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


class FamilyCall:
    """One tensor's arguments of family_<dtype>, bound once; `run(start, end)` builds a piece of it."""

    def __init__(self, lib: ctypes.CDLL, base: torch.Tensor, xs: list[torch.Tensor], keeps: list[tuple[int, int, int]],
                 factors: list[float | None], weights: list[float], consensus: bool, normalize: bool,
                 divisor: float, lam: float, out: torch.Tensor):
        m = len(xs)
        self.loop, self.m, self.size = getattr(lib, f"family_{DTYPES[base.dtype]}"), m, base.element_size()
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
        at = self.size * start
        xs = (ctypes.c_void_p * self.m)(*[p + at for p in self.xs])
        values = (ctypes.c_void_p * self.m)(*[p + (2 if k == KEEP_BELOW_I16 else 4) * start if p else 0
                                              for p, k in zip(self.values, self.kinds)])
        return self.loop(end - start, self.m, self.base + at, xs, self.kinds, values, self.bounds,
                         self.has_factor, self.factors, self.weights, *self.rest, self.out + at) == 0


def masked_abs(lib: ctypes.CDLL, x: torch.Tensor, base: torch.Tensor, keep: tuple[int, int, int], out: torch.Tensor,
               start: int, end: int) -> bool:
    """out[start:end] = |(x - base) * mask|, out in x's dtype or float32; False if a NaN was met."""
    kind, values, bound = keep
    width = 2 if kind == KEEP_BELOW_I16 else 4
    loop, at = getattr(lib, f"masked_abs_{DTYPES[x.dtype]}"), x.element_size() * start
    return loop(end - start, x.data_ptr() + at, base.data_ptr() + at, kind,
                values + width * start if values else 0, bound, int(out.dtype == torch.float32),
                out.data_ptr() + out.element_size() * start) == 0
