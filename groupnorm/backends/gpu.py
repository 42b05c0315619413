"""Triton backend: GroupNorm forward and backward kernels for CUDA tensors.

Layout.  ``x`` is viewed as (N, C, S) with S the product of the spatial sizes and three
strides: contiguous input has (C*S, S, 1), channels-last dense input (NHWC, NDHWC, NLC)
has (S*C, 1, C).  Every kernel addresses ``x`` through these strides, so both layouts are
read in place; ``y``/``dx`` come from ``torch.empty_like(x)`` and share the strides.
Kernels work on 2-D tiles [BLOCK_C channels, BLOCK_S positions]; the plan makes the tile
long along whichever axis is contiguous in memory.

Statistics.  For each (sample, group) the shift ``mean_hi`` is the group's first element;
the kernels accumulate d = x - mean_hi.  Each tile is reduced exactly in registers
(tile mean, then the sum of squared deviations from it) and tiles are merged with Chan's
formula, so there is no sum/sum-of-squares cancellation; per-(n, channel, spatial-block)
partials (mean of d, M2) are merged per group in a fixed order by a second small kernel:
mean_lo = mean(d), rstd = 1/sqrt(M2/M + eps).  xhat is always ``((x - hi) - lo) * rstd``.

Paths (the plan picks one per call, see ``_plan``):

* "tile", when a whole group fits in one register tile: one program per (n, g) loads the
  group once, computes its statistics and writes y (forward: 1 read of x + 1 write of y);
  the backward loads x and dy once, writes dx and per-(n, c) partial sums (2 reads + 1 write).
* "group", for larger groups when N x G programs fill the GPU (e.g. ResNet at batch 32):
  one program per (n, g) sweeps its group twice (statistics, then normalize; or gradient
  sums, then dx); the second sweep re-reads what the program just read, from L2.
* "split", for any size: the spatial extent is cut into blocks so that N x C-blocks x
  S-blocks programs fill the GPU even at batch 1.  Forward: partial statistics per
  (n, c, block) -> per-group merge -> normalize/affine/activation pass (2 reads + 1 write).
  Backward: per-(n, c, block) partial sums of g = dy * act'(z) and g * xhat -> per-group
  sums (sum_c w_c * partial) -> dx pass (4 reads + 1 write).  The second passes walk their
  tiles in reverse launch order so that their first reads find the data the first pass
  read last still in L2.

dweight/dbias: a small per-(n, g) kernel sums each channel's block partials in a fixed
order (and forms the group means dx needs), then one more sums the per-(n, c) totals over n
in a fixed order: no atomics, results are bitwise reproducible.

``python -m groupnorm.backends.gpu`` compiles every kernel launch of the GPU suite's shapes
ahead of time for sm_90 (no GPU needed) and prints tiles, grids, registers and spills.

Set ``TRITON_INTERPRET=1`` before this module (or triton) is imported to run the kernels
on CPU tensors with Triton's interpreter (slow; used by the tests).
"""

import contextlib
import os

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    _IMPORT_ERROR = f"triton is not installed ({_exc})"

    class _Stub:
        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

import torch

from groupnorm.backends import ACT_CODES

_ENV = "TRITON_INTERPRET"
# Whether the kernels below were built for the interpreter (decided at decoration time).
_INTERPRETED = _IMPORT_ERROR is None and os.environ.get(_ENV, "0") not in ("", "0")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- device code


@triton.jit
def _act(z, ACT: tl.constexpr):
    y = z
    if ACT == 1:  # not tl.maximum: compiled, it returns 0 for a NaN z (fmax); torch.relu keeps the NaN
        y = tl.where(z < 0.0, 0.0, z)
    if ACT == 2:
        y = z * tl.sigmoid(z)
    if ACT == 3:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return y


@triton.jit
def _act_dy(dy, z, ACT: tl.constexpr):
    """dy * act'(z); for ReLU a select, as torch's threshold_backward: 0 where z <= 0 whatever dy
    is there (inf * 0 would be NaN), dy where z > 0 or z is NaN."""
    if ACT == 1:
        g = tl.where(z <= 0.0, 0.0, dy)
    else:
        g = dy * _act_grad(z, ACT)
    return g


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz (SiLU, GELU; 1 without an activation)."""
    d = tl.full(z.shape, 1.0, tl.float32)
    if ACT == 2:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    if ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = cdf + z * pdf
    return d


@triton.jit
def _channel_params(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c.shape, tl.float32)
    return w, b


@triton.jit
def _fwd_fused_kernel(
    X, Y, W, B, STATS,
    stride_n, stride_c, stride_s, C, S, CG, G, M, eps,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g); the whole group is one [BLOCK_C, BLOCK_S] tile."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    ci = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c = g * CG + ci
    cmask = ci < CG
    mask = cmask[:, None] & (s < S)[None, :]
    base = n.to(tl.int64) * stride_n
    offs = base + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(X + base + (g * CG).to(tl.int64) * stride_c).to(tl.float32)
    d = tl.where(mask, x - shift, 0.0)
    mean_lo = tl.sum(tl.sum(d, axis=1), axis=0) / M
    dev = tl.where(mask, d - mean_lo, 0.0)
    var = tl.sum(tl.sum(dev * dev, axis=1), axis=0) / M
    rstd = 1.0 / tl.sqrt(var + eps)
    w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
    z = dev * rstd * w[:, None] + b[:, None]
    tl.store(Y + offs, _act(z, ACT).to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + pid * 3, shift)
    tl.store(STATS + pid * 3 + 1, mean_lo)
    tl.store(STATS + pid * 3 + 2, rstd)


@triton.jit
def _fwd_group_loop_kernel(
    X, Y, W, B, STATS,
    stride_n, stride_c, stride_s, C, S, CG, G, M, eps,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g) for groups larger than a register tile: statistics over the
    group's tiles (Chan-merged), then a second sweep that normalizes.  The second sweep
    re-reads what this program has just read, so it is served by L2, not HBM."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n
    shift = tl.load(X + base + (g * CG).to(tl.int64) * stride_c).to(tl.float32)
    mean = tl.sum(tl.zeros([BLOCK_C], tl.float32), axis=0)
    m2 = mean
    cnt = mean
    for c0 in range(0, CG, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C)
        cmask = ci < CG
        coff = (g * CG + ci).to(tl.int64) * stride_c
        nc = tl.minimum(CG - c0, BLOCK_C)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < S)[None, :]
            x = tl.load(X + base + coff[:, None] + s.to(tl.int64)[None, :] * stride_s, mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - shift, 0.0)
            nb = (nc * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
            bmean = tl.sum(tl.sum(d, axis=1), axis=0) / nb
            dev = tl.where(mask, d - bmean, 0.0)
            bm2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
            tot = cnt + nb
            delta = bmean - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + bm2 + delta * delta * (cnt * nb / tot)
            cnt = tot
    rstd = 1.0 / tl.sqrt(m2 / M + eps)
    tl.store(STATS + pid * 3, shift)
    tl.store(STATS + pid * 3 + 1, mean)
    tl.store(STATS + pid * 3 + 2, rstd)
    for c0 in range(0, CG, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C)
        cmask = ci < CG
        c = g * CG + ci
        coff = c.to(tl.int64) * stride_c
        w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
        a = rstd * w
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < S)[None, :]
            offs = base + coff[:, None] + s.to(tl.int64)[None, :] * stride_s
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            z = ((x - shift) - mean) * a[:, None] + b[:, None]
            tl.store(Y + offs, _act(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_group_loop_kernel(
    DY, X, W, B, STATS, PB, PW, DX,
    stride_n, stride_c, stride_s, C, S, CG, G, M,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g), group larger than a register tile: per-(n, c) sums of g and
    g*xhat in a first sweep, dx in a second sweep (its re-reads are served by L2)."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n
    hi = tl.load(STATS + pid * 3)
    lo = tl.load(STATS + pid * 3 + 1)
    rstd = tl.load(STATS + pid * 3 + 2)
    acc1 = tl.zeros([BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C)
        cmask = ci < CG
        c = g * CG + ci
        coff = c.to(tl.int64) * stride_c
        w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
        acc_b = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        acc_w = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < S)[None, :]
            offs = base + coff[:, None] + s.to(tl.int64)[None, :] * stride_s
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - hi) - lo) * rstd
            gz = tl.where(mask, _act_dy(dy, xhat * w[:, None] + b[:, None], ACT), 0.0)
            acc_b += gz
            acc_w += gz * xhat
        pb = tl.sum(acc_b, axis=1)
        pw = tl.sum(acc_w, axis=1)
        out = n.to(tl.int64) * C + c
        tl.store(PB + out, pb, mask=cmask)
        tl.store(PW + out, pw, mask=cmask)
        acc1 += pb * w
        acc2 += pw * w
    if NEED_DX:
        c1 = tl.sum(acc1, axis=0) / M
        c2 = tl.sum(acc2, axis=0) / M
        for c0 in range(0, CG, BLOCK_C):
            ci = c0 + tl.arange(0, BLOCK_C)
            cmask = ci < CG
            c = g * CG + ci
            coff = c.to(tl.int64) * stride_c
            w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < S)[None, :]
                offs = base + coff[:, None] + s.to(tl.int64)[None, :] * stride_s
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = ((x - hi) - lo) * rstd
                gz = _act_dy(dy, xhat * w[:, None] + b[:, None], ACT)
                dx = rstd * (gz * w[:, None] - c1 - xhat * c2)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _stats_partial_kernel(
    X, PMEAN, PM2,
    stride_n, stride_c, stride_s, C, S, CG, NCB, NSB, S_PER_PROG,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per (n, channel, spatial block): mean and M2 of d = x - shift(group), Chan-merged over tiles."""
    pid = tl.program_id(0)
    sb = pid % NSB
    ncb = pid // NSB
    n = ncb // NCB
    cb = ncb % NCB
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * stride_n
    first = (c // CG) * CG
    shift = tl.load(X + base + first.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(tl.float32)
    s_lo = sb * S_PER_PROG
    s_hi = tl.minimum(S, s_lo + S_PER_PROG)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_hi)[None, :]
        offs = base + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[:, None], 0.0)
        nb = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
        bmean = tl.sum(d, axis=1) / nb
        dev = tl.where(mask, d - bmean[:, None], 0.0)
        bm2 = tl.sum(dev * dev, axis=1)
        tot = cnt + nb
        delta = bmean - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + bm2 + delta * delta * (cnt * nb / tot)
        cnt = tot
    out = (n.to(tl.int64) * C + c) * NSB + sb
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _stats_merge_kernel(
    X, PMEAN, PM2, STATS,
    stride_n, stride_c, C, S, CG, G, NSB, S_PER_PROG, M, eps,
    BLOCK: tl.constexpr,
):
    """One program per (n, g): merge the group's CG * NSB partials in a fixed order."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = (n.to(tl.int64) * C + g * CG) * NSB  # the group's partials are adjacent
    K = CG * NSB
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        km = k < K
        cnt = tl.minimum(S - (k % NSB) * S_PER_PROG, S_PER_PROG).to(tl.float32)
        pm = tl.load(PMEAN + base + k, mask=km, other=0.0)
        acc += tl.where(km, pm * cnt, 0.0)
    mean_lo = tl.sum(acc, axis=0) / M
    acc2 = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        km = k < K
        cnt = tl.minimum(S - (k % NSB) * S_PER_PROG, S_PER_PROG).to(tl.float32)
        pm = tl.load(PMEAN + base + k, mask=km, other=0.0)
        pm2 = tl.load(PM2 + base + k, mask=km, other=0.0)
        dm = pm - mean_lo
        acc2 += tl.where(km, pm2 + cnt * dm * dm, 0.0)
    var = tl.sum(acc2, axis=0) / M
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(X + n.to(tl.int64) * stride_n + (g * CG).to(tl.int64) * stride_c).to(tl.float32)
    tl.store(STATS + pid * 3, shift)
    tl.store(STATS + pid * 3 + 1, mean_lo)
    tl.store(STATS + pid * 3 + 2, rstd)


@triton.jit
def _load_stats(STATS, n, c, cmask, CG, G):
    st = STATS + (n * G + c // CG) * 3
    hi = tl.load(st, mask=cmask, other=0.0)
    lo = tl.load(st + 1, mask=cmask, other=0.0)
    rstd = tl.load(st + 2, mask=cmask, other=0.0)
    return hi, lo, rstd


@triton.jit
def _fwd_apply_kernel(
    X, Y, W, B, STATS,
    stride_n, stride_c, stride_s, C, S, CG, G, NCB, NSB,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """y = act(((x - hi) - lo) * rstd * w + b) on one [BLOCK_C, BLOCK_S] tile."""
    # Walk the tiles in reverse launch order: the first tiles read here are the ones the
    # statistics pass read last, which are the likeliest to still be in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    sb = pid % NSB
    ncb = pid // NSB
    n = ncb // NCB
    cb = ncb % NCB
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = c < C
    mask = cmask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
    hi, lo, rstd = _load_stats(STATS, n, c, cmask, CG, G)
    w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = ((x - hi[:, None]) - lo[:, None]) * rstd[:, None]
    z = xhat * w[:, None] + b[:, None]
    tl.store(Y + offs, _act(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_fused_kernel(
    DY, X, W, B, STATS, PB, PW, DX,
    stride_n, stride_c, stride_s, C, S, CG, G, M,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g), the whole group in one tile: dx plus per-(n, c) partials."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    ci = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c = g * CG + ci
    cmask = ci < CG
    mask = cmask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
    hi = tl.load(STATS + pid * 3)
    lo = tl.load(STATS + pid * 3 + 1)
    rstd = tl.load(STATS + pid * 3 + 2)
    w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = ((x - hi) - lo) * rstd
    z = xhat * w[:, None] + b[:, None]
    gz = tl.where(mask, _act_dy(dy, z, ACT), 0.0)
    pb = tl.sum(gz, axis=1)
    pw = tl.sum(gz * xhat, axis=1)
    out = n.to(tl.int64) * C + c
    tl.store(PB + out, pb, mask=cmask)
    tl.store(PW + out, pw, mask=cmask)
    if NEED_DX:
        c1 = tl.sum(pb * w, axis=0) / M
        c2 = tl.sum(pw * w, axis=0) / M
        dx = rstd * (gz * w[:, None] - c1 - xhat * c2)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partial_kernel(
    DY, X, W, B, STATS, PB, PW,
    stride_n, stride_c, stride_s, C, S, CG, G, NCB, NSB, S_PER_PROG,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per (n, channel, spatial block): sum of g = dy * act'(z) and of g * xhat."""
    pid = tl.program_id(0)
    sb = pid % NSB
    ncb = pid // NSB
    n = ncb // NCB
    cb = ncb % NCB
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = n.to(tl.int64) * stride_n
    hi, lo, rstd = _load_stats(STATS, n, c, cmask, CG, G)
    w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
    s_lo = sb * S_PER_PROG
    s_hi = tl.minimum(S, s_lo + S_PER_PROG)
    acc_b = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_w = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_hi)[None, :]
        offs = base + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - hi[:, None]) - lo[:, None]) * rstd[:, None]
        z = xhat * w[:, None] + b[:, None]
        gz = tl.where(mask, _act_dy(dy, z, ACT), 0.0)
        acc_b += gz
        acc_w += gz * xhat
    out = (n.to(tl.int64) * C + c) * NSB + sb
    tl.store(PB + out, tl.sum(acc_b, axis=1), mask=cmask)
    tl.store(PW + out, tl.sum(acc_w, axis=1), mask=cmask)


@triton.jit
def _bwd_group_kernel(
    PB, PW, W, PBC, PWC, COEF, C, CG, G, NSB, M,
    HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (n, g), fixed order: per-(n, c) totals of the block partials, and the
    group means of g*w and g*w*xhat that dx needs."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    acc1 = tl.zeros([BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C)
        cmask = ci < CG
        c = g * CG + ci
        rows = (n.to(tl.int64) * C + c) * NSB
        acc_b = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
        acc_w = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
        for k0 in range(0, NSB, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = cmask[:, None] & (k < NSB)[None, :]
            acc_b += tl.load(PB + rows[:, None] + k[None, :], mask=mask, other=0.0)
            acc_w += tl.load(PW + rows[:, None] + k[None, :], mask=mask, other=0.0)
        sb = tl.sum(acc_b, axis=1)
        sw = tl.sum(acc_w, axis=1)
        tl.store(PBC + n.to(tl.int64) * C + c, sb, mask=cmask)
        tl.store(PWC + n.to(tl.int64) * C + c, sw, mask=cmask)
        if HAS_W:
            w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
            sb = sb * w
            sw = sw * w
        acc1 += sb
        acc2 += sw
    tl.store(COEF + pid * 2, tl.sum(acc1, axis=0) / M)
    tl.store(COEF + pid * 2 + 1, tl.sum(acc2, axis=0) / M)


@triton.jit
def _bwd_dx_kernel(
    DY, X, W, B, STATS, COEF, DX,
    stride_n, stride_c, stride_s, C, S, CG, G, NCB, NSB,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) on one tile (reverse order, see apply)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    sb = pid % NSB
    ncb = pid // NSB
    n = ncb // NCB
    cb = ncb % NCB
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = c < C
    mask = cmask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
    hi, lo, rstd = _load_stats(STATS, n, c, cmask, CG, G)
    w, b = _channel_params(W, B, c, cmask, HAS_W, HAS_B)
    cf = COEF + (n * G + c // CG) * 2
    c1 = tl.load(cf, mask=cmask, other=0.0)
    c2 = tl.load(cf + 1, mask=cmask, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = ((x - hi[:, None]) - lo[:, None]) * rstd[:, None]
    z = xhat * w[:, None] + b[:, None]
    gz = _act_dy(dy, z, ACT)
    dx = rstd[:, None] * (gz * w[:, None] - c1[:, None] - xhat * c2[:, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_param_kernel(
    PB, PW, DW, DB, N, C, NSB,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dweight_c / dbias_c: the (n, block) partials of each channel summed in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_b = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    acc_w = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for n in range(0, N):
        row = (n * C + c.to(tl.int64)) * NSB
        for k0 in range(0, NSB, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = cmask[:, None] & (k < NSB)[None, :]
            offs = row[:, None] + k[None, :]
            if HAS_DB:
                acc_b += tl.load(PB + offs, mask=mask, other=0.0)
            if HAS_DW:
                acc_w += tl.load(PW + offs, mask=mask, other=0.0)
    if HAS_DB:
        tl.store(DB + c, tl.sum(acc_b, axis=1).to(DB.dtype.element_ty), mask=cmask)
    if HAS_DW:
        tl.store(DW + c, tl.sum(acc_w, axis=1).to(DW.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------- host side

# Overrides for tests and experiments (see ``tuning``): path ("tile", "group", "split"), block_c, block_s,
# split (spatial blocks per (n, channel block) in the reduction passes), num_sms,
# reduce_block (caps the vector widths of the small merge/reduce kernels, to test their loops).
_OVERRIDES: dict = {}
# Elements of the one register tile that holds a whole group in the one-program-per-group
# path: the backward keeps x, dy and their products live, so its limit is lower.
_FUSED_MAX = {"forward": 8192, "backward": 4096}
# Largest group (elements) for the looped one-program-per-group path: at 2-4 programs per SM
# the groups in flight stay well inside an H100's 50 MB L2, so the second sweep hits L2.
_GROUP_LOOP_MAX = 1 << 16
_TILE = 4096  # elements of one tile in the looped ("group" and "split") passes


@contextlib.contextmanager
def tuning(**overrides):
    """Force plan choices: ``with tuning(path="split", block_c=2, block_s=4, split=3): ...``."""
    unknown = set(overrides) - {"path", "block_c", "block_s", "split", "num_sms", "reduce_block"}
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(overrides)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


_SM_CACHE: dict = {}


def _num_sms(device) -> int:
    if "num_sms" in _OVERRIDES:
        return int(_OVERRIDES["num_sms"])
    if device.type != "cuda":
        return 4  # interpreter: a pretend GPU, small so that plans stay cheap
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def _geometry(x):
    """(N, C, S, stride_n, stride_c, stride_s, channels_last) of x viewed as (N, C, S)."""
    N, C = x.shape[0], x.shape[1]
    S = 1
    for d in x.shape[2:]:
        S *= d
    if x.is_contiguous():
        return N, C, S, C * S, S, 1, False
    if x.movedim(1, -1).is_contiguous():
        return N, C, S, S * C, 1, C, True
    raise ValueError("triton groupnorm: x must be contiguous or channels-last dense")


def _dense(x):
    """x itself when contiguous or channels-last dense (read in place), else a contiguous copy."""
    return x if (x.is_contiguous() or x.movedim(1, -1).is_contiguous()) else x.contiguous()


def _geometry_or_none(t):
    try:
        return _geometry(t)
    except ValueError:
        return None


def _warps(tile: int) -> int:
    return 4 if tile <= 2048 else 8


def _least_padding(extent: int, widths) -> int:
    """The tile width (from ``widths``, largest first) that pads ``extent`` the least; a power
    of two >= extent when that is smaller than every width."""
    if _pow2(extent) <= widths[-1]:
        return _pow2(extent)
    return min(widths, key=lambda w: (triton.cdiv(extent, w) * w, -w))


def _plan(N, C, S, G, channels_last, device, direction="forward"):
    """Pass structure and tile sizes for one call; a pure function of the shape (and SM count).

    path "tile":  one program per (n, g), the whole group in one register tile (1 read).
    path "group": one program per (n, g) sweeping the group twice; the second sweep hits L2.
                  Needs N*G programs to fill the GPU and groups small enough for L2.
    path "split": the reduction split over (n, channel block, spatial block) programs, with
                  partial statistics merged by a second kernel: any shape, batch 1 included.
    """
    CG = C // G
    sms = _num_sms(device)
    tile_elems = _pow2(CG) * _pow2(S)
    path = _OVERRIDES.get("path")
    if path is None:
        many = N * G >= 2 * sms
        if tile_elems <= _FUSED_MAX[direction] and (many or N * C * S <= (1 << 20)):
            path = "tile"
        elif many and CG * S <= _GROUP_LOOP_MAX:
            path = "group"
        else:
            path = "split"
    elif path == "tile" and tile_elems > _FUSED_MAX[direction] * 4:
        path = "group"  # a forced one-tile plan still has to fit in registers
    if path not in ("tile", "group", "split"):
        raise ValueError(f"unknown path {path!r}")
    # Tiles for the looped passes: long along the contiguous axis (at least 128 elements, 256
    # bytes in half precision, when the extent allows), with the width that wastes the fewest
    # masked lanes on that axis (e.g. 56*56 = 3136 positions: 128 wide, not 1024).
    width_c = C if path == "split" else CG  # the channel extent one tile walks over
    if channels_last:
        block_c = _least_padding(width_c, (128, 64, 32))
        block_s = min(_pow2(S), max(1, _TILE // block_c))
    else:
        block_s = _least_padding(S, (1024, 512, 256, 128))
        block_c = min(_pow2(width_c), max(1, _TILE // block_s))
    block_c = int(_OVERRIDES.get("block_c", block_c))
    block_s = int(_OVERRIDES.get("block_s", block_s))
    ncb = triton.cdiv(C, block_c)
    # Split the spatial extent of the reductions until N x channel-blocks x blocks
    # gives a few waves of programs, keeping at least 4 tiles of work per program.
    if "split" in _OVERRIDES:
        nsb = max(1, min(int(_OVERRIDES["split"]), triton.cdiv(S, block_s)))
    else:
        want = 8 * sms
        have = N * ncb
        nsb = 1 if have >= want else min(triton.cdiv(want, have), max(1, triton.cdiv(S, 4 * block_s)))
    s_per_prog = triton.cdiv(triton.cdiv(S, nsb), block_s) * block_s
    nsb = triton.cdiv(S, s_per_prog)
    if path == "tile":
        block_c, block_s = _pow2(CG), _pow2(S)
    return {
        "CG": CG,
        "path": path,
        "block_c": block_c,
        "block_s": block_s,
        "ncb": ncb,
        "nsb": nsb,
        "s_per_prog": s_per_prog,
        "tiles_s": triton.cdiv(S, block_s),
    }


# When a list, launches are recorded instead of run (see ``compile_check``).
_RECORD = None


def _launch(kernel, grid, *args, num_warps=4, **constexprs):
    if _RECORD is not None:
        _RECORD.append((kernel, grid, args, constexprs, num_warps))
        return
    kernel[grid](*args, num_warps=num_warps, **constexprs)


def _rb(v: int) -> int:
    """A reduce-kernel block width, capped by the ``reduce_block`` override."""
    return max(1, min(v, int(_OVERRIDES.get("reduce_block", v))))


def _dummy(x):
    return torch.empty(1, device=x.device, dtype=torch.float32)


class TritonBackend:
    name = "triton"

    def available(self):
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        env = os.environ.get(_ENV, "0") not in ("", "0")
        if env and not _INTERPRETED:
            return f"{_ENV}=1 was set after groupnorm.backends.gpu was imported; the kernels were built for CUDA"
        if _INTERPRETED:
            return None
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU in Triton's interpreter)"
        return None

    def supports(self, x, activation):
        if _IMPORT_ERROR is not None or activation not in ACT_CODES or x.dtype not in _DTYPES:
            return False
        if x.dim() < 2 or x.numel() == 0:
            return False
        # Any striding is accepted here: the op hands forward/backward dense input (and they
        # make a contiguous copy of anything else rather than fail).
        if x.device.type == "cuda":
            return not _INTERPRETED
        return x.device.type == "cpu" and _INTERPRETED

    # ------------------------------------------------------------------ forward
    def forward(self, x, weight, bias, num_groups, eps, activation):
        x = _dense(x)
        N, C, S, sn, sc, ss, cl = _geometry(x)
        G = int(num_groups)
        if C % G:
            raise ValueError(f"num_channels {C} is not divisible by num_groups {G}")
        p = _plan(N, C, S, G, cl, x.device)
        CG = p["CG"]
        act = ACT_CODES[activation]
        y = torch.empty_like(x)
        stats = torch.empty((N, G, 3), device=x.device, dtype=torch.float32)
        w = weight if weight is not None else _dummy(x)
        b = bias if bias is not None else _dummy(x)
        has_w, has_b = weight is not None, bias is not None
        if p["path"] in ("tile", "group"):
            bc, bs = p["block_c"], p["block_s"]
            kernel = _fwd_fused_kernel if p["path"] == "tile" else _fwd_group_loop_kernel
            _launch(kernel, (N * G,),
                x, y, w, b, stats, sn, sc, ss, C, S, CG, G, float(CG * S), float(eps),
                ACT=act, HAS_W=has_w, HAS_B=has_b, BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(bc * bs),
            )
            return y, stats
        bc, bs, ncb, nsb, spp = p["block_c"], p["block_s"], p["ncb"], p["nsb"], p["s_per_prog"]
        pmean = torch.empty((N, C, nsb), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
        _launch(_stats_partial_kernel, (N * ncb * nsb,),
            x, pmean, pm2, sn, sc, ss, C, S, CG, ncb, nsb, spp,
            BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(bc * bs),
        )
        kblock = _rb(min(_pow2(CG * nsb), 1024))
        _launch(_stats_merge_kernel, (N * G,),
            x, pmean, pm2, stats, sn, sc, C, S, CG, G, nsb, spp, float(CG * S), float(eps),
            BLOCK=kblock, num_warps=_warps(kblock),
        )
        ts = p["tiles_s"]
        _launch(_fwd_apply_kernel, (N * ncb * ts,),
            x, y, w, b, stats, sn, sc, ss, C, S, CG, G, ncb, ts,
            ACT=act, HAS_W=has_w, HAS_B=has_b, BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(bc * bs),
        )
        return y, stats

    # ------------------------------------------------------------------ backward
    def backward(self, dy, x, weight, bias, stats, num_groups, activation, output_mask):
        x = _dense(x)
        N, C, S, sn, sc, ss, cl = _geometry(x)
        if _geometry_or_none(dy) != (N, C, S, sn, sc, ss, cl):
            # The contract says dy shares x's layout; be tolerant of a mismatch all the same.
            dy = torch.empty_like(x).copy_(dy)
        G = int(num_groups)
        p = _plan(N, C, S, G, cl, x.device, "backward")
        CG = p["CG"]
        act = ACT_CODES[activation]
        need_dx = bool(output_mask[0])
        need_dw = bool(output_mask[1]) and weight is not None
        need_db = bool(output_mask[2]) and bias is not None
        stats = stats.to(torch.float32).contiguous()
        w = weight if weight is not None else _dummy(x)
        b = bias if bias is not None else _dummy(x)
        has_w, has_b = weight is not None, bias is not None
        dx = torch.empty_like(x) if need_dx else None
        if not (need_dx or need_dw or need_db):
            return None, None, None
        if p["path"] in ("tile", "group"):
            bc, bs = p["block_c"], p["block_s"]
            nsb = 1
            pb = torch.empty((N, C, 1), device=x.device, dtype=torch.float32)
            pw = torch.empty_like(pb)
            kernel = _bwd_fused_kernel if p["path"] == "tile" else _bwd_group_loop_kernel
            _launch(kernel, (N * G,),
                dy, x, w, b, stats, pb, pw, dx if need_dx else _dummy(x),
                sn, sc, ss, C, S, CG, G, float(CG * S),
                ACT=act, HAS_W=has_w, HAS_B=has_b, NEED_DX=need_dx,
                BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(2 * bc * bs),
            )
        else:
            bc, bs, ncb, nsb, spp = p["block_c"], p["block_s"], p["ncb"], p["nsb"], p["s_per_prog"]
            pb = torch.empty((N, C, nsb), device=x.device, dtype=torch.float32)
            pw = torch.empty_like(pb)
            _launch(_bwd_partial_kernel, (N * ncb * nsb,),
                dy, x, w, b, stats, pb, pw, sn, sc, ss, C, S, CG, G, ncb, nsb, spp,
                ACT=act, HAS_W=has_w, HAS_B=has_b, BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(bc * bs),
            )
            # per-(n, c) totals over the spatial blocks (fixed order) and the group means
            pbc = torch.empty((N, C, 1), device=x.device, dtype=torch.float32)
            pwc = torch.empty_like(pbc)
            coef = torch.empty((N, G, 2), device=x.device, dtype=torch.float32)
            gbc = _rb(min(_pow2(CG), 1024))
            gbk = _rb(min(_pow2(nsb), max(1, 4096 // gbc)))
            _launch(_bwd_group_kernel, (N * G,),
                pb, pw, w, pbc, pwc, coef, C, CG, G, nsb, float(CG * S),
                HAS_W=has_w, BLOCK_C=gbc, BLOCK_K=gbk, num_warps=_warps(gbc * gbk),
            )
            pb, pw, nsb = pbc, pwc, 1
            if need_dx:
                ts = p["tiles_s"]
                _launch(_bwd_dx_kernel, (N * ncb * ts,),
                    dy, x, w, b, stats, coef, dx, sn, sc, ss, C, S, CG, G, ncb, ts,
                    ACT=act, HAS_W=has_w, HAS_B=has_b, BLOCK_C=bc, BLOCK_S=bs, num_warps=_warps(bc * bs),
                )
        dweight = torch.empty(C, device=x.device, dtype=weight.dtype) if need_dw else None
        dbias = torch.empty(C, device=x.device, dtype=bias.dtype) if need_db else None
        if need_dw or need_db:
            pbc = _rb(min(_pow2(C), 64))
            pbk = _rb(min(_pow2(nsb), 64))
            _launch(_bwd_param_kernel, (triton.cdiv(C, pbc),),
                pb, pw, dweight if need_dw else _dummy(x), dbias if need_db else _dummy(x), N, C, nsb,
                HAS_DW=need_dw, HAS_DB=need_db, BLOCK_C=pbc, BLOCK_K=pbk, num_warps=_warps(pbc * pbk),
            )
        return dx, dweight, dbias


BACKEND = TritonBackend()


# --------------------------------------------------------------------------- ahead-of-time check
# Representative problems of the GPU benchmark suite: (shape, G, layout, dtype, param dtype, activation).
CHECK_CASES = (
    ((1, 512, 256, 256), 32, "channels_last", torch.bfloat16, torch.bfloat16, "silu"),  # SD VAE, batch 1 (split)
    ((1, 512, 256, 256), 32, "contiguous", torch.bfloat16, torch.float32, "silu"),
    ((1, 128, 512, 512), 32, "channels_last", torch.bfloat16, torch.float32, "silu"),
    ((2, 320, 64, 64), 32, "channels_last", torch.float16, torch.float32, "gelu"),  # SD UNet
    ((32, 256, 56, 56), 32, "contiguous", torch.float32, torch.float32, "relu"),  # ResNet-50, batch 32 (group)
    ((32, 256, 56, 56), 32, "channels_last", torch.float16, torch.float16, "none"),
    ((32, 2048, 7, 7), 32, "contiguous", torch.float32, None, "none"),  # tile
    ((2, 64, 16, 64, 64), 8, "channels_last", torch.float32, torch.float32, "relu"),  # 3-D, batch 2
)
_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _record_case(shape, G, layout, dtype, pdtype, activation, num_sms=132):
    """The launches (kernel, grid, args, constexprs, num_warps) of one forward + backward, on meta tensors
    (planned for a GPU with ``num_sms`` SMs, an H100 SXM by default)."""
    global _RECORD
    x = torch.empty(shape, device="meta", dtype=dtype)
    if layout != "contiguous":
        x = torch.empty((shape[0], *shape[2:], shape[1]), device="meta", dtype=dtype).movedim(-1, 1)
    w = None if pdtype is None else torch.empty(shape[1], device="meta", dtype=pdtype)
    _RECORD = []
    try:
        with tuning(**{"num_sms": num_sms, **_OVERRIDES}):
            y, stats = BACKEND.forward(x, w, w, G, 1e-5, activation)
            BACKEND.backward(torch.empty_like(x), x, w, w, stats, G, activation, (True, True, True))
        return _RECORD
    finally:
        _RECORD = None


def _source(kernel, args, constexprs):
    """Triton's own specialization of one launch: signature, constexprs (ints equal to 1 included), attrs."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + _TL_DTYPE[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            continue
        kind, spec = native_specialize_impl(CUDABackend, a, False, True, True)[:2]
        if kind == "constexpr":
            signature[name] = "constexpr"
            consts[name] = spec
        else:
            signature[name] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
        consts[name] = constexprs[name]
    return ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)


def compile_check(cases=CHECK_CASES, arch=90, verbose=True):
    """Compile every kernel launch of ``cases`` ahead of time for sm_``arch`` (no GPU needed).

    Needs triton's CUDA backend (ptxas ships in the wheel) and this module imported WITHOUT
    TRITON_INTERPRET.  Returns rows (case, kernel, constexprs, num_warps, grid, registers,
    spill bytes); raises on the first kernel that does not compile.
    """
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget

    if _INTERPRETED:
        raise RuntimeError("compile_check needs the compiled kernels: unset TRITON_INTERPRET and re-import")
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows, seen = [], {}
    for case in cases:
        for kernel, grid, args, constexprs, num_warps in _record_case(*case):
            src = _source(kernel, args, constexprs)
            key = (src.hash(), num_warps)
            if key not in seen:
                compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
                regs = spill = -1
                if os.path.exists(cuobjdump):
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
                    fields = dict(tok.split(":", 1) for tok in out.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
                    regs = int(fields.get("REG", -1))
                    spill = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
                seen[key] = (regs, spill)
            regs, spill = seen[key]
            short = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("ACT", "NEED_DX")}
            row = (case[0], case[2], kernel.__name__, short, num_warps, grid[0], regs, spill)
            rows.append(row)
            if verbose:
                print(f"{str(case[0]):22} {case[2]:13} {kernel.__name__:22} {str(short):46} warps={num_warps} grid={grid[0]:<7} regs={regs} spill={spill}")
    return rows


if __name__ == "__main__":  # python -m groupnorm.backends.gpu [arch]: compile-check the GPU suite's kernels
    import sys

    compile_check(arch=int(sys.argv[1]) if len(sys.argv) > 1 else 90)
