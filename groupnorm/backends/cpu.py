"""numba backend: GroupNorm forward and backward kernels for CPU tensors.

Both layouts are read in place through flat views: a contiguous tensor as (N, C, S), a
channels-last one as (N, S, C). Two kernels per layout (forward, backward), each
specialized only on the dtype (float32, float64; half inputs run through float32), with
the activation as an int argument, to keep the first-call JIT compile small.

Work decomposition (``prange`` over independent items, fixed-order merges, no atomics):

* contiguous, enough (n, g) groups to fill the threads: one item per group, which computes
  its statistics and then normalizes while the group is still in cache (x read from
  memory once, y written once);
* channels-last, enough samples: one item per sample, per-channel accumulators over S;
* otherwise (batch-1 shapes) the reduction itself is split: items are (n, c, S-chunk) or
  (n, S-chunk) partial sums, merged per group in a fixed order, then an elementwise pass.

Statistics: shifted sums ``sum d``, ``sum d^2`` with ``d = x - K``, so that ``var = E[d^2] -
E[d]^2`` does not cancel when the mean is large against the spread. K is the mean of the
group's first 16 elements in memory order, and d is summed in the input dtype in blocks (256
elements, or 64 channels-last rows) that are added up in float64. What cancellation leaves grows
with ``(K - mean)^2 / var``: a group whose K turns out more than one standard deviation off (zero
padding at its start, say) is summed again around the mean found. Contiguous groups under 1024
elements sum float64 terms around their first element instead (no cancellation to speak of, and
faster at that size). The mean is stored as ``mean_hi`` (rounded to the stats dtype) +
``mean_lo``. The elementwise passes compute ``(x - mean_hi) * a + b'`` in the input's dtype.

Channels-last loops: when C is a multiple of a block of 4 SIMD vectors (64 float32 / 32 float64
channels, rows up to 1 KiB; without AVX-512, rows of several blocks only in samples up to 64 KiB:
``vec_rows_rule``) or a block holds 2 or 4 whole rows (C = 16, 32 float32; 8, 16 float64),
the statistics, and the normalization and the backward's two passes without activation or with
ReLU, run block loops (``_cl_*_vec``) written with the explicit vectors of
``groupnorm.backends.simd``: each block runs down a 64-row tile with its sums (or its
coefficients) in registers. Other shapes, and SiLU/GELU after the statistics, run row-span loops
that LLVM vectorizes itself, with per-channel accumulators in memory.

Backward: per-(n, c) sums ``A = sum g``, ``B = sum g * xhat`` (g = dy * act'(z), z recomputed
from x and stats) give dbias, dweight (reduced over n in order) and the two group means
of the dx formula; dx = g * p_c + (x - mean_hi) * q + r. With SiLU/GELU, the first pass
parks g in the dx buffer so the second pass does not re-evaluate exp/erf.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir as llvm_ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload
from numba.np.ufunc import parallel as _numba_parallel

from groupnorm.backends import ACT_CODES, native
from groupnorm.backends.simd import (
    F64_LANES, HOST_AVX512, VECTOR_BYTES, smuladd, vadd, vhsum, vload, vload_f64, vmul, vmuladd, vselect_le, vselect_lt, vsplat,
    vsplat_f64, vstore, vsub, vwidth,
)

# "auto" picks the work decomposition from the shape and the thread count; tests force
# "fused" (one item per group / sample) or "split" (reduction split into chunks).
split_mode = "auto"

_SERIAL = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")
# Reductions may be vectorized: "reassoc" lets LLVM keep several partial sums in SIMD lanes
# (a fixed order for a given build, so results stay bitwise reproducible). The only other
# fast-math flag is "contract" inside the float32 exp/erf/GELU' polynomials (multiply-adds fused
# where the CPU has FMA: 1.5x faster SiLU, error unchanged); no nnan/ninf anywhere. The
# normalization arithmetic is evaluated as written, except in the channels-last SIMD block loops,
# which fuse its multiply-adds (llvm.fmuladd) in vector lanes and scalar rows alike (_vaffine).
_REDUCE = dict(cache=True, fastmath={"reassoc"}, nogil=True, error_model="numpy")
_PARALLEL = dict(parallel=True, cache=True, fastmath=False, nogil=True, error_model="numpy")

# coefficient rows of the per-(n, c) table ``cf``, laid out (N, K, C) so that the
# channels-last inner loop over c reads unit-stride vectors
_MH, _A, _B, _P, _Q, _R = 0, 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------- scalar helpers
@intrinsic
def _bits_to_f32(typingctx, v):
    """Reinterpret an int32 as a float32 (LLVM bitcast; vectorizes, unlike a libm call)."""
    if not isinstance(v, types.Integer) or v.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())

    return types.float32(v), codegen


@intrinsic
def _pow2_f32(typingctx, n):
    """2**n for an integral float32 n in [-126, 127], built in the exponent bits. The
    float -> int32 conversion, add, shift and bitcast are emitted as 32-bit LLVM operations
    so they vectorize on AVX2 (numba's own integer arithmetic widens to int64, and a
    float -> int64 conversion has a SIMD form only with AVX-512DQ)."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        e = builder.add(builder.fptosi(args[0], i32), i32(127))
        return builder.bitcast(builder.shl(e, i32(23)), llvm_ir.FloatType())

    return types.float32(n), codegen


def _vexp(x):  # pragma: no cover - replaced by the overload inside numba code
    return math.exp(x)


@overload(_vexp, jit_options=dict(error_model="numpy", fastmath={"contract"}))
def _vexp_impl(x):
    """exp that LLVM can vectorize for float32 (libm's expf is a scalar call):
    x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial fitted for the least maximum
    relative error on that interval (`scripts/spot_checks.py exp-poly` refits it: 1.8e-8 with these
    float32 coefficients; 8.8e-8 over the whole clamped range in float32 arithmetic, 7.9e-8 with the
    degree-7 Taylor polynomial it replaced, one multiply-add less per element: the SiLU loop ~14%
    faster), 2^n built in the exponent bits; multiply-adds may be fused (FMA). float64 keeps np.exp
    (full double precision)."""
    if x == types.float32:

        def exp_f32(x):
            x = np.float32(-87.0) if x < np.float32(-87.0) else x  # NaN passes through
            x = np.float32(88.0) if x > np.float32(88.0) else x
            # round x / ln2 to an integer with the 1.5 * 2^23 trick (no libm floor call)
            n = (x * np.float32(1.4426950408889634) + np.float32(12582912.0)) - np.float32(12582912.0)
            r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
            p = np.float32(0.0013843835331499577)
            p = p * r + np.float32(0.00837420579046011)
            p = p * r + np.float32(0.04166800156235695)
            p = p * r + np.float32(0.16666430234909058)
            p = p * r + np.float32(0.4999999403953552)
            p = p * r + np.float32(1.0)
            p = p * r + np.float32(1.0)
            return p * _pow2_f32(n)

        return exp_f32

    def exp_any(x):
        return np.exp(x)

    return exp_any


@njit(**_SERIAL)
def _consts(x):
    """0, 1, 1/2, 1/sqrt(2), 1/sqrt(2 pi) in x's dtype (literals would promote float32 to float64)."""
    k = np.empty(5, x.dtype)
    k[0] = 0.0
    k[1] = 1.0
    k[2] = 0.5
    k[3] = 0.7071067811865476
    k[4] = 0.3989422804014327
    return k


def _verf(x):  # pragma: no cover - replaced by the overload inside numba code
    return math.erf(x)


@overload(_verf, jit_options=dict(error_model="numpy", fastmath={"contract"}))
def _verf_impl(x):
    """erf that vectorizes for float32: Abramowitz & Stegun 7.1.26, absolute error < 1.5e-7
    (float32's own rounding is 6e-8), built on _vexp. float64 keeps math.erf."""
    if x == types.float32:

        def erf_f32(x):
            ax = -x if x < np.float32(0.0) else x
            t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * ax)
            p = np.float32(1.061405429)
            p = p * t + np.float32(-1.453152027)
            p = p * t + np.float32(1.421413741)
            p = p * t + np.float32(-0.284496736)
            p = p * t + np.float32(0.254829592)
            e = np.float32(1.0) - p * t * _vexp(-ax * ax)
            return -e if x < np.float32(0.0) else e

        return erf_f32

    def erf_any(x):
        return math.erf(x)

    return erf_any


@njit(**_SERIAL)
def _silu(z, k):
    return z / (k[1] + _vexp(-z))


@njit(**_SERIAL)
def _gelu(z, k):
    return k[2] * z * (k[1] + _verf(z * k[3]))


@njit(**_SERIAL)
def _dsilu(z, k):
    s = k[1] / (k[1] + _vexp(-z))
    return s * (k[1] + z * (k[1] - s))


def _dgelu(z, k):  # pragma: no cover - replaced by the overload inside numba code
    raise NotImplementedError


@overload(_dgelu, jit_options=dict(error_model="numpy", fastmath={"contract"}))
def _dgelu_impl(z, k):
    """GELU'(z) = Phi(z) + z phi(z). For float32 one exp(-z^2/2) serves both the erf of
    Phi (A&S 7.1.26 evaluates erf(u) with exp(-u^2), u = z/sqrt 2) and the density phi."""
    if z == types.float32:

        def dgelu_f32(z, k):
            u = z * np.float32(0.7071067811865476)
            au = -u if u < np.float32(0.0) else u
            e = _vexp(np.float32(-0.5) * z * z)
            t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * au)
            p = np.float32(1.061405429)
            p = p * t + np.float32(-1.453152027)
            p = p * t + np.float32(1.421413741)
            p = p * t + np.float32(-0.284496736)
            p = p * t + np.float32(0.254829592)
            erf = np.float32(1.0) - p * t * e
            erf = -erf if u < np.float32(0.0) else erf
            return np.float32(0.5) * (np.float32(1.0) + erf) + z * e * np.float32(0.3989422804014327)

        return dgelu_f32

    def dgelu_any(z, k):
        return k[2] * (k[1] + math.erf(z * k[3])) + z * (np.exp(-k[2] * z * z) * k[4])

    return dgelu_any


@njit(**_SERIAL)
def _add(a, b):
    """a + b evaluated as written inside a reassociating helper (fast-math flags are per instruction
    and survive inlining), for float64 running sums whose order must not change."""
    return a + b


def _threading_call(name):
    """An intrinsic calling the threading layer's ``int name(void)`` by its symbol (registered by
    numba's _launch_threads(), which runs before a parallel kernel is compiled or loaded from the
    cache): numba.get_num_threads() and numba.get_thread_id() embed a ctypes address, which numba
    cannot cache."""

    @intrinsic
    def call(typingctx):
        def codegen(context, builder, signature, args):
            # declared as numba's parallel lowering declares these (intp), which may share the module;
            # the C functions return an int, so only the low 32 bits are read
            i64 = llvm_ir.IntType(64)
            fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(i64, []), name)
            return builder.sext(builder.trunc(builder.call(fn, []), llvm_ir.IntType(32)), i64)

        return types.int64(), codegen

    return call


_thread_count = _threading_call("get_num_threads")  # the threads a parallel loop started here runs on
_thread_id = _threading_call("get_thread_id")  # inside a parallel loop: 0 .. _thread_count() - 1


@njit(**_SERIAL)
def _affine(xv, mh, a, b):
    """z = (x - mh) * a + b, kept out of the reassociating helpers so it is evaluated as written."""
    return (xv - mh) * a + b


def _like(x, v):  # pragma: no cover - replaced by the overload inside numba code
    return v


@overload(_like, jit_options=dict(error_model="numpy"))
def _like_impl(x, v):
    """v converted to the array x's dtype (a float64 scalar would promote float32 arithmetic)."""
    nt = x.dtype

    def like(x, v):
        return nt(v)

    return like


_SHIFT_SAMPLES = 16


@njit(**_SERIAL)
def _shift_offsets(Cg, S, cs, ss):
    """Where _group_shift samples a group (channel c, position s at c * cs + s * ss from its
    first element): its first min(Cg * S, _SHIFT_SAMPLES) elements in memory order (positions
    fastest when contiguous, channels fastest when channels-last): elements the statistics pass
    reads next anyway. The same for every group, so made once per call."""
    K = min(Cg * S, _SHIFT_SAMPLES)
    off = np.empty(K, np.int64)
    for i in range(K):
        if cs == 1:
            off[i] = (i % Cg) + (i // Cg) * ss
        else:
            off[i] = (i // S) * cs + (i % S) * ss
    return off


@njit(**_SERIAL)
def _group_shift(x, base, off):
    """The shift of one group's sums, in x's dtype: the mean of the elements at base + off (see
    _shift_offsets). The sums of d = x - shift and d*d are accumulated in the input dtype, and the
    variance E[d^2] - E[d]^2 loses digits to cancellation in proportion to (shift - mean)^2 / var:
    a shift near the mean keeps float32 statistics about as accurate as float64 ones. One element
    alone can sit three standard deviations away (or be an outlier): with it, float32 outputs came
    out 2-8e-6 off float64 where they are now ~6e-7 (test_float32_statistics_as_accurate_as_float64).
    Where these elements mislead (padding), _far_from_mean has the group summed again."""
    t = 0.0
    for i in range(off.shape[0]):
        t += np.float64(x[base + off[i]])
    return _like(x, t / off.shape[0])


_BLOCK = 256  # elements of a row or group summed in the input dtype before a float64 accumulation


@njit(**_REDUCE)
def _block_shifted_sums(xs, e0, e1, shift, k):
    """(sum d, sum d*d) with d = x - shift over xs[e0:e1] (at most _BLOCK elements), accumulated
    in the input dtype: full-width SIMD lanes, no float64 conversion per element."""
    s = k[0]
    t = k[0]
    for i in range(e0, e1):
        d = xs[np.uint64(i)] - shift
        s += d
        t += d * d
    return np.float64(s), np.float64(t)


@njit(**_REDUCE)
def _f64_shifted_sums(xs, shift):
    """(sum d, sum d*d) with d = x - shift over xs, every term in float64 (for any shift K within
    the data, cancellation costs nothing a float32 result could show)."""
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = np.float64(xs[i]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


_F32_SUMS_FROM = 1024  # groups of at least this many elements: float32 blocks around a sampled shift


@njit(**_SERIAL)
def _nc_shift(x, lo, M, off):
    """The shift of the contiguous group of M elements at x[lo], in x's dtype: its first element
    for groups summed in float64, else _group_shift's sample mean."""
    if M < _F32_SUMS_FROM:
        return x[lo]
    return _group_shift(x, lo, off)


@njit(**_SERIAL)
def _shifted_sums(xs, shift, k):
    """(sum d, sum d*d) with d = x - shift (in xs' dtype) over the slice xs: blocks of _BLOCK
    elements summed in the input dtype (full-width SIMD lanes: 1.05-1.3x faster forward kernels
    on float32), added up in float64. For groups of _F32_SUMS_FROM elements or more; smaller
    ones take _f64_shifted_sums, faster there (the blocks' set-up dominates)."""
    s1 = 0.0
    s2 = 0.0
    n = xs.shape[0]
    for e0 in range(0, n, _BLOCK):
        a, b = _block_shifted_sums(xs, e0, min(e0 + _BLOCK, n), shift, k)
        s1 += a
        s2 += b
    return s1, s2


@njit(inline="always", **_SERIAL)
def _far_from_mean(s1, s2, M):
    """Sums around a shift more than one standard deviation from the mean: float32 sums around it
    lose (1 + m^2 / var) times their rounding to cancellation in var = E[d^2] - m^2 (zero padding
    at a group's start, an atypical first channel), so the group is summed again nearer the mean.
    Also true when the squares overflowed (float32 values beyond ~1e19: s2 infinite, s1 finite),
    so that the group is summed again in float64 terms; an infinite or NaN input makes s1 infinite
    or NaN too, and its group is left as it is (NaN/inf output)."""
    if _overflowed(s1, s2):
        return True
    m = s1 / M
    return m * m > s2 / M - m * m


@njit(**_SERIAL)
def _overflowed(s1, s2):
    return math.isinf(s2) and math.isfinite(s1)


@njit(**_SERIAL)
def _nc_group_sums(xs, shift, k):
    """(sum d, sum d*d, the shift as float64) over one contiguous group xs of _F32_SUMS_FROM or
    more elements: float32 blocks around shift (x's dtype), again around the mean found if the
    shift was far from it (the group is still in cache then)."""
    M = xs.shape[0]
    s1, s2 = _shifted_sums(xs, shift, k)
    if _far_from_mean(s1, s2, M):
        shift = _like(xs, np.float64(shift) + s1 / M)
        s1, s2 = _shifted_sums(xs, shift, k)
        if _overflowed(s1, s2):  # squares past the float32 range: float64 terms
            s1, s2 = _f64_shifted_sums(xs, np.float64(shift))
    return s1, s2, np.float64(shift)


@njit(inline="always", **_SERIAL)
def _cl_group_f64_sums(x, xo, c0, Cg, C, S, shift):
    """Float64 sums of d = x - shift (float64) over channels c0..c0+Cg of the channels-last sample at
    x[xo:]: the exact re-summation of a group whose float32 sums were taken far from its mean."""
    s1 = 0.0
    s2 = 0.0
    for s in range(S):
        r = xo + s * C + c0
        for c in range(Cg):
            d = np.float64(x[r + c]) - shift
            s1 += d
            s2 += d * d
    return s1, s2


# Rows of the contiguous layout: channels c0..c1 of sample n, positions s0..s1 of each
# row. Indices are made unsigned so numba drops its negative-index wraparound, which
# would otherwise keep LLVM from vectorizing; one call covers a whole group, so short
# rows (7x7 maps) do not pay a call per row.
_SHORT_ROW = 100  # rows up to this long (7x7, 8x8, 10x10 maps) take the one-loop-nest-per-group helpers


@njit(**_REDUCE)
def _row_grad_sums(dy, x, gs, lo, s0, s1, mh, a, b, act, k):
    """(sum g, sum g * (x - mh)) over positions s0..s1 of the row at lo: blocks of _BLOCK
    elements accumulated in the input dtype (full-width SIMD lanes, no float64 conversions),
    added up in float64; g = dy * act'(z), z = (x - mh) * a + b from non-reassociating helpers;
    SiLU/GELU park g in gs. The block loop is in here, not in the caller: without a call per
    block the fused backward kernels measured 1.00-1.12x faster (`spot_checks.py kernel-ab --act`)."""
    s64 = 0.0
    t64 = 0.0
    for e0 in range(s0, s1, _BLOCK):
        e1 = min(e0 + _BLOCK, s1)
        s = k[0]
        t = k[0]
        if act == 1:
            for i in range(e0, e1):
                j = np.uint64(lo + i)
                d = x[j] - mh
                g = k[0] if _affine(x[j], mh, a, b) <= k[0] else dy[j]
                s += g
                t += g * d
        elif act == 2:
            for i in range(e0, e1):
                j = np.uint64(lo + i)
                g = dy[j] * _dsilu(_affine(x[j], mh, a, b), k)
                gs[j] = g
                s += g
                t += g * (x[j] - mh)
        else:  # GELU's long loop body stays in a helper of its own: here it came out 7-11% slower
            s, t = _gelu_block_sums(dy, x, gs, lo, e0, e1, mh, a, b, k)
        s64 = _add(s64, np.float64(s))  # the float64 running sums keep their order (no reassoc)
        t64 = _add(t64, np.float64(t))
    return s64, t64


@njit(**_REDUCE)
def _gelu_block_sums(dy, x, gs, lo, e0, e1, mh, a, b, k):
    """_row_grad_sums' block for GELU (sums in the input dtype)."""
    s = k[0]
    t = k[0]
    for i in range(e0, e1):
        j = np.uint64(lo + i)
        g = dy[j] * _dgelu(_affine(x[j], mh, a, b), k)
        gs[j] = g
        s += g
        t += g * (x[j] - mh)
    return s, t


@njit(**_SERIAL)
def _act_grad_flat(dy, gs, lo, n, act, k):
    """gs = dy * act'(gs) over n elements from lo (gs holds z), SiLU (act 2) or GELU."""
    if act == 2:
        for i in range(n):
            j = np.uint64(lo + i)
            gs[j] = dy[j] * _dsilu(gs[j], k)
    else:
        for i in range(n):
            j = np.uint64(lo + i)
            gs[j] = dy[j] * _dgelu(gs[j], k)


@njit(**_REDUCE)
def _act_grad_span(dy, x, dx, ag, ad, mt, at, bt, o, m, act, k):
    """_cl_grad_rows' span of m values at o for SiLU (act 2) or GELU: g parked in dx, sums added
    to ag, ad (a call per span keeps the constants in registers; see _act_span)."""
    if act == 2:
        for j in range(m):
            i = np.uint64(o + j)
            xv = x[i]
            g = dy[i] * _dsilu(_affine(xv, mt[j], at[j], bt[j]), k)
            dx[i] = g
            ag[j] += g
            ad[j] += g * (xv - mt[j])
    else:
        for j in range(m):
            i = np.uint64(o + j)
            xv = x[i]
            g = dy[i] * _dgelu(_affine(xv, mt[j], at[j], bt[j]), k)
            dx[i] = g
            ag[j] += g
            ad[j] += g * (xv - mt[j])


@njit(**_REDUCE)
def _row_sums_plain(dy, x, lo, e0, e1, mh, k):
    """_row_grad_sums without an activation (kept small so that LLVM inlines it)."""
    s = k[0]
    t = k[0]
    for i in range(e0, e1):
        j = np.uint64(lo + i)
        g = dy[j]
        s += g
        t += g * (x[j] - mh)
    return np.float64(s), np.float64(t)


@njit(**_REDUCE)
def _rows_sums_plain(dy, x, A, B, po, lo, rows, S, mh, k):
    """A[po + c] = sum dy, B[po + c] = sum dy * (x - mh) over each of the rows whole rows of S
    elements from lo (mh is their group's): per row, blocks of _BLOCK in the input dtype added up
    in float64 in order (the sums _row_sums_plain's callers make). One call and one loop nest
    for a group's rows instead of a call per row, which is most of the cost when rows are short
    (7x7, 8x8 maps)."""
    if S <= _BLOCK:  # one block per row (the same sums): a loop nest without the block loop's bounds
        for c in range(rows):
            r0 = lo + c * S
            s = k[0]
            t = k[0]
            for i in range(S):
                j = np.uint64(r0 + i)
                g = dy[j]
                s += g
                t += g * (x[j] - mh)
            A[po + c] = np.float64(s)
            B[po + c] = np.float64(t)
        return
    for c in range(rows):
        r0 = lo + c * S
        s64 = 0.0
        t64 = 0.0
        for e0 in range(0, S, _BLOCK):
            ds, dt = _row_sums_plain(dy, x, r0, e0, min(e0 + _BLOCK, S), mh, k)
            s64 = _add(s64, ds)
            t64 = _add(t64, dt)
        A[po + c] = s64
        B[po + c] = t64


@njit(**_REDUCE)
def _rows_sums_relu(dy, x, w, b, st, A, B, n, g, C, Cg, S, k):
    """_rows_sums_plain over the rows of group g of sample n with ReLU: g = dy masked where its
    input z = (x - mh) * a + b is <= 0 (a, b per channel as _channel_affine makes them)."""
    grp = n * (C // Cg) + g
    mh = st[3 * grp]
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    for c in range(g * Cg, (g + 1) * Cg):
        r0 = (n * C + c) * S
        a, bc = _channel_affine(x, w, b, c, ml, rstd)
        s64 = 0.0
        t64 = 0.0
        for e0 in range(0, S, _BLOCK):
            s = k[0]
            t = k[0]
            for i in range(e0, min(e0 + _BLOCK, S)):
                j = np.uint64(r0 + i)
                gv = k[0] if _affine(x[j], mh, a, bc) <= k[0] else dy[j]
                s += gv
                t += gv * (x[j] - mh)
            s64 = _add(s64, np.float64(s))
            t64 = _add(t64, np.float64(t))
        A[n * C + c] = s64
        B[n * C + c] = t64


@njit(**_SERIAL)
def _nc_group_dx(dy, x, dx, w, b, st, A, B, n, g, C, Cg, S, act, k):
    """For group g of sample n, no activation or ReLU, once its row sums are in A, B: the group's
    (q, r) (_dx_scalars), then dx. Returns (q, r, done); done is False for the rare groups whose dx
    needs _nc_dx's exact path (_below_f32), left to the caller.
    With _rows_sums_plain or _rows_sums_relu before it, a group's whole backward is two calls of
    functions whose own calls LLVM inlines. The general path (_nc_grad_sums, then _nc_dx) makes more
    calls per group, and in helpers that branch and call others numba's reference-count pruning left
    an increment and a decrement of every array argument at each call: function calls, and atomic
    operations on cache lines both threads write for the arrays numba owns (k, A, B; arrays from
    carray, as the fast lane makes them, have no count). On 8x8 maps with 4 channels per group that
    cost more than the group's work (kernel-ab --lane: 32x128x8x8 1.22-1.33x, ReLU 1.53-1.57x)."""
    grp = n * (C // Cg) + g
    mh = st[3 * grp]
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    q64, r64 = _dx_scalars(st, A, B, n, g, C, Cg, S, w)
    if _below_f32(q64):
        return q64, r64, False
    q = _like(x, q64)
    r = _like(x, r64)
    for c in range(g * Cg, (g + 1) * Cg):
        p = _like(x, rstd * np.float64(w[c]))
        lo = (n * C + c) * S
        if act == 0:
            for i in range(S):
                j = np.uint64(lo + i)
                dx[j] = dy[j] * p + (x[j] - mh) * q + r
        else:
            a, bc = _channel_affine(x, w, b, c, ml, rstd)
            for i in range(S):
                j = np.uint64(lo + i)
                d = x[j] - mh
                gv = k[0] if d * a + bc <= k[0] else dy[j]
                dx[j] = gv * p + d * q + r
    return q64, r64, True


_SMALL_GROUP = 2048  # contiguous groups of fewer elements: several groups per work item (_nc_groups_bwd)


@njit(inline="always", **_SERIAL)
def _nc_groups_per_item(x, N, G, Cg, S, T, short_rows):
    """How many groups of a sample one work item of the contiguous kernels takes (_nc_groups_fwd,
    _nc_groups_bwd): 1 for rows longer than 4 SIMD vectors (one pair of accumulators per row ran
    slower than the block loops there: 8x256x14x14 0.86-0.90x), and in the backward (short_rows
    False) for rows shorter than one (all scalar there: 2x2 and 3x3 maps 0.73-0.86x with 8 or more
    channels per group; the forward sums a group flat, 0.96-1.57x); else doubled while the groups
    stay under _SMALL_GROUP elements in all and the items still number 8 per thread."""
    per = 1
    if S > 4 * vwidth(x) or (S < vwidth(x) and not short_rows):
        return per
    while per < G and G % (2 * per) == 0 and per * Cg * S < _SMALL_GROUP and N * G // (2 * per) >= 8 * T:
        per *= 2
    return per


@njit(**_SERIAL)
def _nc_groups_fwd(x, y, w, b, st, n, g0, g1, C, Cg, S, eps, act, k):
    """The forward of groups g0..g1 of sample n, no activation or ReLU, for the small groups
    _nc_groups_bwd takes: each group's sums of d = x - x[first] in float64 (as _f64_shifted_sums,
    in float64 SIMD vectors of widened values, vhsum's order), its statistics, then
    y = (x - mh) * a + b' row by row as _nc_normalize computes it (the same values, bit for bit,
    from the same statistics). Loop-only."""
    W = vwidth(x)
    nv = S // W
    G = C // Cg
    M = Cg * S
    n8 = M // F64_LANES
    zero = vsplat(x, k[0])
    relu = act == 1
    for g in range(g0, g1):
        grp = n * G + g
        c0 = g * Cg
        lo = (n * C + c0) * S
        shift = np.float64(x[lo])
        h = vsplat_f64(shift)
        s, t = vsplat_f64(0.0), vsplat_f64(0.0)
        s1 = 0.0
        s2 = 0.0
        for v in range(n8):  # the group is M contiguous values
            d = vsub(vload_f64(x, lo + v * F64_LANES), h)
            s, t = vadd(s, d), vmuladd(d, d, t)
        for i in range(n8 * F64_LANES, M):
            d = np.float64(x[np.uint64(lo + i)]) - shift
            s1 += d
            s2 += d * d
        _, ml, rstd = _finish_stats(st, grp, s1 + vhsum(s), s2 + vhsum(t), M, shift, eps)
        mh = st[3 * grp]
        m = vsplat(x, mh)
        for c in range(Cg):
            a64 = rstd * np.float64(w[c0 + c])  # a and b' as _channel_affine makes them
            a, bc = _like(x, a64), _like(x, np.float64(b[c0 + c]) - ml * a64)
            av, bv = vsplat(x, a), vsplat(x, bc)
            r0 = lo + c * S
            for v in range(nv):
                o = r0 + v * W
                z = vadd(vmul(vsub(vload(x, o), m), av), bv)
                vstore(y, o, vselect_lt(z, zero, zero, z) if relu else z)
            for i in range(nv * W, S):
                j = np.uint64(r0 + i)  # (unsigned: no wraparound test)
                z = (x[j] - mh) * a + bc
                y[j] = k[0] if relu and z < k[0] else z


@njit(inline="always", **_SERIAL)
def _vg_nc(dy, x, o, m, a, b, relu, zero):
    """_vg for the contiguous kernels, whose forward evaluates z = (x - m) * a + b unfused
    (_nc_normalize): (g, x - m) for the vector at o, g zeroed where z <= 0 with ReLU."""
    xd = vsub(vload(x, o), m)
    g = vload(dy, o)
    if relu:
        g = vselect_le(vadd(vmul(xd, a), b), zero, zero, g)
    return g, xd


@njit(**_SERIAL)
def _nc_groups_bwd(dy, x, dx, w, b, st, A, B, qr, ex, n, g0, g1, C, Cg, S, act, k):
    """The whole backward of groups g0..g1 of sample n, no activation or ReLU, for small groups
    (maps up to 8x8, rows of at most 4 vectors, few channels per group), where a call or two per
    group cost more than the group's work (session 17: 128x64x4x4 with G = 32 ran at 0.39x ATen's
    speed). Per row: the sums A = sum g and B = sum g * (x - mh) in SIMD vectors (vhsum's order,
    then the row's last S % W positions), then the group's (q, r) (_dx_group, also kept in qr),
    then dx. Loop-only (offsets into the arrays, not slices: a slice of w or b kept a reference
    count per group); a group needing the exact dx (_below_f32) is flagged in ex and left to the
    caller."""
    W = vwidth(x)
    nv = S // W
    G = C // Cg
    zero = vsplat(x, k[0])
    relu = act == 1
    for g in range(g0, g1):
        grp = n * G + g
        mh = st[3 * grp]
        ml = np.float64(st[3 * grp + 1])
        rstd = np.float64(st[3 * grp + 2])
        m = vsplat(x, mh)
        j0 = n * C + g * Cg
        c0 = g * Cg
        for c in range(Cg):
            a, bc, av, bv = k[0], k[0], zero, zero
            if relu:  # z = (x - mh) * a + b' as _channel_affine makes a and b'
                a64 = rstd * np.float64(w[c0 + c])
                a, bc = _like(x, a64), _like(x, np.float64(b[c0 + c]) - ml * a64)
                av, bv = vsplat(x, a), vsplat(x, bc)
            r0 = (j0 + c) * S
            s, t = zero, zero
            for v in range(nv):
                gv, xd = _vg_nc(dy, x, r0 + v * W, m, av, bv, relu, zero)
                s, t = vadd(s, gv), vmuladd(gv, xd, t)
            ss, tt = vhsum(s), vhsum(t)
            for i in range(nv * W, S):  # (as _vg_nc; an inline helper with this branch kept reference counts)
                j = np.uint64(r0 + i)  # (unsigned: no wraparound test)
                d = x[j] - mh
                gs = k[0] if relu and d * a + bc <= k[0] else dy[j]
                ss += gs
                tt += gs * d
            A[j0 + c] = np.float64(ss)
            B[j0 + c] = np.float64(tt)
        q64, r64 = _dx_group(A, B, w, j0, c0, ml, rstd, Cg, S)
        qr[2 * grp], qr[2 * grp + 1] = q64, r64
        if _below_f32(q64):
            ex[grp] = True
            continue
        q, r = _like(x, q64), _like(x, r64)
        qv, rv = vsplat(x, q), vsplat(x, r)
        for c in range(Cg):
            a64 = rstd * np.float64(w[c0 + c])
            a = _like(x, a64)  # p = a
            av, bc, bv = vsplat(x, a), k[0], zero
            if relu:
                bc = _like(x, np.float64(b[c0 + c]) - ml * a64)
                bv = vsplat(x, bc)
            r0 = (j0 + c) * S
            for v in range(nv):
                gv, xd = _vg_nc(dy, x, r0 + v * W, m, av, bv, relu, zero)
                vstore(dx, r0 + v * W, _vdx(gv, xd, av, qv, rv))
            for i in range(nv * W, S):
                j = np.uint64(r0 + i)
                d = x[j] - mh
                gs = k[0] if relu and d * a + bc <= k[0] else dy[j]
                dx[j] = smuladd(gs, a, smuladd(d, q, r))  # as _vdx


@njit(**_SERIAL)
def _nc_grad_sums(dy, x, gs, w, b, st, A, B, po, n, c0, c1, s0, s1, C, Cg, S, act, k):
    """A[po + j] = sum g, B[po + j] = sum g * (x - mh) over row c0 + j (positions s0..s1) of one
    group, blocks of _BLOCK in the input dtype added up in float64."""
    grp = n * (C // Cg) + c0 // Cg
    mh = st[3 * grp]
    if act == 0 and s0 == 0 and s1 == S and S <= _SHORT_ROW:
        _rows_sums_plain(dy, x, A, B, po, (n * C + c0) * S, c1 - c0, S, mh, k)
        return
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    if act >= 2 and s0 == 0 and s1 == S and S <= _SHORT_ROW:
        # short rows: z row by row into gs, then g = dy * act'(z) in one loop over the whole group
        # (a vector loop with one tail per group, not one per row), then the plain row sums of g
        lo = (n * C + c0) * S
        _nc_normalize(x, gs, w, b, st, n, c0, c1, 0, S, C, Cg, S, 0, k)  # z, as _affine makes it
        _act_grad_flat(dy, gs, lo, (c1 - c0) * S, act, k)
        _rows_sums_plain(gs, x, A, B, po, lo, c1 - c0, S, mh, k)
        return
    for c in range(c0, c1):
        a, bc = _channel_affine(x, w, b, c, ml, rstd)
        lo = (n * C + c) * S
        if act == 0:
            s = 0.0
            t = 0.0
            for e0 in range(s0, s1, _BLOCK):
                ds, dt = _row_sums_plain(dy, x, lo, e0, min(e0 + _BLOCK, s1), mh, k)
                s += ds
                t += dt
        else:
            s, t = _row_grad_sums(dy, x, gs, lo, s0, s1, mh, a, bc, act, k)
        A[po + c - c0] = s
        B[po + c - c0] = t


@njit(**_SERIAL)
def _nc_normalize(x, y, w, bias, st, n, c0, c1, s0, s1, C, Cg, S, act, k):
    """y = act((x - mh) * a + b) over rows c0..c1 of one group, positions s0..s1, no activation or
    ReLU (SiLU/GELU: _nc_normalize_act). The contiguous kernels make a and b per channel here from
    the group's statistics (the values _cl_sample_affine stores): a table of them, written then read
    back, cost 7x7-map kernels ~20% of their time."""
    grp = n * (C // Cg) + c0 // Cg
    mh = st[3 * grp]
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    for c in range(c0, c1):
        a, b = _channel_affine(x, w, bias, c, ml, rstd)
        lo = (n * C + c) * S
        if act == 0:
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                y[j] = (x[j] - mh) * a + b
        else:
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                z = (x[j] - mh) * a + b
                y[j] = k[0] if z < k[0] else z


# rows from this long run SiLU/GELU a row per call (_act_span, _act_row); shorter ones get z first,
# then _act_flat over the span (contiguous: the group's rows; channels-last: a tile of _CL_ROWS rows)
_ACT_SPAN_MIN = 128


@njit(**_SERIAL)
def _nc_normalize_act(x, y, w, bias, st, n, c0, c1, s0, s1, C, Cg, S, act, k):
    """_nc_normalize for SiLU/GELU: a call of _act_span per row of _ACT_SPAN_MIN positions or more;
    shorter rows get z written row by row, then _act_flat over the span. A function of its own,
    chosen by the kernel: a branch to it inside _nc_normalize changed how LLVM compiled the
    short-row loops there (7x7, 8x8 maps up to 15% slower)."""
    grp = n * (C // Cg) + c0 // Cg
    mh = st[3 * grp]
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    if s1 - s0 >= _ACT_SPAN_MIN:
        for c in range(c0, c1):
            a, b = _channel_affine(x, w, bias, c, ml, rstd)
            _act_span(x, y, (n * C + c) * S + s0, s1 - s0, mh, a, b, act, k)
        return
    # short rows: z row by row into y, then the activation in one loop over the group's span
    # (one vector loop tail per group, not one per row), as _act_grad_flat in the backward
    _nc_normalize(x, y, w, bias, st, n, c0, c1, s0, s1, C, Cg, S, 0, k)
    if s0 == 0 and s1 == S:
        _act_flat(y, (n * C + c0) * S, (c1 - c0) * S, act, k)
    else:
        for c in range(c0, c1):
            _act_flat(y, (n * C + c) * S + s0, s1 - s0, act, k)


@njit(**_SERIAL)
def _act_flat(y, lo, n, act, k):
    """y = silu/gelu(y) over n elements from lo."""
    if act == 2:
        for i in range(n):
            j = np.uint64(lo + i)
            y[j] = _silu(y[j], k)
    else:
        for i in range(n):
            j = np.uint64(lo + i)
            y[j] = _gelu(y[j], k)


@njit(**_SERIAL)
def _act_span(x, y, lo, n, mh, a, b, act, k):
    """y = silu/gelu((x - mh) * a + b) over n elements from lo. A function of its own, called once
    per row, so that the exp polynomial's constants stay in vector registers: inside the callers'
    channel loops AVX2's 16 ran out and LLVM reloaded about 16 constant broadcasts per vector (a
    scratch comparison on the Zen 3 VM: the SiLU row ~1.3x slower, bitwise the same results)."""
    if act == 2:
        for i in range(n):
            j = np.uint64(lo + i)
            y[j] = _silu((x[j] - mh) * a + b, k)
    else:
        for i in range(n):
            j = np.uint64(lo + i)
            y[j] = _gelu((x[j] - mh) * a + b, k)


@njit(**_SERIAL)
def _act_row(x, y, o, mh, a, b, C, act, k):
    """_act_span for the channels-last row at o: per-channel mh, a, b. Called once per row: with
    the loop over rows in here too, the constants were reloaded again."""
    if act == 2:
        for c in range(C):
            j = np.uint64(o + c)
            y[j] = _silu((x[j] - mh[c]) * a[c] + b[c], k)
    else:
        for c in range(C):
            j = np.uint64(o + c)
            y[j] = _gelu((x[j] - mh[c]) * a[c] + b[c], k)


@njit(**_SERIAL)
def _nc_dx(dy, x, dx, w, bias, st, q64, r64, n, c0, c1, s0, s1, C, Cg, S, act, k):
    """dx = g * p + (x - mh) * q + r over rows c0..c1 of one group, positions s0..s1 (g read back
    from dx for SiLU/GELU); q, r are the group's (_dx_scalars), p = rstd * w made per channel."""
    grp = n * (C // Cg) + c0 // Cg
    mh = st[3 * grp]
    ml = np.float64(st[3 * grp + 1])
    rstd = np.float64(st[3 * grp + 2])
    if _below_f32(q64):  # rare: the exact path (see _below_f32)
        for c in range(c0, c1):
            a, b = _channel_affine(x, w, bias, c, ml, rstd)
            lo = (n * C + c) * S
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                dx[j] = _exact_dx(dy[j], x[j], dx[j], mh, a, b, rstd * np.float64(w[c]), q64, r64, act, k)
        return
    q = _like(x, q64)
    r = _like(x, r64)
    for c in range(c0, c1):
        a, b = _channel_affine(x, w, bias, c, ml, rstd)
        p = _like(x, rstd * np.float64(w[c]))
        lo = (n * C + c) * S
        if act == 0:
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                dx[j] = dy[j] * p + (x[j] - mh) * q + r
        elif act == 1:
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                d = x[j] - mh
                g = k[0] if d * a + b <= k[0] else dy[j]
                dx[j] = g * p + d * q + r
        else:
            for i in range(s0, s1):
                j = np.uint64(lo + i)
                dx[j] = dx[j] * p + (x[j] - mh) * q + r


@njit(inline="always", **_SERIAL)
def _below_f32(q64):
    """q = -rstd^2 m2 under float32's normal range: float32 inputs beyond ~1e19 (rstd < ~1e-19),
    where q rounded to float32 loses its digits or becomes 0 and dx its (x - mh) * q term. Such
    groups take the float64 _exact_dx (float64 inputs too, harmlessly, if ever)."""
    return q64 != 0.0 and abs(q64) < 1.1754943508222875e-38


@njit(**_SERIAL)
def _exact_dx(dyv, xv, gv, mh, a, b, p64, q64, r64, act, k):
    """One element of dx = g * p + (x - mh) * q + r in float64 (g is dy, dy masked by ReLU, or the
    act'-scaled dy parked in dx for SiLU/GELU), rounded once to x's dtype."""
    d = xv - mh
    if act == 0:
        g = dyv
    elif act == 1:
        g = k[0] if d * a + b <= k[0] else dyv
    else:
        g = gv
    return _like(k, np.float64(g) * p64 + np.float64(d) * q64 + r64)


# ----------------------------------------------------------------------------- per-group bookkeeping
@njit(inline="always", **_SERIAL)
def _finish_stats(st, i, s1, s2, M, shift, eps):
    """Store (mean_hi, mean_lo, rstd) of group i from shifted sums; return them as float64."""
    m = s1 / M
    var = s2 / M - m * m
    if var < 0.0:
        var = 0.0
    st[3 * i] = shift + m
    mh = np.float64(st[3 * i])
    st[3 * i + 1] = (shift - mh) + m
    st[3 * i + 2] = 1.0 / math.sqrt(var + eps)
    return mh, np.float64(st[3 * i + 1]), np.float64(st[3 * i + 2])


@njit(**_SERIAL)
def _channel_affine(x, w, b, c, ml, rstd):
    """(a, b') of channel c in x's dtype, for z = (x - mh) * a + b': a = rstd * w and
    b' = b - ml * a with a in float64."""
    a = rstd * np.float64(w[c])
    return _like(x, a), _like(x, np.float64(b[c]) - ml * a)


@njit(inline="always", **_SERIAL)
def _dx_scalars(st, A, B, n, g, C, Cg, S, w):
    """From per-channel sums A = sum g and T = sum g (x - mh) (held in B), finish
    B = sum g * xhat for the channels of group g; return its (q, r) in float64, for
    dx = g * p + (x - mh) * q + r with p = rstd * w per channel. Inlined into its callers
    (a numba call per group cost as much as the work: 650 -> 320 ns per sample of 8 groups of
    16 channels)."""
    grp = n * (C // Cg) + g
    c0 = g * Cg
    return _dx_group(A, B, w, n * C + c0, c0, np.float64(st[3 * grp + 1]), np.float64(st[3 * grp + 2]), Cg, S)


@njit(inline="always", **_SERIAL)
def _dx_group(A, B, w, j0, c0, ml, rstd, Cg, S):
    """_dx_scalars' work on the group's channels at A/B[j0:] and w[c0:]. The channels-last path
    passes slices and offsets 0 (indices known non-negative: no wraparound tests; 1.8x faster per
    group there, session 16); the contiguous path keeps its offsets (through slices its backward
    ran slower)."""
    m1 = 0.0
    m2 = 0.0
    for c in range(Cg):
        bj = rstd * (B[j0 + c] - ml * A[j0 + c])
        B[j0 + c] = bj
        wc = np.float64(w[c0 + c])
        m1 += wc * A[j0 + c]
        m2 += wc * bj
    M = Cg * S
    m1 /= M
    m2 /= M
    return -rstd * rstd * m2, rstd * (rstd * m2 * ml - m1)


@njit(inline="always", **_SERIAL)
def _add_parts(A, B, part, n, nch, C):
    """A/B[n, :] += the (sum g, sum g (x - mh)) rows of sample n's nch chunks in part, in order."""
    for ch in range(nch):
        po = (n * nch + ch) * 2 * C
        for c in range(C):
            A[n * C + c] += part[po + c]
            B[n * C + c] += part[po + C + c]


@njit(**_SERIAL)
def _reduce_params(A, B, dw, db, N, C):
    """dbias[c] = sum_n A[n, c], dweight[c] = sum_n B[n, c], over n in order, by adding the rows of
    A and B into their first rows: the sums a walk over n per channel makes, bit for bit, but the
    inner loop runs over contiguous channels through slices (a SIMD loop; the strided walk took
    20 us of the 104 us channels-last backward of 128x128x4x4 on 2 threads, session 17)."""
    a0, b0 = A[:C], B[:C]
    for n in range(1, N):
        an, bn = A[n * C:(n + 1) * C], B[n * C:(n + 1) * C]
        for c in range(C):
            a0[c] += an[c]
            b0[c] += bn[c]
    for c in range(C):
        db[c] = a0[c]
        dw[c] = b0[c]


# ----------------------------------------------------------------------------- contiguous (N, C, S)
@njit(**_PARALLEL)
def _forward_nc(x, y, w, b, st, N, C, S, G, eps, act, nch):
    """nch == 0: one item per (n, g), statistics then normalization while the group is in
    cache; nch >= 1: items (n, c, chunk of S), partial sums merged per group in a fixed order."""
    k = _consts(x)
    Cg = C // G
    M = Cg * S
    off = _shift_offsets(Cg, S, S, 1) if M >= _F32_SUMS_FROM else np.empty(0, np.int64)
    items = N * G if nch == 0 else N * C * nch
    per = _nc_groups_per_item(x, N, G, Cg, S, _thread_count(), True) if nch == 0 and act <= 1 else 1
    if per > 1:  # small groups: several per item (a parallel loop of its own, as in _backward_nc)
        ipn = G // per
        for it0 in prange(N * ipn):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            n = it // ipn
            g0 = (it - n * ipn) * per
            _nc_groups_fwd(x, y, w, b, st, n, g0, g0 + per, C, Cg, S, eps, act, k)
        return
    if nch > 0:  # few groups (batch 1): made once here, each group's shift is the same in every chunk
        shifts = np.empty(N * G, x.dtype)
        for i in range(N * G):
            shifts[i] = _nc_shift(x, i * M, M, off)
        part = np.empty(2 * items)
        for it0 in prange(items):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            row = it // nch
            ch = it - row * nch
            r0 = row * S
            shift = shifts[row // Cg]  # rows (n, c) in order: group n * G + c // Cg
            if M < _F32_SUMS_FROM:
                s1, s2 = _f64_shifted_sums(x[r0 + ch * S // nch:r0 + (ch + 1) * S // nch], np.float64(shift))
            else:
                s1, s2 = _shifted_sums(x[r0 + ch * S // nch:r0 + (ch + 1) * S // nch], shift, k)
            part[2 * it] = s1
            part[2 * it + 1] = s2
        for i in range(N * G):
            n = i // G
            g = i - n * G
            s1 = 0.0
            s2 = 0.0
            for it in range((n * C + g * Cg) * nch, (n * C + g * Cg + Cg) * nch):
                s1 += part[2 * it]
                s2 += part[2 * it + 1]
            shift64 = np.float64(shifts[i])
            if M >= _F32_SUMS_FROM and _far_from_mean(s1, s2, M):  # rare: summed again, serially, in float64
                shift64 = np.float64(_like(x, shift64 + s1 / M))
                s1, s2 = _f64_shifted_sums(x[i * M:(i + 1) * M], shift64)
            _finish_stats(st, i, s1, s2, M, shift64, eps)
    for it0 in prange(items):
        it = np.int64(it0)  # prange indices are unsigned; one signature per helper
        if nch == 0:
            n = it // G
            g = it - n * G
            lo = (n * C + g * Cg) * S
            if M < _F32_SUMS_FROM:
                shift64 = np.float64(x[lo])
                s1, s2 = _f64_shifted_sums(x[lo:lo + M], shift64)
            else:  # the shift in x's dtype (a float64 would promote the sums)
                s1, s2, shift64 = _nc_group_sums(x[lo:lo + M], _group_shift(x, lo, off), k)
            _finish_stats(st, it, s1, s2, M, shift64, eps)
            c0, c1, s0, s1_ = g * Cg, (g + 1) * Cg, 0, S
        else:
            row = it // nch
            ch = it - row * nch
            n = row // C
            c0 = row - n * C
            c1, s0, s1_ = c0 + 1, ch * S // nch, (ch + 1) * S // nch
        if act >= 2:
            _nc_normalize_act(x, y, w, b, st, n, c0, c1, s0, s1_, C, Cg, S, act, k)
        else:
            _nc_normalize(x, y, w, b, st, n, c0, c1, s0, s1_, C, Cg, S, act, k)


@njit(**_PARALLEL)
def _backward_nc(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch):
    """dx, and dw/db (C,) from the per-(n, c) sums A = sum g, B = sum g * xhat.
    Same decomposition as the forward."""
    k = _consts(x)
    Cg = C // G
    A = np.empty(N * C)
    B = np.empty(N * C)
    qr = np.empty(2 * N * G)  # each group's (q, r): the chunked path's, and the small groups' exact path's
    items = N * G if nch == 0 else N * C * nch
    per = _nc_groups_per_item(x, N, G, Cg, S, _thread_count(), False) if nch == 0 and act <= 1 else 1
    if per > 1:  # small groups: several per item (a parallel loop of its own: see _nc_group_dx)
        ex = np.zeros(N * G, np.bool_)
        ipn = G // per
        for it0 in prange(N * ipn):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            n = it // ipn
            g0 = (it - n * ipn) * per
            _nc_groups_bwd(dy, x, dx, w, b, st, A, B, qr, ex, n, g0, g0 + per, C, Cg, S, act, k)
        for i in range(N * G):
            if ex[i]:  # rare: the exact path (see _below_f32)
                n = i // G
                g = i - n * G
                _nc_dx(dy, x, dx, w, b, st, qr[2 * i], qr[2 * i + 1], n, g * Cg, (g + 1) * Cg, 0, S, C, Cg, S, act, k)
        _reduce_params(A, B, dw, db, N, C)
        return
    if nch > 0:
        partA = np.empty(items)
        partB = np.empty(items)
        for it0 in prange(items):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            row = it // nch
            ch = it - row * nch
            n = row // C
            c = row - n * C
            _nc_grad_sums(dy, x, dx, w, b, st, partA, partB, it, n, c, c + 1, ch * S // nch, (ch + 1) * S // nch, C, Cg, S, act, k)
        for row in range(N * C):
            s = 0.0
            t = 0.0
            for it in range(row * nch, (row + 1) * nch):
                s += partA[it]
                t += partB[it]
            A[row] = s
            B[row] = t
        for i in range(N * G):
            qr[2 * i], qr[2 * i + 1] = _dx_scalars(st, A, B, i // G, i % G, C, Cg, S, w)
    for it0 in prange(items):
        it = np.int64(it0)  # prange indices are unsigned; one signature per helper
        done = False
        if nch == 0:
            n = it // G
            g = it - n * G
            c0, c1, s0, s1 = g * Cg, (g + 1) * Cg, 0, S
            if act == 0:
                _rows_sums_plain(dy, x, A, B, n * C + c0, (n * C + c0) * S, Cg, S, st[3 * it], k)
                q, r, done = _nc_group_dx(dy, x, dx, w, b, st, A, B, n, g, C, Cg, S, act, k)
            elif act == 1:
                _rows_sums_relu(dy, x, w, b, st, A, B, n, g, C, Cg, S, k)
                q, r, done = _nc_group_dx(dy, x, dx, w, b, st, A, B, n, g, C, Cg, S, act, k)
            else:
                _nc_grad_sums(dy, x, dx, w, b, st, A, B, n * C + g * Cg, n, g * Cg, (g + 1) * Cg, 0, S, C, Cg, S, act, k)
                q, r = _dx_scalars(st, A, B, n, g, C, Cg, S, w)
        else:
            row = it // nch
            ch = it - row * nch
            n = row // C
            c0 = row - n * C
            c1, s0, s1 = c0 + 1, ch * S // nch, (ch + 1) * S // nch
            grp = n * G + c0 // Cg
            q, r = qr[2 * grp], qr[2 * grp + 1]
        if not done:
            _nc_dx(dy, x, dx, w, b, st, q, r, n, c0, c1, s0, s1, C, Cg, S, act, k)
    _reduce_params(A, B, dw, db, N, C)


# ----------------------------------------------------------------------------- channels-last (N, S, C)
_CL_ROWS = 64  # rows accumulated in the input dtype before a float64 accumulation
_CL_TILE = 512  # values per vector loop of the row sums: R = _CL_TILE // C rows at a time, at most 8


@njit(**_SERIAL)
def _cl_tile_rows(C):
    """R, the rows the channels-last row sums take at a time (at least 1, at most 8)."""
    return max(1, min(8, _CL_TILE // C))


@njit(**_SERIAL)
def _tile(v, R):
    """R copies of the vector v end to end: per-channel values lined up with R rows of (S, C) data."""
    C = v.shape[0]
    t = np.empty(R * C, v.dtype)
    for r in range(R):
        t[r * C:(r + 1) * C] = v
    return t


@njit(**_SERIAL)
def _fold_rows(acc, s, R, C):
    """s[c] += the R float32 partial sums of channel c in acc (R rows of C), in float64."""
    for r in range(R):
        for c in range(C):
            s[c] += np.float64(acc[r * C + c])


_AVX2_BLOCK_SAMPLE_BYTES = 65536


@njit(inline="always", **_SERIAL)
def vec_rows_rule(C, S, itemsize, avx512):
    """R, the (S, C) rows one block of 4 SIMD vectors spans, for the _cl_*_vec kernels: 1 when
    C is a multiple of the block and a row is at most 1 KiB, 2 or 4 when a block holds whole
    rows; 0 when neither (the row-span kernels run). Wider rows ran slower in blocks (a block
    walks down the tile touching a page or more per row; 512-channel float32 rows in 16-row
    tiles: 0.71-0.94x the row-span loops, session 12, Zen 5). Without AVX-512 (session 13, Zen 3,
    AVX2) rows of several blocks ran slower too unless the sample was small: 0.76-0.91x forward,
    0.54-0.93x backward for samples of 196 KiB to 3 MiB, 1.05-1.28x at 32-64 KiB; there they
    take the blocks only for samples up to _AVX2_BLOCK_SAMPLE_BYTES. The rule depends on the
    shape alone, so the forward and the backward agree on it (and so on ReLU's mask)."""
    W = VECTOR_BYTES // itemsize
    L = 4 * W
    if C % L == 0 and C * itemsize <= 1024:
        if avx512 or C == L or S * C * itemsize <= _AVX2_BLOCK_SAMPLE_BYTES:
            return 1
        return 0
    if C % W == 0 and L % C == 0:
        return L // C
    return 0


@njit(inline="always", **_SERIAL)
def _cl_vec_rows(C, S, itemsize):
    """vec_rows_rule on this CPU (simd.HOST_AVX512)."""
    return vec_rows_rule(C, S, itemsize, HOST_AVX512)


@njit(**_SERIAL)
def _block_coefs(v, R):
    """v laid against a block of R rows (R copies end to end), or v itself when R == 1."""
    return _tile(v, R) if R > 1 else v


@njit(inline="always", **_SERIAL)
def _vload4(a, i, W):
    """The block's 4 vectors a[i:i + W], ..., a[i + 3W:i + 4W]."""
    return vload(a, i), vload(a, i + W), vload(a, i + 2 * W), vload(a, i + 3 * W)


@njit(inline="always", **_SERIAL)
def _vstore4(a, i, W, v0, v1, v2, v3):
    vstore(a, i, v0)
    vstore(a, i + W, v1)
    vstore(a, i + 2 * W, v2)
    vstore(a, i + 3 * W, v3)


@njit(inline="always", **_SERIAL)
def _vaffine(xd, a, b):
    """z = (x - m) * a + b from xd = x - m, with one fused multiply-add where the CPU has FMA
    (evaluated as written, the extra instruction cost the ReLU backward up to 20-25% on
    2x256x56x56). The block loops' scalar rows use _saffine, the same on scalars: forward and
    backward agree on ReLU's mask whichever rows a work split hands to vectors."""
    return vmuladd(xd, a, b)


@njit(inline="always", **_SERIAL)
def _saffine(xv, mh, a, b):
    """_vaffine for one element of a block loop's scalar rows."""
    return smuladd(xv - mh, a, b)


@njit(inline="always", **_SERIAL)
def _vz(x, o, m, a, b, relu, zero):
    """z = (x - m) * a + b for the vector at x[o:], ReLU'd when relu; zero: a zero vector."""
    z = _vaffine(vsub(vload(x, o), m), a, b)
    return vselect_lt(z, zero, zero, z) if relu else z


@njit(inline="always", **_SERIAL)
def _vg(dy, x, o, m, a, b, relu, zero):
    """(g, x - m) for the vector at o: g = dy, zeroed where z = (x - m) * a + b <= 0 with ReLU."""
    t = vload(dy, o)
    xd = vsub(vload(x, o), m)
    return (vselect_le(_vaffine(xd, a, b), zero, zero, t) if relu else t), xd


@njit(inline="always", **_SERIAL)
def _vdx(t, xd, p, q, r):
    """dx = g * p + (x - m) * q + r with multiply-adds fused where the CPU has FMA."""
    return vmuladd(t, p, vmuladd(xd, q, r))


# The channels-last forward and backward without activation or with ReLU on shapes _cl_vec_rows
# takes (_forward_cl_vec, _backward_cl_vec). Session 16 found a fixed cost of ~1.2 us per sample on small maps (the same
# bytes as 128 samples of 4x4 took 3x as long as 2 of 32x32), made of: the per-group coefficient
# loops (scalar: numba tests every index computed from a signed offset for wraparound, so they did
# not vectorize; through slices indexed from 0 they do); the vector width read from the array's
# itemsize at run time (W, 2W, 3W were not constants: a pointer register per offset, reloaded each
# row; vwidth is a constant); and numba's reference counts, which LLVM's pruning keeps where a
# function can raise (a range() with a step that is not a constant checks for 0) or calls in a
# branch. These helpers are loops only (no counts: `spot_checks.py refcounts`), take the kernel's
# arrays whole with offsets, and write a per-thread coefficient table whose rows hold their C
# values R times over (CR = R * C), as the block loops read them.
@njit(inline="always", **_SERIAL)
def _fold_block_at(tmp, toff, s, so, c0, C, L, R):
    """A block's L float32 sums tmp[toff:toff + L] added in float64 to its channels' sums in
    s[so:so + C]: channels c0.. (R == 1), or R rows of all C channels (R > 1, c0 == 0); through
    slices (indices from 0: no wraparound tests)."""
    if R == 1:
        sv, tv = s[so + c0:so + c0 + L], tmp[toff:toff + L]
        for j in range(L):
            sv[j] += np.float64(tv[j])
    else:
        sv = s[so:so + C]
        for rr in range(R):
            tv = tmp[toff + rr * C:toff + (rr + 1) * C]
            for c in range(C):
                sv[c] += np.float64(tv[c])


@njit(inline="always", **_SERIAL)
def _tile_rows(cf, base, rows, C, CR):
    """Copy the first C values of each of the rows (CR apart, from cf[base]) over the rest of the row."""
    for rr in range(1, CR // C):
        for k in range(rows):
            for c in range(C):
                cf[base + k * CR + rr * C + c] = cf[base + k * CR + c]


@njit(**_SERIAL)
def _cl_sample_affine(cf, base, st, n, G, C, Cg, CR, w, b):
    """The coefficient rows of every group of sample n for z = (x - mh) * a + b' (as _channel_affine:
    a = rstd * w and b' = b - ml * a with a in float64) at cf[base:]: the MH, A and B rows, each CR
    values apart and tiled CR // C times (CR = C: one copy, the row functions' layout). The channel
    loops go through slices: SIMD loops, see above."""
    for g in range(G):
        grp = n * G + g
        mh = _like(cf, np.float64(st[3 * grp]))
        ml = np.float64(st[3 * grp + 1])
        rstd = np.float64(st[3 * grp + 2])
        c0 = g * Cg
        wg, bg = w[c0:c0 + Cg], b[c0:c0 + Cg]
        o = base + c0
        mr, ar, br = cf[o + _MH * CR:o + _MH * CR + Cg], cf[o + _A * CR:o + _A * CR + Cg], cf[o + _B * CR:o + _B * CR + Cg]
        for j in range(Cg):  # (as _channel_affine) indices from 0: no wraparound test, a SIMD loop
            a = rstd * np.float64(wg[j])
            mr[j] = mh
            ar[j] = _like(cf, a)
            br[j] = _like(cf, np.float64(bg[j]) - ml * a)
    _tile_rows(cf, base + _MH * CR, 3, C, CR)


@njit(**_SERIAL)
def _cl_sample_dx_coefs(cf, base, st, A, B, qr, n, G, C, Cg, CR, S, w):
    """Every group's (q, r) of sample n into qr (_dx_group), then the P/Q/R rows (p = rstd * w, q, r
    per channel) at cf[base:], laid out as in _cl_sample_affine; returns whether a group needs the
    exact dx path (_below_f32)."""
    exact = False
    for g in range(G):
        rstd = np.float64(st[3 * (n * G + g) + 2])
        c0 = g * Cg
        j0 = n * C + c0
        wg = w[c0:c0 + Cg]
        q, r = _dx_group(A[j0:j0 + Cg], B[j0:j0 + Cg], wg, 0, 0, np.float64(st[3 * (n * G + g) + 1]), rstd, Cg, S)
        qr[2 * (n * G + g)], qr[2 * (n * G + g) + 1] = q, r
        if _below_f32(q):
            exact = True
        qc, rc = _like(cf, q), _like(cf, r)
        o = base + c0
        pr, qv, rv = cf[o + _P * CR:o + _P * CR + Cg], cf[o + _Q * CR:o + _Q * CR + Cg], cf[o + _R * CR:o + _R * CR + Cg]
        for j in range(Cg):
            pr[j] = _like(cf, rstd * np.float64(wg[j]))
            qv[j] = qc
            rv[j] = rc
    _tile_rows(cf, base + _P * CR, 3, C, CR)
    return exact


@njit(**_SERIAL)
def _cl_grad_vec(dy, x, A, B, sa, sb, cf, co, CR, tmp, to, xo, slo, shi, C, R, act, k):
    """Gradient sums without activation or with ReLU (g = dy, or 0 where z <= 0) over rows slo..shi
    of the sample at x[xo:]: A[sa + c] += sum g, B[sb + c] += sum g * (x - mh[c]), with the
    coefficients at cf[co:] (rows of CR). Blocks of 4 SIMD vectors (4W channels of a row, or R
    whole rows) run down each _CL_ROWS-row tile accumulating in x's dtype, through the buffer
    tmp[to:to + 2L] into float64, as in _cl_stat_vec; the tile's last (r1 - r0) % R rows
    are added directly in float64."""
    W = vwidth(x)
    L = 4 * W
    relu = act == 1
    zero = vsplat(x, k[0])
    mo, ao, bo = co + _MH * CR, co + _A * CR, co + _B * CR
    for r0 in range(slo, shi, _CL_ROWS):
        r1 = min(r0 + _CL_ROWS, shi)
        rv = r1 - (r1 - r0) % R
        for cb in range(CR // L):
            c0 = cb * L
            m0, m1, m2, m3 = _vload4(cf, mo + c0, W)
            a0, a1, a2, a3 = _vload4(cf, ao + c0, W)
            b0, b1, b2, b3 = _vload4(cf, bo + c0, W)
            g0 = vsplat(x, 0.0)
            g1, g2, g3, d0, d1, d2, d3 = g0, g0, g0, g0, g0, g0, g0
            for i in range((rv - r0) // R):
                o = xo + (r0 + i * R) * C + c0
                t, xd = _vg(dy, x, o, m0, a0, b0, relu, zero)
                g0, d0 = vadd(g0, t), vmuladd(t, xd, d0)
                t, xd = _vg(dy, x, o + W, m1, a1, b1, relu, zero)
                g1, d1 = vadd(g1, t), vmuladd(t, xd, d1)
                t, xd = _vg(dy, x, o + 2 * W, m2, a2, b2, relu, zero)
                g2, d2 = vadd(g2, t), vmuladd(t, xd, d2)
                t, xd = _vg(dy, x, o + 3 * W, m3, a3, b3, relu, zero)
                g3, d3 = vadd(g3, t), vmuladd(t, xd, d3)
            _vstore4(tmp, to, W, g0, g1, g2, g3)
            _vstore4(tmp, to + L, W, d0, d1, d2, d3)
            _fold_block_at(tmp, to, A, sa, c0, C, L, R)
            _fold_block_at(tmp, to + L, B, sb, c0, C, L, R)
        for s in range(rv, r1):
            for c in range(C):
                j = xo + s * C + c
                mh = cf[mo + c]
                g = k[0] if relu and _saffine(x[j], mh, cf[ao + c], cf[bo + c]) <= k[0] else dy[j]
                d = x[j] - mh
                A[sa + c] += np.float64(g)
                B[sb + c] += np.float64(g * d)


@njit(**_SERIAL)
def _cl_dx_vec(dy, x, dx, cf, co, CR, xo, slo, shi, C, R, act, k):
    """dx = g * p + (x - mh) * q + r, g as in _cl_grad_vec, over rows slo..shi: blocks of 4 SIMD
    vectors with the coefficients (at cf[co:], rows of CR) in registers, as in
    _cl_normalize_vec."""
    W = vwidth(x)
    L = 4 * W
    relu = act == 1
    zero = vsplat(x, k[0])
    mo, ao, bo = co + _MH * CR, co + _A * CR, co + _B * CR
    po, qo, ro = co + _P * CR, co + _Q * CR, co + _R * CR
    for r0 in range(slo, shi, _CL_ROWS):
        r1 = min(r0 + _CL_ROWS, shi)
        rv = r1 - (r1 - r0) % R
        for cb in range(CR // L):
            c0 = cb * L
            m0, m1, m2, m3 = _vload4(cf, mo + c0, W)
            a0, a1, a2, a3 = _vload4(cf, ao + c0, W)
            b0, b1, b2, b3 = _vload4(cf, bo + c0, W)
            p0, p1, p2, p3 = _vload4(cf, po + c0, W)
            q0, q1, q2, q3 = _vload4(cf, qo + c0, W)
            t0, t1, t2, t3 = _vload4(cf, ro + c0, W)
            for i in range((rv - r0) // R):
                o = xo + (r0 + i * R) * C + c0
                t, xd = _vg(dy, x, o, m0, a0, b0, relu, zero)
                vstore(dx, o, _vdx(t, xd, p0, q0, t0))
                t, xd = _vg(dy, x, o + W, m1, a1, b1, relu, zero)
                vstore(dx, o + W, _vdx(t, xd, p1, q1, t1))
                t, xd = _vg(dy, x, o + 2 * W, m2, a2, b2, relu, zero)
                vstore(dx, o + 2 * W, _vdx(t, xd, p2, q2, t2))
                t, xd = _vg(dy, x, o + 3 * W, m3, a3, b3, relu, zero)
                vstore(dx, o + 3 * W, _vdx(t, xd, p3, q3, t3))
        for s in range(rv, r1):
            for c in range(C):
                j = xo + s * C + c
                mh = cf[mo + c]
                g = k[0] if relu and _saffine(x[j], mh, cf[ao + c], cf[bo + c]) <= k[0] else dy[j]
                dx[j] = smuladd(g, cf[po + c], smuladd(x[j] - mh, cf[qo + c], cf[ro + c]))  # as _vdx


@njit(**_SERIAL)
def _cl_stat_rows(x, s1, s2, shift, xo, slo, shi, C, Rv):
    """s1[c] += sum d, s2[c] += sum d*d over rows slo..shi of the sample at x[xo:], with
    d = x - shift[c] (shift in x's dtype); blocks of _CL_ROWS rows are summed in x's dtype
    (full SIMD width), then added in float64. R rows are taken at a time as one span of R*C
    values against R copies of the shifts: one long vector loop instead of a short one per row
    (whose set-up cost as much as its work for C <= 256 on AVX-512), R partial sums per channel.
    Rv > 0 (_cl_vec_rows, for the whole tensor's shape): _cl_stat_vec runs instead."""
    if Rv > 0:
        L = 4 * vwidth(x)
        _cl_stat_vec(x, s1, s2, 0, 0, _block_coefs(shift, Rv), 0, np.empty(2 * L, x.dtype), 0, xo, slo, shi, C, Rv)
        return
    R = _cl_tile_rows(C)
    sht = _tile(shift, R)
    a1 = np.empty(R * C, x.dtype)
    a2 = np.empty(R * C, x.dtype)
    for r0 in range(slo, shi, _CL_ROWS):
        a1[:] = 0
        a2[:] = 0
        r1 = min(r0 + _CL_ROWS, shi)
        for s in range(r0, r1, R):
            m = min(R, r1 - s) * C
            xs = x[xo + s * C:xo + s * C + m]
            for j in range(m):
                d = xs[j] - sht[j]
                a1[j] += d
                a2[j] += d * d
        _fold_rows(a1, s1, R, C)
        _fold_rows(a2, s2, R, C)


@njit(**_SERIAL)
def _cl_normalize_rows(x, y, mh, a, b, xo, slo, shi, C, Rv, act, k):
    if act >= 2 and C >= _ACT_SPAN_MIN:
        for s in range(slo, shi):
            _act_row(x, y, xo + s * C, mh, a, b, C, act, k)
        return
    if act >= 2:  # short rows: z for a tile of rows, then the activation in one loop over the tile
        for r0 in range(slo, shi, _CL_ROWS):
            r1 = min(r0 + _CL_ROWS, shi)
            _cl_affine_rows(x, y, mh, a, b, xo, r0, r1, C, 0, k)
            _act_flat(y, xo + r0 * C, (r1 - r0) * C, act, k)
        return
    _cl_affine_rows(x, y, mh, a, b, xo, slo, shi, C, act, k)


@njit(**_SERIAL)
def _cl_affine_rows(x, y, mh, a, b, xo, slo, shi, C, act, k):
    """y = (x - mh) * a + b (act 0) or its ReLU over rows slo..shi, row-span loops."""
    for s in range(slo, shi):
        xr = x[xo + s * C:xo + (s + 1) * C]
        yr = y[xo + s * C:xo + (s + 1) * C]
        if act == 0:
            for c in range(C):
                yr[c] = (xr[c] - mh[c]) * a[c] + b[c]
        else:
            for c in range(C):
                z = (xr[c] - mh[c]) * a[c] + b[c]
                yr[c] = k[0] if z < k[0] else z


@njit(**_SERIAL)
def _cl_grad_rows(dy, x, dx, sg, sgd, mh, a, b, xo, slo, shi, C, Rv, act, k):
    """sg[c] += sum g, sgd[c] += sum g * (x - mh[c]); g parked in dx for SiLU/GELU.
    Blocks of _CL_ROWS rows are summed in x's dtype, then added in float64; R rows at a time
    as one span against tiled coefficients, as in _cl_stat_rows. Without activation or with
    ReLU, shapes that _cl_vec_rows takes run _backward_cl_vec instead."""
    R = _cl_tile_rows(C)
    mt = _tile(mh, R)
    at = _tile(a, R)
    bt = _tile(b, R)
    ag = np.empty(R * C, x.dtype)
    ad = np.empty(R * C, x.dtype)
    for r0 in range(slo, shi, _CL_ROWS):
        ag[:] = 0
        ad[:] = 0
        r1 = min(r0 + _CL_ROWS, shi)
        for s in range(r0, r1, R):
            o = xo + s * C
            m = min(R, r1 - s) * C
            xs = x[o:o + m]
            dys = dy[o:o + m]
            if act == 0:
                for j in range(m):
                    g = dys[j]
                    ag[j] += g
                    ad[j] += g * (xs[j] - mt[j])
            elif act == 1:
                for j in range(m):
                    xv = xs[j]
                    g = k[0] if _affine(xv, mt[j], at[j], bt[j]) <= k[0] else dys[j]
                    ag[j] += g
                    ad[j] += g * (xv - mt[j])
            else:
                _act_grad_span(dy, x, dx, ag, ad, mt, at, bt, o, m, act, k)
        _fold_rows(ag, sg, R, C)
        _fold_rows(ad, sgd, R, C)


@njit(**_SERIAL)
def _cl_dx_rows(dy, x, dx, mh, a, b, p, q, r, xo, slo, shi, C, Rv, act, k):
    for s in range(slo, shi):
        xr = x[xo + s * C:xo + (s + 1) * C]
        dyr = dy[xo + s * C:xo + (s + 1) * C]
        dxr = dx[xo + s * C:xo + (s + 1) * C]
        if act == 0:
            for c in range(C):
                dxr[c] = dyr[c] * p[c] + (xr[c] - mh[c]) * q[c] + r[c]
        elif act == 1:
            for c in range(C):
                d = xr[c] - mh[c]
                g = k[0] if d * a[c] + b[c] <= k[0] else dyr[c]
                dxr[c] = g * p[c] + d * q[c] + r[c]
        else:
            for c in range(C):
                dxr[c] = dxr[c] * p[c] + (xr[c] - mh[c]) * q[c] + r[c]


@njit(**_SERIAL)
def _cl_dx_rows_exact(dy, x, dx, cf, co, CR, st, w, qr, n, G, Cg, xo, slo, shi, C, act, k):
    """_cl_dx_rows through _exact_dx, for a sample with a group whose q is below float32's range;
    the sample's mean, a and b' rows of the coefficient table start at cf[co], CR apart."""
    for s in range(slo, shi):
        for c in range(C):
            grp = n * G + c // Cg
            j = xo + s * C + c
            p64 = np.float64(st[3 * grp + 2]) * np.float64(w[c])
            dx[j] = _exact_dx(dy[j], x[j], dx[j], cf[co + c], cf[co + CR + c], cf[co + 2 * CR + c], p64,
                              qr[2 * grp], qr[2 * grp + 1], act, k)


@njit(**_PARALLEL)
def _forward_cl(x, y, w, b, st, N, C, S, G, eps, act, nch):
    """nch == 0: one item per sample; nch >= 1: items (n, chunk of S), split reduction."""
    k = _consts(x)
    Rv = _cl_vec_rows(C, S, x.itemsize)
    if act <= 1 and Rv > 0:
        _forward_cl_vec(x, y, w, b, st, N, C, S, G, eps, Rv, act, nch, k)
        return
    Cg = C // G
    off = _shift_offsets(Cg, S, 1, C)
    cf = np.empty(N * 6 * C, x.dtype)
    items = N if nch == 0 else N * nch
    if nch > 0:  # few samples (batch 1): made once here, each channel's shift is the same in every chunk
        shifts = np.empty(N * C, x.dtype)
        for n in range(N):
            _cl_sample_shifts(x, n * S * C, shifts, n * C, C, Cg, C, off)
        part = np.zeros(items * 2 * C)
        for it0 in prange(items):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            n = it // nch
            ch = it - n * nch
            po = it * 2 * C
            _cl_stat_rows(
                x, part[po:po + C], part[po + C:po + 2 * C], shifts[n * C:(n + 1) * C],
                n * S * C, ch * S // nch, (ch + 1) * S // nch, C, Rv,
            )
        for n in range(N):
            _cl_chunk_stats(x, st, part, shifts, n * C, n, nch, G, C, Cg, S, eps)
            _cl_sample_affine(cf, n * 6 * C, st, n, G, C, Cg, C, w, b)
    for it0 in prange(items):
        it = np.int64(it0)  # prange indices are unsigned; one signature per helper
        if nch == 0:
            n = it
            s0, s1_ = np.int64(0), S  # not the literal 0: one compiled signature for both decompositions
            shift = np.empty(C, x.dtype)
            _cl_sample_shifts(x, n * S * C, shift, 0, C, Cg, C, off)
            acc = np.zeros(2 * C)
            _cl_stat_rows(x, acc[:C], acc[C:], shift, n * S * C, s0, s1_, C, Rv)
            _cl_sample_stats(x, st, acc, 0, shift, 0, n, G, C, Cg, S, eps)
            _cl_sample_affine(cf, n * 6 * C, st, n, G, C, Cg, C, w, b)
        else:
            n = it // nch
            ch = it - n * nch
            s0, s1_ = ch * S // nch, (ch + 1) * S // nch
        base = n * 6 * C
        _cl_normalize_rows(
            x, y, cf[base:base + C], cf[base + C:base + 2 * C], cf[base + 2 * C:base + 3 * C],
            n * S * C, s0, s1_, C, Rv, act, k,
        )


@njit(**_SERIAL)
def _cl_sample_shifts(x, xo, sh, so, C, Cg, CR, off):
    """Each channel's shift (its group's _group_shift, in x's dtype) at sh[so:so + C], tiled
    CR // C times."""
    for g in range(C // Cg):
        v = _group_shift(x, xo + g * Cg, off)
        sv = sh[so + g * Cg:so + (g + 1) * Cg]
        for j in range(Cg):
            sv[j] = v
    _tile_rows(sh, so, 1, C, CR)


@njit(**_SERIAL)
def _cl_stat_vec(x, s1, s2, a1, a2, sh, so, tmp, to, xo, slo, shi, C, R):
    """s1[a1 + c] += sum d, s2[a2 + c] += sum d*d over rows slo..shi of the sample at x[xo:], with
    d = x - shift[c] and the shifts at sh[so:] (tiled as in _cl_sample_shifts), the block sums in
    SIMD registers: within each _CL_ROWS-row tile, each block of 4 vectors (4W channels of a row,
    or R whole rows) runs down the tile accumulating d and d*d, then goes through the buffer
    tmp[to:to + 2L] into s1/s2 in float64. Rows a block of R rows cannot take (the tile's last
    (r1 - r0) % R) are added directly in float64. Loop-only (see _backward_cl_vec's helpers)."""
    W = vwidth(x)
    L = 4 * W
    CR = C * R
    for r0 in range(slo, shi, _CL_ROWS):
        r1 = min(r0 + _CL_ROWS, shi)
        rv = r1 - (r1 - r0) % R
        for cb in range(CR // L):
            c0 = cb * L
            h0, h1, h2, h3 = _vload4(sh, so + c0, W)
            a0 = vsplat(x, 0.0)
            q0, b1, q1, b2, q2, b3, q3 = a0, a0, a0, a0, a0, a0, a0
            for i in range((rv - r0) // R):
                o = xo + (r0 + i * R) * C + c0
                d = vsub(vload(x, o), h0)
                a0, q0 = vadd(a0, d), vmuladd(d, d, q0)
                d = vsub(vload(x, o + W), h1)
                b1, q1 = vadd(b1, d), vmuladd(d, d, q1)
                d = vsub(vload(x, o + 2 * W), h2)
                b2, q2 = vadd(b2, d), vmuladd(d, d, q2)
                d = vsub(vload(x, o + 3 * W), h3)
                b3, q3 = vadd(b3, d), vmuladd(d, d, q3)
            _vstore4(tmp, to, W, a0, b1, b2, b3)
            _vstore4(tmp, to + L, W, q0, q1, q2, q3)
            _fold_block_at(tmp, to, s1, a1, c0, C, L, R)
            _fold_block_at(tmp, to + L, s2, a2, c0, C, L, R)
        for s in range(rv, r1):
            for c in range(C):
                d = x[xo + s * C + c] - sh[so + c]
                s1[a1 + c] += np.float64(d)
                s2[a2 + c] += np.float64(d * d)


@njit(**_SERIAL)
def _cl_sample_stats(x, st, acc, ao, sh, so, n, G, C, Cg, S, eps):
    """Sample n's group statistics from its channel sums acc[ao:ao + C] (of d) and
    acc[ao + C:ao + 2C] (of d*d) around the shifts at sh[so:] (see _forward_cl)."""
    M = Cg * S
    for g in range(G):
        t1 = 0.0
        t2 = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            t1 += acc[ao + c]
            t2 += acc[ao + C + c]
        shift64 = np.float64(sh[so + g * Cg])
        if _far_from_mean(t1, t2, M):  # rare: this group summed again in float64
            shift64 = np.float64(_like(x, shift64 + t1 / M))
            t1, t2 = _cl_group_f64_sums(x, n * S * C, g * Cg, Cg, C, S, shift64)
        _finish_stats(st, n * G + g, t1, t2, M, shift64, eps)


@njit(**_SERIAL)
def _cl_chunk_stats(x, st, part, sh, so, n, nch, G, C, Cg, S, eps):
    """_cl_sample_stats for a sample summed in nch chunks: each group's sums over its chunks' rows
    of part (sum d, then sum d*d, 2C per chunk), in chunk order."""
    M = Cg * S
    for g in range(G):
        t1 = 0.0
        t2 = 0.0
        for ch in range(nch):
            po = (n * nch + ch) * 2 * C
            for c in range(g * Cg, (g + 1) * Cg):
                t1 += part[po + c]
                t2 += part[po + C + c]
        shift64 = np.float64(sh[so + g * Cg])
        if _far_from_mean(t1, t2, M):  # rare: summed again, serially, in float64
            shift64 = np.float64(_like(x, shift64 + t1 / M))
            t1, t2 = _cl_group_f64_sums(x, n * S * C, g * Cg, Cg, C, S, shift64)
        _finish_stats(st, n * G + g, t1, t2, M, shift64, eps)


@njit(**_SERIAL)
def _cl_normalize_vec(x, y, cf, co, CR, xo, slo, shi, C, R, act, k):
    """y = (x - mh) * a + b, ReLU'd when act == 1, over rows slo..shi: blocks of 4 SIMD vectors with
    the coefficients (at cf[co:], rows of CR values) in registers, tiles of _CL_ROWS rows as in
    _cl_stat_vec; loop-only (see _backward_cl_vec's helpers)."""
    W = vwidth(x)
    L = 4 * W
    relu = act == 1
    zero = vsplat(x, k[0])
    mo, ao, bo = co + _MH * CR, co + _A * CR, co + _B * CR
    for r0 in range(slo, shi, _CL_ROWS):
        r1 = min(r0 + _CL_ROWS, shi)
        rv = r1 - (r1 - r0) % R
        for cb in range(CR // L):
            c0 = cb * L
            m0, m1, m2, m3 = _vload4(cf, mo + c0, W)
            a0, a1, a2, a3 = _vload4(cf, ao + c0, W)
            b0, b1, b2, b3 = _vload4(cf, bo + c0, W)
            for i in range((rv - r0) // R):
                o = xo + (r0 + i * R) * C + c0
                vstore(y, o, _vz(x, o, m0, a0, b0, relu, zero))
                vstore(y, o + W, _vz(x, o + W, m1, a1, b1, relu, zero))
                vstore(y, o + 2 * W, _vz(x, o + 2 * W, m2, a2, b2, relu, zero))
                vstore(y, o + 3 * W, _vz(x, o + 3 * W, m3, a3, b3, relu, zero))
        for s in range(rv, r1):
            for c in range(C):
                j = xo + s * C + c
                z = _saffine(x[j], cf[mo + c], cf[ao + c], cf[bo + c])
                y[j] = k[0] if relu and z < k[0] else z


@njit(**_PARALLEL)
def _forward_cl_vec(x, y, w, b, st, N, C, S, G, eps, R, act, nch, k):
    """_forward_cl's work without activation or with ReLU where _cl_vec_rows gives R > 0, through
    loop-only per-sample helpers and per-thread tables, as _backward_cl_vec (the same results, bit
    for bit, as the _cl_stat_rows/_cl_normalize_rows path of session 15 gave)."""
    Cg = C // G
    L = 4 * vwidth(x)
    CR = C * R
    off = _shift_offsets(Cg, S, 1, C)
    if nch == 0:
        T = _thread_count()
        cf = np.empty(T * 6 * CR, x.dtype)  # MH/A/B rows (6 rows per thread: _cl_sample_affine's layout)
        sh = np.empty(T * CR, x.dtype)
        acc = np.empty(T * 2 * C)
        tmps = np.empty(T * 2 * L, x.dtype)
        for it0 in prange(N):
            n = np.int64(it0)  # prange indices are unsigned; one signature per helper
            t = _thread_id()
            xo = n * S * C
            _cl_sample_shifts(x, xo, sh, t * CR, C, Cg, CR, off)
            acc[t * 2 * C:(t + 1) * 2 * C] = 0.0
            _cl_stat_vec(x, acc, acc, t * 2 * C, t * 2 * C + C, sh, t * CR, tmps, t * 2 * L, xo, np.int64(0), S, C, R)
            _cl_sample_stats(x, st, acc, t * 2 * C, sh, t * CR, n, G, C, Cg, S, eps)
            _cl_sample_affine(cf, t * 6 * CR, st, n, G, C, Cg, CR, w, b)
            _cl_normalize_vec(x, y, cf, t * 6 * CR, CR, xo, np.int64(0), S, C, R, act, k)
        return
    items = N * nch
    sh = np.empty(N * CR, x.dtype)
    for n in range(N):  # few samples (batch 1): each channel's shift is the same in every chunk
        _cl_sample_shifts(x, n * S * C, sh, n * CR, C, Cg, CR, off)
    part = np.zeros(items * 2 * C)
    tmps = np.empty(items * 2 * L, x.dtype)
    for it0 in prange(items):
        it = np.int64(it0)
        n = it // nch
        ch = it - n * nch
        po = it * 2 * C
        _cl_stat_vec(x, part, part, po, po + C, sh, n * CR, tmps, it * 2 * L, n * S * C,
                     ch * S // nch, (ch + 1) * S // nch, C, R)
    cf = np.empty(N * 6 * CR, x.dtype)
    for n in range(N):
        _cl_chunk_stats(x, st, part, sh, n * CR, n, nch, G, C, Cg, S, eps)
        _cl_sample_affine(cf, n * 6 * CR, st, n, G, C, Cg, CR, w, b)
    for it0 in prange(items):
        it = np.int64(it0)
        n = it // nch
        ch = it - n * nch
        _cl_normalize_vec(x, y, cf, n * 6 * CR, CR, n * S * C, ch * S // nch, (ch + 1) * S // nch, C, R, act, k)


@njit(**_PARALLEL)
def _backward_cl_vec(dy, x, dx, w, b, st, A, B, qr, N, C, S, G, R, act, nch, k):
    """_backward_cl's work without activation or with ReLU where _cl_vec_rows gives R > 0: the
    loop-only per-sample helpers above, one call each per sample (or chunk), a separate parallel
    loop for each decomposition (a call in a branch keeps the counts). Groups needing the exact
    dx (rare) are redone afterwards, serially."""
    Cg = C // G
    L = 4 * (VECTOR_BYTES // x.itemsize)
    CR = C * R
    ex = np.zeros(N, np.bool_)
    if nch == 0:  # a coefficient table and block buffer per thread, where its sample left them: cache-warm
        T = _thread_count()
        cf = np.empty(T * 6 * CR, x.dtype)
        tmps = np.empty(T * 2 * L, x.dtype)
        for it0 in prange(N):
            n = np.int64(it0)  # prange indices are unsigned; one signature per helper
            t = _thread_id()
            co = t * 6 * CR
            _cl_sample_affine(cf, co, st, n, G, C, Cg, CR, w, b)
            _cl_grad_vec(dy, x, A, B, n * C, n * C, cf, co, CR, tmps, t * 2 * L, n * S * C, np.int64(0), S, C, R, act, k)
            ex[n] = _cl_sample_dx_coefs(cf, co, st, A, B, qr, n, G, C, Cg, CR, S, w)
            _cl_dx_vec(dy, x, dx, cf, co, CR, n * S * C, np.int64(0), S, C, R, act, k)
        cf = np.empty(6 * CR, x.dtype)
        for n in range(N):  # rare: the exact dx of a sample, over the normal one
            if ex[n]:
                _cl_sample_affine(cf, 0, st, n, G, C, Cg, CR, w, b)
                _cl_dx_rows_exact(dy, x, dx, cf, 0, CR, st, w, qr, n, G, Cg, n * S * C, 0, S, C, act, k)
        return
    cf = np.empty(N * 6 * CR, x.dtype)
    items = N * nch
    tmps = np.empty(items * 2 * L, x.dtype)
    for n in range(N):
        _cl_sample_affine(cf, n * 6 * CR, st, n, G, C, Cg, CR, w, b)
    part = np.zeros(items * 2 * C)
    for it0 in prange(items):
        it = np.int64(it0)
        n = it // nch
        ch = it - n * nch
        po = it * 2 * C
        _cl_grad_vec(dy, x, part, part, po, po + C, cf, n * 6 * CR, CR, tmps, it * 2 * L, n * S * C,
                     ch * S // nch, (ch + 1) * S // nch, C, R, act, k)
    for n in range(N):
        _add_parts(A, B, part, n, nch, C)
        ex[n] = _cl_sample_dx_coefs(cf, n * 6 * CR, st, A, B, qr, n, G, C, Cg, CR, S, w)
    for it0 in prange(items):
        it = np.int64(it0)
        n = it // nch
        ch = it - n * nch
        _cl_dx_vec(dy, x, dx, cf, n * 6 * CR, CR, n * S * C, ch * S // nch, (ch + 1) * S // nch, C, R, act, k)
    for n in range(N):
        if ex[n]:
            _cl_dx_rows_exact(dy, x, dx, cf, n * 6 * CR, CR, st, w, qr, n, G, Cg, n * S * C, 0, S, C, act, k)


@njit(**_PARALLEL)
def _backward_cl(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch):
    """dx, and dw/db (C,) from the per-(n, c) sums A = sum g, B = sum g * xhat."""
    k = _consts(x)
    Cg = C // G
    A = np.zeros(N * C)
    B = np.zeros(N * C)
    qr = np.empty(2 * N * G)  # each group's (q, r) in float64, for the rare exact path
    Rv = _cl_vec_rows(C, S, x.itemsize)
    if act <= 1 and Rv > 0:
        _backward_cl_vec(dy, x, dx, w, b, st, A, B, qr, N, C, S, G, Rv, act, nch, k)
        _reduce_params(A, B, dw, db, N, C)
        return
    cf = np.empty(N * 6 * C, x.dtype)
    items = N if nch == 0 else N * nch
    if nch > 0:
        for n in range(N):
            _cl_sample_affine(cf, n * 6 * C, st, n, G, C, Cg, C, w, b)
        part = np.zeros(items * 2 * C)
        for it0 in prange(items):
            it = np.int64(it0)  # prange indices are unsigned; one signature per helper
            n = it // nch
            ch = it - n * nch
            base = n * 6 * C
            po = it * 2 * C
            _cl_grad_rows(
                dy, x, dx, part[po:po + C], part[po + C:po + 2 * C],
                cf[base:base + C], cf[base + C:base + 2 * C], cf[base + 2 * C:base + 3 * C],
                n * S * C, ch * S // nch, (ch + 1) * S // nch, C, Rv, act, k,
            )
        for n in range(N):
            _add_parts(A, B, part, n, nch, C)
            _cl_sample_dx_coefs(cf, n * 6 * C, st, A, B, qr, n, G, C, Cg, C, S, w)
    for it0 in prange(items):
        it = np.int64(it0)  # prange indices are unsigned; one signature per helper
        if nch == 0:
            n = it
            s0, s1 = np.int64(0), S  # (see _forward_cl)
            base = n * 6 * C
            _cl_sample_affine(cf, base, st, n, G, C, Cg, C, w, b)  # in the parallel loop (serially: 1.02-1.06x slower on 8x8 maps)
            _cl_grad_rows(
                dy, x, dx, A[n * C:(n + 1) * C], B[n * C:(n + 1) * C],
                cf[base:base + C], cf[base + C:base + 2 * C], cf[base + 2 * C:base + 3 * C],
                n * S * C, s0, s1, C, Rv, act, k,
            )
            _cl_sample_dx_coefs(cf, base, st, A, B, qr, n, G, C, Cg, C, S, w)
        else:
            n = it // nch
            ch = it - n * nch
            s0, s1 = ch * S // nch, (ch + 1) * S // nch
        base = n * 6 * C
        exact = False
        for g in range(G):
            exact = exact or _below_f32(qr[2 * (n * G + g)])
        if exact:  # rare: the exact path (see _below_f32)
            _cl_dx_rows_exact(dy, x, dx, cf, base, C, st, w, qr, n, G, Cg, n * S * C, s0, s1, C, act, k)
        else:
            _cl_dx_rows(
                dy, x, dx, cf[base:base + C], cf[base + C:base + 2 * C], cf[base + 2 * C:base + 3 * C],
                cf[base + 3 * C:base + 4 * C], cf[base + 4 * C:base + 5 * C], cf[base + 5 * C:base + 6 * C],
                n * S * C, s0, s1, C, Rv, act, k,
            )
    _reduce_params(A, B, dw, db, N, C)


# ----------------------------------------------------------------------------- the backend object
_KERNEL_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.float16: torch.float32, torch.bfloat16: torch.float32}
_MIN_PARALLEL_ELEMS = 1 << 16  # below this, splitting the reduction costs more than it saves


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.is_contiguous():
        return False
    if x.movedim(1, -1).is_contiguous():
        return True
    raise ValueError(
        f"the numba backend needs a contiguous or channels-last dense input, got strides {x.stride()} "
        f"for shape {tuple(x.shape)}; call .contiguous() first"
    )


def _flat(t: torch.Tensor) -> np.ndarray:
    """A dense tensor's storage as a 1-D numpy array in memory order, no copy: (N, C, S)
    order for a contiguous tensor, (N, S, C) for a channels-last one."""
    flat = t.detach().numpy().ravel("K")
    if flat.flags.owndata:  # ravel had to copy: writes would not reach the tensor
        raise ValueError(f"the numba backend needs a dense tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    return flat


_FILL_CACHE: dict = {}


def _param(p, C: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    """weight/bias as a numpy array in the kernel dtype (a cached constant vector when None)."""
    if p is None:
        key = (C, fill, dtype)
        arr = _FILL_CACHE.get(key)
        if arr is None:
            # left writeable: a read-only array would be a new numba type (another compile)
            arr = np.full(C, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
            _FILL_CACHE[key] = arr
        return arr
    if p.dtype != dtype or not p.is_contiguous():
        p = p.to(dtype).contiguous()
    return p.detach().numpy()


def _get_threads() -> int:
    """numba.get_num_threads() (this thread's setting), without the process and thread locks
    that the public call takes every time (microseconds per call) once the pool is running."""
    if getattr(_numba_parallel, "_is_initialized", False):
        fast = getattr(_numba_parallel, "_get_num_threads", None)
        if fast is not None:
            return fast()
    return numba.get_num_threads()


def _set_threads(n: int) -> None:
    """numba.set_num_threads(n) for an n already known valid, with the same fast path."""
    fast = getattr(_numba_parallel, "_set_num_threads", None)
    if getattr(_numba_parallel, "_is_initialized", False) and fast is not None:
        fast(n)
    else:
        numba.set_num_threads(n)


@njit(**_SERIAL)
def _plan_auto(N, C, S, G, channels_last, T):
    """_plan's automatic choice (compiled: the native entry points call it too)."""
    if N * C * S < _MIN_PARALLEL_ELEMS:
        T = 1
    units = N if channels_last else N * G
    if units % T == 0 or units >= 8 * T:
        return T, 0
    if channels_last:  # chunks of 64+ rows, but at least one per thread (1x1280x8x8 ran on one thread)
        return T, max(min(T, S), min(-(-8 * T // N), S // 64))
    return T, max(1, min(-(-8 * T // (N * C)), S // 4096))


def _plan(N: int, C: int, S: int, G: int, channels_last: bool, T: int) -> tuple[int, int]:
    """(threads, chunks) for a caller running with T numba threads: chunks is 0 for one item
    per group (contiguous) / per sample (channels-last), else the number of chunks each S
    extent is split into. Small tensors run on one thread: waking a team costs more than they
    take (and on a busy machine a descheduled worker stalls the whole call)."""
    if split_mode == "fused":
        return (1 if N * C * S < _MIN_PARALLEL_ELEMS else T), 0
    if split_mode == "split":
        return (1 if N * C * S < _MIN_PARALLEL_ELEMS else T), max(1, min(3, S))
    threads, chunks = _plan_auto(N, C, S, G, channels_last, T)
    return int(threads), int(chunks)


def _run(kernel, threads: int, caller_threads: int, *args):
    """Call a parallel kernel with ``threads`` numba threads (restoring the caller's setting)."""
    if threads != caller_threads:
        _set_threads(threads)
        try:
            return kernel(*args)
        finally:
            _set_threads(caller_threads)
    return kernel(*args)


class NumbaBackend:
    """numba CPU kernels; float16/bfloat16 inputs are computed in float32."""

    name = "numba"

    def available(self):
        return None

    def supports(self, x, activation):
        return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and activation in ACT_CODES

    def fast_lane(self, x, weight, bias, num_groups, eps, activation):
        """The whole eager op (forward and its autograd node) through the compiled fast lane of
        ``groupnorm.backends.native``; None when that is off or unusable (then the caller runs
        the Python path, which gives bitwise the same results)."""
        if split_mode != "auto" or x.dtype not in _KERNEL_DTYPES:
            return None
        return native.group_norm(x, weight, bias, num_groups, eps, ACT_CODES[activation])

    def forward(self, x, weight, bias, num_groups, eps, activation):
        kdt = _KERNEL_DTYPES[x.dtype]
        xk = x.detach() if x.dtype == kdt else x.detach().to(kdt)
        N, C = x.shape[:2]
        S = x.numel() // (N * C) if N * C else 0
        G = num_groups
        stats = torch.empty(N, G, 3, dtype=kdt)
        y = torch.empty_like(xk)
        if xk.numel() == 0:
            return y.to(x.dtype), stats.zero_()
        cl = _is_channels_last(xk)
        T = _get_threads()
        threads, nch = _plan(N, C, S, G, cl, T)
        _run(
            _forward_cl if cl else _forward_nc, threads, T,
            _flat(xk), _flat(y), _param(weight, C, 1.0, kdt), _param(bias, C, 0.0, kdt),
            stats.numpy().ravel(), N, C, S, G, float(eps), ACT_CODES[activation], nch,
        )
        return (y if kdt == x.dtype else y.to(x.dtype)), stats

    def backward(self, dy, x, weight, bias, stats, num_groups, activation, output_mask):
        kdt = _KERNEL_DTYPES[x.dtype]
        xk = x.detach() if x.dtype == kdt else x.detach().to(kdt)
        N, C = x.shape[:2]
        S = x.numel() // (N * C) if N * C else 0
        G = num_groups
        dx = torch.empty_like(xk)
        if xk.numel() == 0:
            return dx.to(x.dtype), None, None
        cl = _is_channels_last(xk)
        dyk = dy.detach() if dy.dtype == kdt else dy.detach().to(kdt)
        if dyk.stride() != xk.stride():
            dyk = torch.empty_like(xk).copy_(dyk)
        st = stats.detach()
        if st.dtype != kdt or not st.is_contiguous():
            st = st.to(kdt).contiguous()
        dw = torch.empty(C, dtype=kdt)
        db = torch.empty(C, dtype=kdt)
        T = _get_threads()
        threads, nch = _plan(N, C, S, G, cl, T)
        _run(
            _backward_cl if cl else _backward_nc, threads, T,
            _flat(dyk), _flat(xk), _flat(dx), dw.numpy(), db.numpy(), _param(weight, C, 1.0, kdt),
            _param(bias, C, 0.0, kdt), st.numpy().ravel(), N, C, S, G, ACT_CODES[activation], nch,
        )
        need_dx, need_dw, need_db = output_mask
        dw = dw.to(weight.dtype) if need_dw and weight is not None else None
        db = db.to(bias.dtype) if need_db and bias is not None else None
        if not need_dx:
            dx = None
        elif kdt != x.dtype:
            dx = dx.to(x.dtype)
        return dx, dw, db


BACKEND = NumbaBackend()
