"""The numba backend's compiled fast lane (groupnorm.backends.native) against its Python path.

Both run the same numba kernels with the same work plan, so forward outputs and all three
gradients must be bitwise equal, in every layout, dtype, activation and parameter combination;
the Python path itself is checked against the NumPy oracle in test_backend_numba/test_functional.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("numba")

import groupnorm  # noqa: E402
from groupnorm import group_norm  # noqa: E402
from groupnorm.backends import native  # noqa: E402
from helpers import make_input  # noqa: E402

ACTS = ("none", "relu", "silu", "gelu")


def test_fast_lane_is_built_and_active():
    """`make setup` builds the library; without it every call would silently take the slow path."""
    if os.environ.get(native.ENV_SWITCH, "").strip() == "0":
        pytest.skip(f"{native.ENV_SWITCH}=0 turns the fast lane off")
    assert native.status() is None, native.status()
    assert native.library_path().exists()


def _run(x, w, b, G, act, dy, fast: bool, monkeypatch):
    monkeypatch.setattr(native, "enabled", fast)
    xs = x.clone().requires_grad_(x.requires_grad)
    ws = None if w is None else w.clone().requires_grad_(w.requires_grad)
    bs = None if b is None else b.clone().requires_grad_(b.requires_grad)
    y = group_norm(xs, G, ws, bs, activation=act)
    assert groupnorm.last_backend() == "numba"
    if y.grad_fn is not None:  # the C++ autograd node, or the Python path's autograd.Function
        assert ("GroupNormFunction" in y.grad_fn.name()) == fast, y.grad_fn.name()
    wanted = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy) if wanted else ()
    return y, grads


# (shape, G, layout): batch-1 shapes take the split-reduction plan on two threads
CASES = [
    ((2, 6, 5, 7), 3, "contiguous"),
    ((2, 6, 5, 7), 3, "channels_last"),
    ((2, 8, 3, 4, 5), 4, "channels_last"),
    ((3, 4, 9), 2, "contiguous"),
    ((5, 6), 2, "contiguous"),
    ((1, 6, 128, 128), 3, "contiguous"),
    ((1, 16, 64, 64), 4, "channels_last"),
]


@pytest.mark.parametrize("shape,G,layout", CASES)
@pytest.mark.parametrize("act", ACTS)
def test_fast_lane_is_bitwise_the_python_path(shape, G, layout, act, monkeypatch):
    x = make_input(shape, torch.float32, layout, seed=1).requires_grad_()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape[1], generator=g).requires_grad_()
    b = torch.randn(shape[1], generator=g).requires_grad_()
    dy = make_input(shape, torch.float32, layout, seed=3)
    y1, g1 = _run(x, w, b, G, act, dy, True, monkeypatch)
    y0, g0 = _run(x, w, b, G, act, dy, False, monkeypatch)
    assert torch.equal(y1, y0) and y1.stride() == y0.stride() == x.stride()
    for a, e in zip(g1, g0):
        assert torch.equal(a, e) and a.stride() == e.stride()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", ["both", "weight", "bias", "none", "frozen"])
def test_fast_lane_dtypes_and_parameters(dtype, params, monkeypatch):
    """Every combination of given / requiring-grad parameters (needs_input_grad counts only given ones)."""
    x = make_input((2, 8, 4, 3), dtype, "channels_last", seed=4).requires_grad_()
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, generator=g).to(pdt) if params in ("both", "weight", "frozen") else None
    b = torch.randn(8, generator=g).to(pdt) if params in ("both", "bias", "frozen") else None
    for p in (w, b):
        if p is not None and params != "frozen":
            p.requires_grad_()
    dy = make_input((2, 8, 4, 3), dtype, "channels_last", seed=6)
    y1, g1 = _run(x, w, b, 4, "silu", dy, True, monkeypatch)
    y0, g0 = _run(x, w, b, 4, "silu", dy, False, monkeypatch)
    assert y1.dtype == dtype and torch.equal(y1, y0)
    assert len(g1) == len(g0) == 1 + sum(p is not None and p.requires_grad for p in (w, b))
    for a, e in zip(g1, g0):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_fast_lane_only_parameters_need_grad(monkeypatch):
    x = make_input((2, 8, 5), seed=7)  # no grad for x: dx is not asked for
    w = torch.randn(8).requires_grad_()
    b = torch.randn(8).requires_grad_()
    dy = make_input((2, 8, 5), seed=8)
    y1, g1 = _run(x, w, b, 2, "gelu", dy, True, monkeypatch)
    y0, g0 = _run(x, w, b, 2, "gelu", dy, False, monkeypatch)
    assert torch.equal(y1, y0) and all(torch.equal(a, e) for a, e in zip(g1, g0))


def test_fast_lane_strided_input_and_broadcast_grad(monkeypatch):
    """A non-dense input is made contiguous; y.sum().backward() sends an expanded (stride 0) grad."""
    base = make_input((2, 8, 6, 10), seed=9)
    x = base[:, :, :, ::2]
    assert not x.is_contiguous() and not x.movedim(1, -1).is_contiguous()
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(native, "enabled", fast)
        xv = base.clone().requires_grad_()
        y = group_norm(xv[:, :, :, ::2], 4, activation="relu")
        assert y.stride() == torch.empty_like(x).stride()
        y.sum().backward()
        out[fast] = (y.detach(), xv.grad)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])


def test_fast_lane_no_grad_and_inplace_after_forward():
    x = make_input((2, 8, 3, 3), seed=10)
    with torch.no_grad():
        y = group_norm(x, 4)
    assert not y.requires_grad and groupnorm.last_backend() == "numba"
    xr = x.clone().requires_grad_()
    h = xr * 1.0
    y = group_norm(h, 4)
    h.add_(1.0)  # the saved input changed: autograd must refuse, as it does for torch's ops
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_fast_lane_double_backward():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    assert native.status() is None or os.environ.get(native.ENV_SWITCH) == "0"
    assert torch.autograd.gradgradcheck(lambda x, w, b: group_norm(x, 2, w, b, activation="silu"), (x, w, b))


def test_fast_lane_from_other_threads():
    x = make_input((2, 16, 8, 8), seed=12)
    expected = group_norm(x, 4, activation="silu")
    results, errors = [], []

    def work():
        try:
            xs = x.clone().requires_grad_()
            y = group_norm(xs, 4, activation="silu")
            y.sum().backward()
            results.append((y.detach(), xs.grad))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and all(torch.equal(y, expected) for y, _ in results)
    assert all(torch.equal(gx, results[0][1]) for _, gx in results)


def test_forced_backends_skip_the_fast_lane():
    x = make_input((2, 8, 3, 3), seed=13)
    group_norm(x, 4, backend="composite")
    assert groupnorm.last_backend() == "composite"
    with groupnorm.use_backend("reference"):
        group_norm(x, 4)
    assert groupnorm.last_backend() == "reference"


def test_without_a_compiler_the_python_path_runs_and_status_says_why(tmp_path):
    """No library in the cache and no compiler: a one-line reason, and results all the same."""
    code = (
        "import torch, torch.nn.functional as F, groupnorm\n"
        "from groupnorm.backends import native\n"
        "x = torch.randn(2, 8, 5, 5)\n"
        "torch.testing.assert_close(groupnorm.group_norm(x, 4), F.group_norm(x, 4))\n"
        "print('REASON', native.status())\n"
    )
    env = {**os.environ, "GROUPNORM_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    env.pop(native.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reason = done.stdout.split("REASON", 1)[1].strip()
    assert "no-such-compiler" in reason, reason
    assert "native fast lane off" in done.stderr and "compiling the native fast path" in done.stderr
    assert not list(tmp_path.glob("*.so")) and len(list(tmp_path.glob("*.failed"))) == 1
    # the next process reads the note instead of trying (and failing) to build again
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "compiling the native fast path" not in again.stderr
    assert "earlier build failed" in again.stdout.split("REASON", 1)[1]
    # the explicit build command retries, and fails with the fix in its message
    cmd = subprocess.run([sys.executable, "-m", "groupnorm.backends.native"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert cmd.returncode != 0 and "install g++" in cmd.stderr, cmd.stderr[-2000:]
