"""The numba CPU backend against the NumPy oracle (groupnorm.backends.reference).

Forward output, statistics and all three gradients over a sweep of shapes (G = 1, G = C,
odd sizes, (N, C) to 3-D), both layouts, every activation, float32/float64, with and
without weight/bias, in both work decompositions (one item per group/sample, and the
reduction split into chunks); the large-mean case; bitwise-repeatable results.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from groupnorm.backends import cpu  # noqa: E402
from groupnorm.backends import reference as ref  # noqa: E402
from groupnorm.backends import simd  # noqa: E402

BACKEND = cpu.BACKEND
ACTS = ("none", "relu", "silu", "gelu")
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11)}

# (shape, G): G = 1 (LayerNorm-like), G = C (InstanceNorm-like), odd sizes, (N, C), 1-D, 2-D, 3-D
SHAPES = [
    ((2, 6, 5, 7), 3),
    ((3, 4, 9), 1),
    ((2, 8, 3, 4, 5), 8),
    ((5, 6), 2),
    ((1, 12, 11, 13), 4),
    ((4, 3, 1, 1), 3),
]


@pytest.fixture(params=["fused", "split"])
def mode(request, monkeypatch):
    monkeypatch.setattr(cpu, "split_mode", request.param)
    return request.param


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x stored as (N, *spatial, C), viewed as (N, C, *spatial) (any rank)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make(shape, dtype, layout, seed=0, mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    x = x.to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
        assert x.movedim(1, -1).is_contiguous()
    C = shape[1]
    w = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        dy = channels_last(dy)
    return x, w, b, dy


def np64(t):
    return None if t is None else t.detach().double().numpy()


def assert_close(actual, expected, dtype, what, scale=1.0):
    """Elementwise within rtol, plus atol relative to the largest magnitude involved."""
    rtol, atol = TOL[dtype]
    scale = max(scale, 1.0, float(np.abs(expected).max()) if np.size(expected) else 1.0)
    np.testing.assert_allclose(np64(actual), expected, rtol=rtol, atol=atol * scale, err_msg=what)


def check_against_reference(x, w, b, dy, G, act, eps=1e-5):
    dtype = x.dtype
    y, stats = BACKEND.forward(x, w, b, G, eps, act)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride(), "y must keep x's layout"
    assert stats.shape == (x.shape[0], G, 3)
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    y_ref, mean_ref, rstd_ref = ref.forward(np64(x), np64(w), np64(b), G, eps, act)
    assert_close(y, y_ref, dtype, f"forward {act}")
    st = stats.double().numpy()
    np.testing.assert_allclose(st[..., 0] + st[..., 1], mean_ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    np.testing.assert_allclose(st[..., 2], rstd_ref, rtol=10 * TOL[dtype][0])

    dx, dw, db = BACKEND.backward(dy, x, w, b, stats, G, act, [True, True, True])
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), np64(x), np64(w), np64(b), G, eps, act)
    assert dx.dtype == dtype and dx.stride() == x.stride(), "dx must keep x's dtype and layout"
    # dx = rstd * (g w - mean(g w) - xhat mean(g w xhat)): its rounding error scales with rstd * |g w|
    dx_scale = float(rstd_ref.max()) * float(np.abs(np64(dy)).max()) * (1.0 if w is None else float(np.abs(np64(w)).max()))
    assert_close(dx, dx_ref, dtype, f"dx {act}", scale=dx_scale)
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype
        assert_close(dw, dw_ref, dtype, f"dweight {act}")
    if b is None:
        assert db is None
    else:
        assert db.dtype == b.dtype
        assert_close(db, db_ref, dtype, f"dbias {act}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in SHAPES])
def test_matches_reference(shape, G, layout, dtype, mode):
    for i, act in enumerate(ACTS):
        x, w, b, dy = make(shape, dtype, layout, seed=i)
        check_against_reference(x, w, b, dy, G, act)


# channels-last shapes the SIMD block kernels (cpu._cl_*_vec) take: C a multiple of a 4-vector
# block (R = 1: one or several blocks per row), or a block holding R = 2 or 4 whole rows; S over
# one 64-row tile and S % R != 0 (rows left to the scalar tail), in float32 (16 lanes) and
# float64 (8 lanes); the last two fall back to the row-span kernels in one of the dtypes.
SIMD_SHAPES = [
    ((2, 128, 9, 9), 8),  # f32 R=1, 2 blocks, tiles of 64 + 17 rows; f64 R=1, 4 blocks
    ((3, 32, 7, 7), 4),  # f32 R=2, 49 rows: one left over; f64 R=1
    ((2, 16, 5, 13), 2),  # f32 R=4, 65 rows; f64 R=2
    ((1, 64, 11, 12), 16),  # batch 1: split into row chunks that start anywhere
    ((2, 8, 10, 7), 2),  # f64 R=4; f32 not a whole vector: row-span kernels
    ((2, 256, 3, 3, 2), 32),  # 3-D; f32 R=1, 4 blocks; f64 rows of 2 KiB: row-span kernels
]


def test_vhsum_adds_halves_in_order():
    """simd.vhsum: the upper half of the lanes added to the lower half until one is left, the
    same order on every CPU (values chosen so that another order rounds differently)."""
    from numba import njit

    @njit
    def hsum(a):
        return simd.vhsum(simd.vload(a, 0))

    for dtype in (np.float32, np.float64):
        W = simd.VECTOR_BYTES // np.dtype(dtype).itemsize
        a = np.ones(W, dtype)
        a[0], a[W // 2] = 1e17, -1e17  # cancel in the first halving; in lane order they swallow the 1s
        lanes = a.copy()
        while lanes.size > 1:
            lanes = lanes[: lanes.size // 2] + lanes[lanes.size // 2:]
        assert lanes[0] == W - 2
        assert hsum(a) == lanes[0]
        ordered = dtype(0)
        for v in a:
            ordered += v
        assert ordered != lanes[0], "the test values do not tell the orders apart"


def test_simd_block_rule():
    """Which channel counts the SIMD block kernels take (R rows per block; 0: row-span kernels).
    With AVX-512: every multiple of the block up to 1 KiB rows. Without (AVX2): rows of several
    blocks only for samples up to 64 KiB; one block per row, or whole rows in a block, always."""
    def rule(itemsize, channels, S, avx512):
        return {C: int(cpu.vec_rows_rule(C, S, itemsize, avx512)) for C in channels}

    f32 = (8, 16, 32, 48, 64, 96, 128, 192, 256, 512)
    f64 = (4, 8, 16, 24, 32, 64, 128, 256)
    expected32 = {8: 0, 16: 4, 32: 2, 48: 0, 64: 1, 96: 0, 128: 1, 192: 1, 256: 1, 512: 0}
    expected64 = {4: 0, 8: 4, 16: 2, 24: 0, 32: 1, 64: 1, 128: 1, 256: 0}
    for S in (49, 3136):
        assert rule(4, f32, S, True) == expected32
        assert rule(8, f64, S, True) == expected64
    assert rule(4, f32, 64, False) == expected32  # 64 rows of 256 channels: 64 KiB
    assert rule(8, f64, 64, False) == expected64
    assert rule(4, f32, 3136, False) == {**expected32, 128: 0, 192: 0, 256: 0}
    assert rule(8, f64, 3136, False) == {**expected64, 64: 0, 128: 0}
    assert rule(4, (256,), 65, False) == {256: 0}
    assert all(cpu._cl_vec_rows(C, 3136, 4) == cpu.vec_rows_rule(C, 3136, 4, simd.HOST_AVX512) for C in f32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,G", SIMD_SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in SIMD_SHAPES])
def test_simd_channels_last_matches_reference(shape, G, dtype, mode):
    for i, act in enumerate(ACTS):  # none and ReLU run the SIMD kernels throughout, SiLU and GELU in the statistics
        x, w, b, dy = make(shape, dtype, "channels_last", seed=10 + i, mean=3.0)
        check_against_reference(x, w, b, dy, G, act)


# contiguous shapes the small-group kernels (cpu._nc_groups_fwd, cpu._nc_groups_bwd) take: rows of
# one to 4 SIMD vectors, several groups per work item; a row of 1 vector and of several (float32:
# 16 lanes, float64: 8), with and without a scalar tail, and a 3-D map.
SMALL_GROUP_SHAPES = [
    ((64, 64, 4, 4), 32),
    ((24, 32, 5, 6), 16),
    ((32, 16, 4, 5), 8),
    ((16, 24, 2, 2, 8), 12),
]


def test_small_groups_short_rows_forward():
    """Rows shorter than a vector (2x2, 3x3 maps): the forward takes the small-group kernel (its sums
    run flat over the group), the backward the per-group kernels; both against the oracle."""
    for shape, G in (((64, 64, 2, 2), 32), ((48, 32, 3, 3), 8)):
        N, C, S = shape[0], shape[1], math.prod(shape[2:])
        probe = np.empty(1, np.float32)
        assert cpu._nc_groups_per_item(probe, N, G, C // G, S, 2, True) > 1
        assert cpu._nc_groups_per_item(probe, N, G, C // G, S, 2, False) == 1
        for i, act in enumerate(("none", "relu")):
            x, w, b, dy = make(shape, torch.float32, "contiguous", seed=30 + i, mean=3.0)
            check_against_reference(x, w, b, dy, G, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,G", SMALL_GROUP_SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in SMALL_GROUP_SHAPES])
def test_small_groups_match_reference(shape, G, dtype):
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    probe = np.empty(1, np.float32 if dtype == torch.float32 else np.float64)
    assert all(cpu._nc_groups_per_item(probe, N, G, C // G, S, T, False) > 1 for T in (1, 2)), "not the small-group path"
    for i, act in enumerate(("none", "relu")):
        x, w, b, dy = make(shape, dtype, "contiguous", seed=20 + i, mean=3.0)
        check_against_reference(x, w, b, dy, G, act)


def test_small_groups_exact_path():
    """Groups of std 1e25 on the small-group path (cpu._nc_groups_fwd/_nc_groups_bwd): float64
    sums in the forward, the exact float64 dx in the backward (flagged there, redone after the
    parallel loop), beside ordinary groups of the same call."""
    shape, G = (32, 16, 4, 4), 4
    g = torch.Generator().manual_seed(17)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[::3] *= 1e25
    x = x.float()
    dy, w, b = torch.randn(shape, generator=g), torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    assert cpu._nc_groups_per_item(np.empty(1, np.float32), 32, G, 4, 16, 2, False) > 1
    for act in ("none", "relu"):
        y, stats = BACKEND.forward(x, w, b, G, 1e-5, act)
        y_ref, _, _ = ref.forward(np64(x), np64(w), np64(b), G, 1e-5, act)
        assert_close(y, y_ref, torch.float32, f"forward {act}")
        dx, dw, db = BACKEND.backward(dy, x, w, b, stats, G, act, [True, True, True])
        dx_ref, dw_ref, db_ref = ref.backward(np64(dy), np64(x), np64(w), np64(b), G, 1e-5, act)
        for n in range(shape[0]):  # each sample against its own scale (rstd differs by 1e25)
            rel = float(np.abs(np64(dx[n]) - dx_ref[n]).max() / np.abs(dx_ref[n]).max())
            assert rel < 1e-5, f"dx of sample {n} {rel:.3g} off float64 ({act})"
        assert_close(db, db_ref, torch.float32, f"dbias {act}")
        assert_close(dw, dw_ref, torch.float32, f"dweight {act}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", [((2, 128, 8, 9), 8), ((3, 32, 7, 6), 4), ((2, 48, 5, 6), 8), ((64, 32, 4, 4), 16)])
def test_relu_backward_mask_is_the_forwards(shape, G, layout, mode, monkeypatch):
    """The backward lets the gradient through exactly where the forward's ReLU output is positive,
    including elements with z == 0 exactly (x at the group mean, zero bias): with dy = 1, dbias[c]
    counts them. Values -1, 0, 1 and their negatives in the other half of each map make every
    group's sum, and so its computed mean, exactly 0. The backward runs in the other work
    decomposition than the forward (other row chunks, so other rows in SIMD blocks and scalar tails)."""
    g = torch.Generator().manual_seed(3)
    half = torch.randint(-1, 2, (shape[0], shape[1], math.prod(shape[2:]) // 2), generator=g).float()
    x = torch.cat([half, -half], dim=2).reshape(shape)
    if layout == "channels_last":
        x = channels_last(x)
    C = shape[1]
    w = torch.rand(C, generator=g) + 0.5
    b = torch.zeros(C)
    y, stats = BACKEND.forward(x, w, b, G, 1e-5, "relu")
    assert (y == 0).any() and (y > 0).any()
    monkeypatch.setattr(cpu, "split_mode", "split" if mode == "fused" else "fused")
    dy = torch.ones_like(x)
    _, _, db = BACKEND.backward(dy, x, w, b, stats, G, "relu", [False, False, True])
    expected = (y > 0).sum(dim=[d for d in range(y.dim()) if d != 1]).float()
    assert torch.equal(db, expected), (db - expected).abs().max()


@pytest.mark.parametrize("affine", ["weight_only", "bias_only", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_without_weight_or_bias(affine, layout, mode):
    for act in ACTS:
        x, w, b, dy = make((2, 8, 6, 5), torch.float64, layout)
        w = w if affine == "weight_only" else None
        b = b if affine == "bias_only" else None
        check_against_reference(x, w, b, dy, 4, act)


def test_output_mask_and_eps():
    x, w, b, dy = make((2, 8, 5, 5), torch.float64, "contiguous")
    _, stats = BACKEND.forward(x, w, b, 2, 0.25, "silu")
    _, mean, rstd = ref.forward(np64(x), np64(w), np64(b), 2, 0.25, "silu")
    np.testing.assert_allclose(stats[..., 2].numpy(), rstd, rtol=1e-12)
    dx, dw, db = BACKEND.backward(dy, x, w, b, stats, 2, "silu", [True, False, False])
    assert dw is None and db is None and dx is not None


def test_backward_accepts_reference_stats():
    """Statistics are a cross-backend contract: the reference's (mean_hi, mean_lo, rstd) work here."""
    x, w, b, dy = make((2, 6, 4, 4), torch.float32, "channels_last", mean=300.0)
    _, stats = ref.BACKEND.forward(x, w, b, 3, 1e-5, "gelu")
    dx, dw, db = BACKEND.backward(dy, x, w, b, stats, 3, "gelu", [True, True, True])
    dx_r, dw_r, db_r = ref.BACKEND.backward(dy, x, w, b, stats, 3, "gelu", [True, True, True])
    for a, e, name in ((dx, dx_r, "dx"), (dw, dw_r, "dw"), (db, db_r, "db")):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_through_float32(dtype):
    x, _, _, dy = make((2, 8, 6, 6), dtype, "channels_last")
    w = torch.linspace(0.5, 1.5, 8)  # float32 parameters with half input (mixed precision)
    b = torch.linspace(-0.5, 0.5, 8)
    y, stats = BACKEND.forward(x, w, b, 4, 1e-5, "silu")
    assert y.dtype == dtype and y.stride() == x.stride() and stats.dtype == torch.float32
    y_ref, _, _ = ref.forward(np64(x), np64(w), np64(b), 4, 1e-5, "silu")
    np.testing.assert_allclose(np64(y), y_ref, rtol=2e-2, atol=2e-2)
    dx, dw, db = BACKEND.backward(dy, x, w, b, stats, 4, "silu", [True, True, True])
    dx_ref, dw_ref, db_ref = ref.backward(np64(dy), np64(x), np64(w), np64(b), 4, 1e-5, "silu")
    assert dx.dtype == dtype and dw.dtype == torch.float32 and db.dtype == torch.float32
    np.testing.assert_allclose(np64(dx), dx_ref, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np64(dw), dw_ref, rtol=1e-2, atol=1e-2 * np.abs(dw_ref).max())
    np.testing.assert_allclose(np64(db), db_ref, rtol=1e-2, atol=1e-2 * np.abs(db_ref).max())


def forward_error(x, G, rstd_rtol):
    """Max |error| of the backend's forward (no affine) against float64 on the same values; also
    checks its rstd statistics to rstd_rtol. Returns (error, stats)."""
    y, stats = BACKEND.forward(x, None, None, G, 1e-5, "none")
    xhat, _, rstd = ref.normalize(x.double().numpy(), G, 1e-5)
    np.testing.assert_allclose(stats.double().numpy()[..., 2], rstd, rtol=rstd_rtol)
    return float(np.abs(y.double().numpy() - xhat).max()), stats


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_float32(layout, mode):
    """mean 1e4, std 1e-2: the normalized output within 1e-3 of float64's (ATen's CPU GN is ~8e-2 off)."""
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(2, 64, 16, 16, generator=g, dtype=torch.float64) * 1e-2 + 1e4
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, stats = BACKEND.forward(x, None, None, 16, 1e-5, "none")
    xhat, mean, _ = ref.normalize(x.double().numpy(), 16, 1e-5)  # float64 on the same float32 values
    err = float(np.abs(y.double().numpy() - xhat).max())
    assert err < 1e-3, f"normalized output is {err:.3g} off float64 at mean 1e4 ({layout}, {mode})"
    st = stats.double().numpy()
    np.testing.assert_allclose(st[..., 0] + st[..., 1], mean, rtol=0, atol=1e-6)
    dy = torch.randn(x.shape, generator=g).to(memory_format=torch.channels_last if layout != "contiguous" else torch.contiguous_format)
    dx, _, _ = BACKEND.backward(dy, x, None, None, stats, 16, "none", [True, False, False])
    dx_ref, _, _ = ref.backward(dy.double().numpy(), x.double().numpy(), None, None, 16, 1e-5, "none")
    rel = np.abs(dx.double().numpy() - dx_ref).max() / np.abs(dx_ref).max()
    assert rel < 1e-3, f"dx relative error {rel:.3g} at mean 1e4"


@pytest.mark.parametrize("shape,G", [((8, 256, 7, 7), 32), ((4, 64, 12, 12), 8)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_statistics_as_accurate_as_float64(shape, G, layout, mode):
    """Float32 statistics are sums accumulated in float32 around a shift (contiguous groups of
    1024+ elements, every channels-last group); the variance E[d^2] - E[d]^2 loses digits when
    the shift sits far from the mean. Mean -2, std 3, channel means that differ within a group,
    and groups that start with an outlier: a one-element shift gave 2-8e-6 here, while the float32
    rounding of the output alone is ~2.4e-7 (torch's CPU GroupNorm: 5-8e-7)."""
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 2
    x64 += torch.randn(1, shape[1], 1, 1, generator=g, dtype=torch.float64)
    x64[:, :: shape[1] // G * 2, 0, 0] = 12.0
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    err, _ = forward_error(x, G, rstd_rtol=2e-7)
    assert err < 1e-6, f"normalized output {err:.3g} off float64 ({layout}, {mode})"


@pytest.mark.parametrize("shape,G", [((1, 32, 256, 256), 8), ((2, 64, 128, 128), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_statistics_of_large_groups(shape, G, layout, mode):
    """Groups of 2^18-2^19 elements: hundreds of float32 blocks (or rows) per group, whose sums are
    added up in float64. Folded in float32 instead, rstd came out 2-5e-7 off and the output 1.3-2.7e-6
    (one work split), against 3-5e-8 and 5e-7 here."""
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 2
    x64 += torch.randn(1, shape[1], 1, 1, generator=g, dtype=torch.float64)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    err, _ = forward_error(x, G, rstd_rtol=1.5e-7)
    assert err < 1e-6, f"normalized output {err:.3g} off float64 ({layout}, {mode})"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_statistics_with_a_misleading_group_start(layout, mode):
    """The shift is sampled from a group's first 16 elements; zero padding there (mean 100 elsewhere)
    puts it ~8 standard deviations from the mean, where float32 sums lose ~60x their rounding to
    cancellation. Such groups must be summed again around the mean found."""
    g = torch.Generator().manual_seed(12)
    x64 = torch.randn(2, 64, 32, 32, generator=g, dtype=torch.float64) + 100
    x64[:, :, 0, :16] = 0.0
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    err, _ = forward_error(x, 8, rstd_rtol=2e-7)
    assert err < 2e-6, f"normalized output {err:.3g} off float64 ({layout}, {mode})"


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 64, 8, 8), (2, 64, 16, 16), (1, 24, 40, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_huge_float32_values_normalize(shape, layout, mode):
    """Finite float32 inputs of std 1e20-1e36: their squares overflow float32, so float32 sums
    gave var = inf and an output equal to the bias (torch's CPU GroupNorm: NaN or ~1 off from std
    1e18). Such groups are summed again in float64 terms. Contiguous groups under 1024 elements
    (float64 terms already) and over (float32 blocks), channels-last, batch 1 (split reduction,
    and the forced modes); an infinite input still gives NaN/inf in its own group only. The backward
    (up to std 1e30): its q = -rstd^2 m2 leaves float32's range beyond std ~1e19, and such groups
    take an exact float64 path (before: dx 2-4e-2 off at std 1e25)."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(shape[1], generator=g) * 0.5 + 1
    b = torch.randn(shape[1], generator=g) * 0.5
    for std in (1e20, 1e30, 1e36):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * std).float()
        dy = torch.randn(shape, generator=g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        err, _ = forward_error(x, 4, rstd_rtol=1e-6)
        assert err < 1e-6, f"normalized output {err:.3g} off float64 at std {std:g} ({shape}, {layout}, {mode})"
        if std > 1e30:
            continue
        for act in ("none", "relu", "silu"):
            y, stats = BACKEND.forward(x, w, b, 4, 1e-5, act)
            dx, _, _ = BACKEND.backward(dy, x, w, b, stats, 4, act, [True, False, False])
            dx_ref, _, _ = ref.backward(dy.double().numpy(), x.double().numpy(), w.double().numpy(),
                                        b.double().numpy(), 4, 1e-5, act)
            rel = float(np.abs(dx.double().numpy() - dx_ref).max() / np.abs(dx_ref).max())
            assert rel < 1e-5, f"dx {rel:.3g} off float64 at std {std:g} ({shape}, {layout}, {mode}, {act})"
    x = x.clone()
    x[0, 0].view(-1)[0] = float("inf")
    y, _ = BACKEND.forward(x, None, None, 4, 1e-5, "none")
    first = y[0, : shape[1] // 4]
    assert not torch.isfinite(first).all() and torch.isfinite(y[0, shape[1] // 4:]).all() and torch.isfinite(y[1:]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_mask_on_the_exact_path(layout, mode):
    """The float64 exact dx path (groups of std ~1e21, where q leaves float32's range) applies
    ReLU's mask as the rest do: no gradient where z == 0 exactly. Values -2^70, 0, 2^70 and their
    negatives in the other half of each map make every group's mean exactly 0, so with zero bias
    z == 0 at every 0; dx there is g * p + r with g = 0, not dy."""
    shape, G = (2, 16, 6, 6), 4
    g = torch.Generator().manual_seed(5)
    half = torch.randint(-1, 2, (shape[0], shape[1], 18), generator=g).float() * 2.0**70
    x = torch.cat([half, -half], dim=2).reshape(shape)
    dy = torch.randn(shape, generator=g)
    if layout == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    w = torch.rand(shape[1], generator=g) + 0.5
    b = torch.zeros(shape[1])
    y, stats = BACKEND.forward(x, w, b, G, 1e-5, "relu")
    assert (y == 0).any() and (y > 0).any()
    dx, _, db = BACKEND.backward(dy, x, w, b, stats, G, "relu", [True, False, True])
    dx_ref, _, db_ref = ref.backward(dy.double().numpy(), x.double().numpy(), w.double().numpy(),
                                     b.double().numpy(), G, 1e-5, "relu")
    rel = float(np.abs(dx.double().numpy() - dx_ref).max() / np.abs(dx_ref).max())
    assert rel < 1e-5, rel
    assert np.allclose(db.double().numpy(), db_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("split", ["auto", "fused", "split"])
def test_bitwise_repeatable(layout, split, act, monkeypatch):
    """Large enough to run on every thread; two runs must agree bit for bit."""
    monkeypatch.setattr(cpu, "split_mode", split)
    x, w, b, dy = make((2, 64, 24, 24), torch.float32, layout)
    outs = []
    for _ in range(2):
        y, stats = BACKEND.forward(x, w, b, 32, 1e-5, act)
        dx, dw, db = BACKEND.backward(dy, x, w, b, stats, 32, act, [True, True, True])
        outs.append((y, stats, dx, dw, db))
    for a, c in zip(*outs):
        assert torch.equal(a, c), "repeated runs differ"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch1_uses_split_reduction(layout):
    """A batch-1 shape with few groups splits the reduction over S (when threads > 1) and stays correct."""
    import numba

    shape, G = (1, 4, 128, 128), 1
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        threads, chunks = cpu._plan(shape[0], shape[1], 128 * 128, G, layout == "channels_last", cpu._get_threads())
        assert threads == 2 and chunks > 1, "a batch-1 shape should split its reduction into chunks"
        x, w, b, dy = make(shape, torch.float64, layout)
        check_against_reference(x, w, b, dy, G, "relu")
    finally:
        numba.set_num_threads(prev)


def test_channels_last_split_gives_every_thread_a_chunk():
    """A split channels-last reduction has at least one chunk per thread, also when the map has
    fewer than 64 rows per thread (batch 1, 8x8 or 7x7 map, many channels: one chunk ran the
    whole call on one thread); otherwise chunks of at least 64 rows, at most 8 items per thread."""
    assert cpu._plan(1, 1280, 64, 32, True, 2) == (2, 2)
    assert cpu._plan(1, 2048, 49, 32, True, 2) == (2, 2)
    assert cpu._plan(3, 1280, 64, 32, True, 2) == (2, 2)  # 6 items: no 2:1 imbalance between the threads
    assert cpu._plan(1, 128, 640, 8, True, 2) == (2, 10)  # 64-row chunks as before
    assert cpu._plan(1, 64, 64, 8, True, 2) == (1, 0)  # 4096 values: one thread (_MIN_PARALLEL_ELEMS)
    import numba

    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        x, w, b, dy = make((1, 1280, 8, 8), torch.float32, "channels_last")
        for act in ("none", "silu"):  # 32 rows per chunk: the 64-row blocks end early
            check_against_reference(x, w, b, dy, 32, act)
    finally:
        numba.set_num_threads(prev)


def test_thread_count_fast_path_follows_numba():
    """The lock-free thread-count accessors agree with numba's public calls, and a small tensor's
    one-thread run restores the caller's setting."""
    import numba

    prev = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            assert cpu._get_threads() == n
            cpu._set_threads(1)
            assert numba.get_num_threads() == 1
            cpu._set_threads(n)
            assert numba.get_num_threads() == n
            x = torch.randn(2, 4, 3, 3)  # small: runs on one thread
            BACKEND.forward(x, None, None, 2, 1e-5, "none")
            assert numba.get_num_threads() == n
    finally:
        numba.set_num_threads(prev)


def test_supports_and_errors():
    assert BACKEND.available() is None
    assert BACKEND.supports(torch.zeros(2, 2), "gelu")
    assert not BACKEND.supports(torch.zeros(2, 2, dtype=torch.int64), "none")
    x = torch.randn(2, 4, 6, 6)[:, :, ::2]  # neither contiguous nor channels-last dense
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        BACKEND.forward(x, None, None, 2, 1e-5, "none")


def test_through_the_op_gradcheck():
    """The backend behind groupnorm.group_norm's autograd: gradcheck in float64."""
    group_norm = pytest.importorskip("groupnorm").group_norm
    x, w, b, _ = make((2, 6, 3, 4), torch.float64, "channels_last")
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    for act in ("none", "silu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: group_norm(x, 3, w, b, 1e-5, activation=None if act == "none" else act, backend="numba"),
            inputs,
        )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_shift_is_the_mean_of_the_groups_first_elements_in_memory(layout):
    """The statistics' shift is the mean of each group's first 16 elements in memory order (not 0:
    results would stay right through the re-summation of far-off groups, but every group of a
    large-mean input would take that slower path)."""
    N, C, S, G = 2, 12, 10, 3
    Cg = C // G
    x = torch.randn(N, C, S, dtype=torch.float64) * 3 + 100
    if layout == "contiguous":
        flat = x.float().numpy().ravel()
        off = cpu._shift_offsets(Cg, S, S, 1)
        base = lambda n, g: (n * C + g * Cg) * S
        first = lambda n, g: x[n, g * Cg:(g + 1) * Cg].reshape(-1)[:16]  # positions fastest
    else:
        flat = x.float().transpose(1, 2).contiguous().numpy().ravel()  # (N, S, C) in memory
        off = cpu._shift_offsets(Cg, S, 1, C)
        base = lambda n, g: n * S * C + g * Cg
        first = lambda n, g: x[n, g * Cg:(g + 1) * Cg].T.reshape(-1)[:16]  # channels fastest
    for n in range(N):
        for g in range(G):
            expected = np.float32(first(n, g).float().double().mean().item())
            assert cpu._group_shift(flat, base(n, g), off) == expected, (n, g)
