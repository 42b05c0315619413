"""The Triton backend (groupnorm/backends/gpu.py) against the float64 NumPy reference.

Without a CUDA device the kernels run on CPU tensors in Triton's interpreter: this file sets
TRITON_INTERPRET=1 before triton is imported, and keeps every shape tiny.  With a CUDA device
the same tests run the compiled kernels on CUDA tensors, and the tests marked ``gpu`` (bigger
shapes against torch.nn.GroupNorm) run too; without one they are skipped and say why.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from groupnorm import backends  # noqa: E402
from groupnorm.backends import reference  # noqa: E402
from helpers import assert_like_torch_nonfinite, nonfinite_relu_case  # noqa: E402

_mod = sys.modules.get("groupnorm.backends.gpu")
if _mod is not None and not _mod._INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
    # Imported earlier in this process with compiled (CUDA) kernels: rebuild for the interpreter.
    _mod = importlib.reload(_mod)
    backends._loaded.pop("triton", None)
from groupnorm.backends import gpu  # noqa: E402

BACKEND = gpu.BACKEND
_REASON = BACKEND.available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

HAS_CUDA = torch.cuda.is_available() and not gpu._INTERPRETED
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here); the interpreter tests cover correctness")

EPS = 1e-5
# (atol, rtol), the atol scaled by the largest magnitude of the expected result.
TOL = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}
ACTS = ("none", "relu", "silu", "gelu")
# (shape, num_groups, layouts it is stored in); the layouts name what the test stores.
CASES = [
    ((2, 8, 5, 3), 4, ("contiguous", "channels_last")),
    ((1, 6, 7), 2, ("contiguous", "nlc")),  # C/G = 3, not a power of two
    ((3, 4, 2, 3, 2), 2, ("contiguous", "channels_last_3d")),
    ((2, 4), 2, ("contiguous",)),
]
SHAPE_LAYOUTS = [(shape, G, layout) for shape, G, layouts in CASES for layout in layouts]
# The three plans: one program per group with the group in one register tile, one program
# per group sweeping it in tiles, and the split reduction; the last two forced with awkward
# tiles (blocks that do not divide C/G, C or the spatial size, several spatial blocks).
PATHS = {
    "tile": dict(path="tile"),
    "group": dict(path="group", block_c=2, block_s=4),
    "split": dict(path="split", block_c=2, block_s=4, split=3, reduce_block=2),
}


# ----------------------------------------------------------------------------- helpers
def make(shape, dtype, layout, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C, *spatial = shape
    if layout == "contiguous":
        x = torch.randn(*shape, dtype=torch.float64, generator=g) * std + mean
        x = x.to(dtype)
    else:
        x = (torch.randn(N, *spatial, C, dtype=torch.float64, generator=g) * std + mean).to(dtype).movedim(-1, 1)
        assert x.movedim(1, -1).is_contiguous()
        if layout == "channels_last":
            assert x.is_contiguous(memory_format=torch.channels_last)
        if layout == "channels_last_3d":
            assert x.is_contiguous(memory_format=torch.channels_last_3d)
    return x.to(DEVICE)


def params(C, dtype, affine, seed=1):
    """weight, bias per ``affine``: "both", "none", "weight", "bias"; ``dtype`` may be float32 for half x."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.25).to(dtype).to(DEVICE)
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    return (w if affine in ("both", "weight") else None), (b if affine in ("both", "bias") else None)


def _np(t):
    return None if t is None else t.detach().cpu().double().numpy()


def oracle(x, w, b, G, act, dy):
    y, mean, rstd = reference.forward(_np(x), _np(w), _np(b), G, EPS, act)
    dx, dw, db = reference.backward(_np(dy), _np(x), _np(w), _np(b), G, EPS, act)
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return t(y), t(dx), t(dw), t(db), t(mean), t(rstd)


def check(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual is not None, f"{what}: missing"
    act = actual.detach().cpu().double()
    exp = expected.detach().cpu().double()
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
    assert torch.isfinite(act).all(), f"{what}: non-finite values"
    scale = max(1.0, float(exp.abs().max()))
    err = (act - exp).abs()
    bad = err > atol * scale + rtol * exp.abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{err.numel()} elements off, max abs err {float(err.max()):.3g} (scale {scale:.3g})"
    )


def run(x, w, b, G, act, mask=(True, True, True), dy=None, **tune):
    """Forward + backward through the backend; returns y, stats, dy, dx, dw, db."""
    if dy is None:
        dy = torch.empty_like(x).copy_(make(tuple(x.shape), x.dtype, "contiguous", seed=7))
    with gpu.tuning(**tune):
        y, stats = BACKEND.forward(x, w, b, G, EPS, act)
        dx, dw, db = BACKEND.backward(dy, x, w, b, stats, G, act, mask)
    return y, stats, dy, dx, dw, db


def check_all(x, w, b, G, act, out, what=""):
    y, stats, dy, dx, dw, db = out
    ey, edx, edw, edb, emean, erstd = oracle(x, w, b, G, act, dy)
    dtype = x.dtype
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride(), f"{what}: y dtype/layout"
    assert dx.dtype == dtype and dx.stride() == x.stride(), f"{what}: dx dtype/layout"
    assert stats.dtype == torch.float32 and stats.shape == (x.shape[0], G, 3), f"{what}: stats"
    check(y, ey, dtype, f"{what} y")
    check(dx, edx, dtype, f"{what} dx")
    mean = stats[..., 0].double().cpu() + stats[..., 1].double().cpu()
    spread = max(1.0, float(x.double().std(correction=0)))
    check(mean / spread, emean / spread, torch.float32, f"{what} mean")
    check(stats[..., 2].cpu(), erstd, torch.float32, f"{what} rstd")
    if w is not None:
        assert dw is not None and dw.dtype == w.dtype and dw.shape == w.shape, f"{what}: dweight dtype/shape"
        check(dw, edw, w.dtype if w.dtype != torch.float32 else dtype, f"{what} dweight")
    else:
        assert dw is None
    if b is not None:
        assert db is not None and db.dtype == b.dtype, f"{what}: dbias dtype"
        check(db, edb, b.dtype if b.dtype != torch.float32 else dtype, f"{what} dbias")
    else:
        assert db is None


# ----------------------------------------------------------------------------- the contract
def test_available_and_supports():
    assert BACKEND.name == "triton"
    assert BACKEND.available() is None
    x = make((2, 4, 3), torch.float32, "contiguous")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for act in ACTS:
            assert BACKEND.supports(x.to(dtype), act)
    assert not BACKEND.supports(x.double(), "none")
    assert not BACKEND.supports(x.to(torch.int32), "none")
    assert not BACKEND.supports(x, "tanh")
    strided = make((2, 4, 6, 5), torch.float32, "contiguous")[..., ::2]  # not dense: the op densifies it
    assert BACKEND.supports(strided, "none")
    y, _ = BACKEND.forward(strided, None, None, 2, EPS, "none")
    check(y, oracle(strided, None, None, 2, "none", torch.zeros_like(strided))[0], torch.float32, "strided y")
    assert BACKEND.supports(make((2, 4, 6, 5), torch.float32, "channels_last"), "silu")
    if not HAS_CUDA:
        assert gpu._INTERPRETED  # CPU tensors are accepted only under the interpreter


def test_registered_in_dispatch():
    assert backends.get("triton").name == "triton"
    assert backends.get("triton").available() is None


def test_no_float_atomics_in_kernels():
    src = open(gpu.__file__).read()
    assert "atomic_" not in src, "dweight/dbias must be reduced in a fixed order, without atomics"


def _matrix():
    """Every (shape, layout) x every path in float32; the half dtypes x every (shape, layout)
    with the path rotating, so that each path still sees each half dtype."""
    out = []
    for i, (shape, G, layout) in enumerate(SHAPE_LAYOUTS):
        for path in PATHS:
            out.append((shape, G, layout, torch.float32, path))
        for j, dtype in enumerate((torch.float16, torch.bfloat16)):
            out.append((shape, G, layout, dtype, list(PATHS)[(i + j) % len(PATHS)]))
    return out


@pytest.mark.parametrize("shape,G,layout,dtype,path", _matrix(), ids=str)
def test_layouts_dtypes(shape, G, layout, dtype, path):
    x = make(shape, dtype, layout)
    act = ACTS[(len(shape) + G + len(layout)) % 4]  # spread the activations over the matrix
    w, b = params(shape[1], dtype, "both")
    check_all(x, w, b, G, act, run(x, w, b, G, act, **PATHS[path]), what=f"{shape} {layout} {dtype} {act} {path}")


@pytest.mark.parametrize(
    "act,affine,path",
    [(a, f, list(PATHS)[(i + j) % len(PATHS)]) for i, a in enumerate(ACTS) for j, f in enumerate(["both", "none", "weight", "bias"])],
)
def test_activations_affine(act, affine, path):
    """Each activation with each affine variant; the path rotates so each activation meets each path."""
    layout = "channels_last" if path != "split" else "contiguous"
    x = make((2, 6, 3, 4), torch.float32, layout, seed=3)
    w, b = params(6, torch.float32, affine)
    check_all(x, w, b, 3, act, run(x, w, b, 3, act, **PATHS[path]), what=f"{act} {affine} {path}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_precision_params(dtype, path):
    """Half input with float32 weight/bias: y/dx in the half dtype, dweight/dbias in float32."""
    layout = "channels_last" if (path == "split") == (dtype == torch.float16) else "contiguous"
    x = make((2, 8, 3, 5), dtype, layout, seed=4)
    w, b = params(8, torch.float32, "both")
    out = run(x, w, b, 2, "silu", **PATHS[path])
    check_all(x, w, b, 2, "silu", out, what=f"{dtype} {layout} {path}")
    assert out[4].dtype == torch.float32 and out[5].dtype == torch.float32


@pytest.mark.parametrize(
    "shape,G,layout,tune",
    [
        ((2, 12, 5, 3), 4, "contiguous", dict(block_c=4, block_s=4, split=2, reduce_block=2)),  # C/G = 3
        ((2, 12, 5, 3), 4, "channels_last", dict(block_c=8, block_s=2, split=5)),
        ((1, 6, 7), 2, "nlc", dict(block_c=4, block_s=2, split=4)),
        ((3, 4, 2, 3, 2), 2, "channels_last_3d", dict(block_c=2, block_s=2, split=6)),
        ((1, 10, 13), 5, "contiguous", dict(block_c=1, block_s=4, split=3)),
    ],
    ids=str,
)
def test_split_reduction(shape, G, layout, tune):
    """The batch-1 path: statistics and gradient sums split over the spatial extent, then merged."""
    N, C, *spatial = shape
    S = int(np.prod(spatial))
    with gpu.tuning(path="split", **tune):
        plan = gpu._plan(N, C, S, G, layout != "contiguous", torch.device(DEVICE))
    assert plan["path"] == "split" and plan["nsb"] > 1, plan
    x = make(shape, torch.float32, layout, seed=5)
    w, b = params(C, torch.float32, "both")
    check_all(x, w, b, G, "gelu", run(x, w, b, G, "gelu", path="split", **tune), what=f"{shape} {layout} {tune}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mean", [1e4, 1e6])
def test_large_mean(mean, layout, path):
    """A large mean against a unit spread: xhat stays accurate (no sum/sum-of-squares cancellation)."""
    x = make((2, 8, 4, 5), torch.float32, layout, mean=mean, seed=6)
    # an outlier as each group's first element: a bad shift must not hurt either
    x[:, ::2, 0, 0] += 40.0
    out = run(x, None, None, 4, "none", **PATHS[path])
    y, stats = out[0], out[1]
    ey, _, _, _, emean, erstd = oracle(x, None, None, 4, "none", out[2])
    err = float((y.cpu().double() - ey).abs().max())
    assert err < 1e-4, f"normalized output error {err:.3g} at mean {mean:g}"
    # mean_hi + mean_lo carries the mean beyond float32 precision
    got_mean = stats[..., 0].cpu().double() + stats[..., 1].cpu().double()
    assert float((got_mean - emean).abs().max()) < 1e-5 * max(1.0, float(x.double().std()))
    assert float(((stats[..., 2].cpu().double() - erstd) / erstd).abs().max()) < 1e-5
    check_all(x, None, None, 4, "none", out, what=f"mean {mean:g}")


@pytest.mark.parametrize("path", list(PATHS))
def test_output_mask_and_missing_params(path):
    x = make((2, 8, 3, 3), torch.float32, "channels_last", seed=8)
    w, b = params(8, torch.float32, "both")
    y, stats = BACKEND.forward(x, w, b, 4, EPS, "relu")
    dy = torch.randn_like(x)
    with gpu.tuning(**PATHS[path]):
        full = BACKEND.backward(dy, x, w, b, stats, 4, "relu", (True, True, True))
        only_dx = BACKEND.backward(dy, x, w, b, stats, 4, "relu", (True, False, False))
        only_params = BACKEND.backward(dy, x, w, b, stats, 4, "relu", (False, True, True))
        nothing = BACKEND.backward(dy, x, w, b, stats, 4, "relu", (False, False, False))
    assert only_dx[1] is None and only_dx[2] is None and torch.equal(only_dx[0], full[0])
    assert only_params[0] is None and torch.equal(only_params[1], full[1]) and torch.equal(only_params[2], full[2])
    assert nothing == (None, None, None)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout, path):
    """Bitwise-identical results on repeat (fixed-order reductions, no atomics); x is left untouched."""
    x = make((2, 8, 3, 3), torch.bfloat16, layout, seed=9)
    x0 = x.clone()
    w, b = params(8, torch.float32, "both")
    dy = torch.empty_like(x).copy_(make((2, 8, 3, 3), torch.bfloat16, "contiguous", seed=10))
    first = run(x, w, b, 4, "silu", dy=dy, **PATHS[path])
    second = run(x, w, b, 4, "silu", dy=dy, **PATHS[path])
    for a, c, name in zip(first, second, ("y", "stats", "dy", "dx", "dweight", "dbias")):
        assert torch.equal(a, c), f"{name} differs between two identical calls"
    assert torch.equal(x, x0) and x.stride() == x0.stride()



@pytest.mark.parametrize("path", list(PATHS))
def test_relu_nonfinite_like_torch(path):
    """A NaN group and inf/NaN dy at zeroed ReLU outputs give torch's results: the NaN kept in y
    (compiled, tl.maximum(z, 0) would give 0 there) and ReLU's gradient a select, as torch's
    threshold_backward (dy * 0 would turn an inf dy into NaN)."""
    x, w, b, dy = (t.detach() for t in nonfinite_relu_case("channels_last"))
    rx, rw, rb = (t.clone().requires_grad_() for t in (x, w, b))
    ry = torch.relu(torch.nn.functional.group_norm(rx, 4, rw, rb, EPS))
    expected = (ry, *torch.autograd.grad(ry, (rx, rw, rb), dy))
    y, _, _, dx, dw, db = run(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 4, "relu", dy=dy.to(DEVICE), **PATHS[path])
    assert_like_torch_nonfinite((y, dx, dw, db), expected, path)

@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (2, 4, 1, 3), (1, 6, 3, 1), (2, 6, 1, 2, 1)], ids=str)
def test_size_one_dims_channels_last(shape):
    """Channels-last tensors with size-1 dims (ambiguous strides) are addressed correctly."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = make(shape, torch.float32, "contiguous", seed=14).contiguous(memory_format=fmt)
    w, b = params(shape[1], torch.float32, "both")
    for path in PATHS.values():
        check_all(x, w, b, 2, "silu", run(x, w, b, 2, "silu", **path), what=f"{shape} {x.stride()}")


def test_dy_in_other_layout():
    """dy in a layout different from x's is tolerated (the op normally matches them)."""
    x = make((2, 4, 3, 3), torch.float32, "channels_last", seed=11)
    w, b = params(4, torch.float32, "both")
    dy = make((2, 4, 3, 3), torch.float32, "contiguous", seed=12)
    out = run(x, w, b, 2, "none", dy=dy, path="split")
    check_all(x, w, b, 2, "none", out, what="mixed layouts")


@settings(max_examples=20, deadline=None)
@given(
    N=st.integers(1, 3),
    G=st.integers(1, 3),
    CG=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    act=st.sampled_from(ACTS),
    affine=st.sampled_from(["both", "none", "weight", "bias"]),
    path=st.sampled_from(["tile", "group", "split"]),
    block_c=st.sampled_from([1, 2, 4, 8]),
    block_s=st.sampled_from([1, 2, 4, 8]),
    split=st.integers(1, 4),
    reduce_block=st.sampled_from([1, 2, 1024]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(N, G, CG, spatial, channels_last, dtype, act, affine, path, block_c, block_s, split, reduce_block, seed):
    shape = (N, G * CG, *spatial)
    layout = "contiguous" if not (channels_last and spatial) else "nlc"
    x = make(shape, dtype, layout, mean=float(seed % 7) - 3.0, seed=seed)
    w, b = params(G * CG, dtype, affine, seed=seed + 1)
    tune = dict(path=path)
    if path != "tile":
        tune.update(block_c=block_c, block_s=block_s, split=split, reduce_block=reduce_block)
    check_all(x, w, b, G, act, run(x, w, b, G, act, **tune), what=f"{shape} {layout} {dtype} {act} {affine} {tune}")


# ----------------------------------------------------------------------------- the plan heuristics
def test_plan_paths_for_gpu_suite_shapes():
    """Plans for a 132-SM GPU (H100 SXM): which path each benchmark shape takes, and its tiles."""
    cpu = torch.device("cpu")
    with gpu.tuning(num_sms=132):
        # (1, 512, 256, 256), G=32: N x G = 32 groups cannot fill the GPU -> split reduction
        for cl in (False, True):
            p = gpu._plan(1, 512, 256 * 256, 32, cl, cpu)
            assert p["path"] == "split"
            programs = 1 * p["ncb"] * p["nsb"]
            assert p["nsb"] > 1 and programs >= 4 * 132, p
            assert p["s_per_prog"] * p["nsb"] >= 256 * 256 and p["s_per_prog"] % p["block_s"] == 0
            assert p["block_c"] * p["block_s"] <= 4096
            # the tile is long along the contiguous axis
            assert (p["block_c"] >= 64) if cl else (p["block_s"] >= 1024)
        # ResNet-50 at batch 32, late stage: small groups -> the whole group in registers
        assert gpu._plan(32, 2048, 49, 32, False, cpu)["path"] == "tile"
        # early stage: 8 x 3136 elements per group, 1024 groups -> one program per group, two
        # sweeps; 3136 positions get 128-wide tiles (2% padding) rather than 1024-wide (23%)
        for cl in (False, True):
            p = gpu._plan(32, 256, 56 * 56, 32, cl, cpu)
            assert p["path"] == "group" and p["block_c"] * p["block_s"] <= 4096, p
        assert gpu._plan(32, 256, 56 * 56, 32, False, cpu)["block_s"] == 128
        # ResNet at batch 2: 64 groups do not fill the GPU -> split
        assert gpu._plan(2, 256, 56 * 56, 32, False, cpu)["path"] == "split"
        # channels-last C = 320 (SD UNet), split: 64-channel tiles divide it, 128 would waste 1/6
        p = gpu._plan(2, 320, 64 * 64, 32, True, cpu)
        assert p["path"] == "split" and p["block_c"] == 64
        # 256 groups, under 2 per SM: split
        assert gpu._plan(4, 2048, 256, 64, False, cpu)["path"] == "split"
        # 64-channel groups of 100: one register tile forward; the backward's tile limit is half (4096)
        assert gpu._plan(32, 2048, 100, 32, False, cpu)["path"] == "tile"
        assert gpu._plan(32, 2048, 100, 32, False, cpu, "backward")["path"] == "group"
        with gpu.tuning(path="tile"):  # a forced tile path still sweeps a group too big for registers
            assert gpu._plan(1, 512, 256 * 256, 32, False, cpu)["path"] == "group"


def test_plan_overrides_restore():
    before = dict(gpu._OVERRIDES)
    with gpu.tuning(split=2, path="split"):
        assert gpu._OVERRIDES["split"] == 2
    assert gpu._OVERRIDES == before
    with pytest.raises(ValueError):
        with gpu.tuning(nonsense=1):
            pass


# ----------------------------------------------------------------------------- compiled for a real GPU
_AOT_SCRIPT = """
import torch
from groupnorm.backends import gpu
cases = [gpu.CHECK_CASES[0], gpu.CHECK_CASES[3], gpu.CHECK_CASES[5], gpu.CHECK_CASES[6],
         ((3, 64), 64, "contiguous", torch.float16, torch.float32, "relu"),   # C/G = 1, S = 1: ints specialized to 1
         ((1, 32, 4096), 32, "contiguous", torch.bfloat16, None, "gelu")]      # C/G = 1, split reduction
rows = gpu.compile_check(cases, arch=90, verbose=False)
print("KERNELS", len(rows), "MAXREGS", max(r[-2] for r in rows))
"""


def test_kernels_compile_for_sm90():
    """Every launch of some GPU-suite plans compiles ahead of time to an sm_90 cubin (no GPU needed).

    The interpreter does not type-check like the compiler (constexpr specialization of ints equal
    to 1, dtype promotion, loop-carried types); this catches what would fail only on a GPU.
    """
    import subprocess

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's CUDA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KERNELS" in proc.stdout


# ----------------------------------------------------------------------------- through the op
def test_group_norm_op_autograd():
    """groupnorm.group_norm(..., backend="triton") with autograd, against the reference backend."""
    groupnorm = pytest.importorskip("groupnorm")
    if backends.get("triton") is not BACKEND and backends.get("triton").available() is not None:
        pytest.skip(f"dispatch sees an unusable triton backend: {backends.get('triton').available()}")
    for layout, act in (("channels_last", "silu"), ("contiguous", "gelu"), ("strided", "relu")):
        if layout == "strided":  # not dense: the op makes it dense before the backend sees it
            x = make((2, 6, 3, 8), torch.float32, "channels_last", seed=13)[..., ::2]
        else:
            x = make((2, 6, 3, 4), torch.float32, layout, seed=13)
        w, b = params(6, torch.float32, "both")
        dy = torch.randn_like(x)
        grads = {}
        for name in ("triton", "reference"):
            dev = x.device if name == "triton" else "cpu"  # the NumPy reference runs CPU tensors only
            xs, ws, bs = (t.detach().to(dev).clone().requires_grad_(True) for t in (x, w, b))
            y = groupnorm.group_norm(xs, 3, ws, bs, EPS, activation=act, backend=name)
            assert groupnorm.last_backend() == name
            y.backward(dy.to(dev))
            grads[name] = (y.detach(), xs.grad, ws.grad, bs.grad)
        layout_of_x = torch.empty_like(x).stride()
        assert grads["triton"][0].stride() == layout_of_x and grads["triton"][1].stride() == layout_of_x
        for got, exp, what in zip(grads["triton"], grads["reference"], ("y", "dx", "dweight", "dbias")):
            check(got, exp, torch.float32, f"op {layout} {act} {what}")


def test_group_norm_op_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) over the op with backend="triton": same results as eager reference."""
    groupnorm = pytest.importorskip("groupnorm")
    backends.get("triton")  # loaded before tracing (importing a module inside a traced call breaks the graph)
    x = make((2, 8, 3, 4), torch.float32, "channels_last", seed=15)
    w, b = params(8, torch.float32, "both")
    f = lambda x, w, b: groupnorm.group_norm(x, 4, w, b, EPS, activation="silu", backend="triton")
    compiled = torch.compile(f, fullgraph=True)
    out = {}
    for name, fn in (("triton", compiled), ("reference", None)):
        dev = x.device if name == "triton" else "cpu"  # the NumPy reference runs CPU tensors only
        xs, ws, bs = (t.detach().to(dev).clone().requires_grad_(True) for t in (x, w, b))
        if fn is None:
            y = groupnorm.group_norm(xs, 4, ws, bs, EPS, activation="silu", backend="reference")
        else:
            y = fn(xs, ws, bs)
            assert groupnorm.last_backend() == "triton"
        (y * torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)).sum().backward()
        out[name] = (y.detach(), xs.grad, ws.grad, bs.grad)
    assert out["triton"][0].stride() == x.stride()
    for got, exp, what in zip(out["triton"], out["reference"], ("y", "dx", "dweight", "dbias")):
        check(got, exp, torch.float32, f"compiled {what}")


# ----------------------------------------------------------------------------- real GPU only
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,G,layout,dtype,act",
    [
        ((4, 64, 32, 32), 32, "contiguous", torch.float32, "none"),
        ((4, 64, 32, 32), 32, "channels_last", torch.float32, "none"),
        ((1, 512, 64, 64), 32, "contiguous", torch.bfloat16, "silu"),  # batch 1: split reduction
        ((1, 512, 64, 64), 32, "channels_last", torch.bfloat16, "silu"),
        ((2, 320, 24, 24), 32, "channels_last", torch.float16, "gelu"),
        ((2, 64, 4, 16, 16), 8, "channels_last_3d", torch.float32, "relu"),
    ],
    ids=str,
)
def test_cuda_against_torch(shape, G, layout, dtype, act):
    """Compiled kernels on CUDA: forward and gradients against torch.nn.functional.group_norm in float64."""
    import torch.nn.functional as F

    x = make(shape, dtype, layout, seed=21)
    w, b = params(shape[1], torch.float32 if dtype != torch.float32 else dtype, "both")
    dy = torch.randn_like(x)
    y, stats, _, dx, dw, db = run(x, w, b, G, act, dy=dy)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    z = F.group_norm(xd, G, wd, bd, EPS)
    ref = {"none": z, "relu": F.relu(z), "silu": F.silu(z), "gelu": F.gelu(z)}[act]
    ref.backward(dy.double())
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    check(y, ref.detach().cpu(), dtype, "y")
    check(dx, xd.grad.cpu(), dtype, "dx")
    check(dw, wd.grad.cpu(), dtype, "dweight")
    check(db, bd.grad.cpu(), dtype, "dbias")
    again = run(x, w, b, G, act, dy=dy)
    assert torch.equal(again[0], y) and torch.equal(again[3], dx) and torch.equal(again[4], dw)


@needs_gpu
def test_auto_chooses_per_dtype_on_cuda(monkeypatch):
    """"auto" decides once per (device type, dtype, activation): the Triton kernels for float32 CUDA
    input, composite for float64 (which they do not take), whichever dtype comes first."""
    from groupnorm import group_norm, last_backend

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(2, 8, 4, 4, device="cuda")
    for dtype, expected in ((torch.float64, "composite"), (torch.float32, "triton"), (torch.float64, "composite")):
        y = group_norm(x.to(dtype), 2)
        assert last_backend() == expected, dtype
        torch.testing.assert_close(y, torch.nn.functional.group_norm(x.to(dtype), 2))
