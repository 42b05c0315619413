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
from groupnorm import backends, functional, group_norm  # noqa: E402
from groupnorm.backends import native  # noqa: E402
from helpers import make_input, run_fresh  # noqa: E402

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
    ((1, 6, 1, 5), 3, "channels_last"),  # size-1 dims: their strides do not count for the layout
    ((2, 4, 5, 1), 2, "channels_last"),
    ((3, 4, 1, 1, 2), 2, "channels_last"),
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


def test_fast_lane_channels_last_with_an_odd_stride_on_a_size_one_dim(monkeypatch):
    """A size-1 dim may carry any stride; the layout check (C++ and Python alike) ignores it."""
    base = make_input((2, 6, 1, 5), layout="channels_last", seed=14).contiguous().flatten()
    x = base.as_strided((2, 6, 1, 5), (30, 1, 999, 6))
    dy = make_input((2, 6, 1, 5), layout="channels_last", seed=15)
    y1, g1 = _run(x.requires_grad_(), None, None, 3, "silu", dy, True, monkeypatch)
    y0, g0 = _run(x, None, None, 3, "silu", dy, False, monkeypatch)
    assert torch.equal(y1, y0) and torch.equal(g1[0], g0[0])
    torch.testing.assert_close(y1, torch.nn.functional.silu(torch.nn.functional.group_norm(x.detach(), 3)))


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


def _front_ready():
    """Load the library and both kernel dtypes, so that group_norm's C++ front takes plain calls."""
    if os.environ.get(native.ENV_SWITCH, "").strip() == "0":
        pytest.skip(f"{native.ENV_SWITCH}=0 turns the fast lane off")
    for dtype in (torch.float32, torch.float64):
        group_norm(torch.randn(2, 4, 3, dtype=dtype), 2)
    assert native.status() is None and native.front is not None


def _python_checks_must_not_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the checked Python path ran: the C++ front declined a plain call")

    monkeypatch.setattr(functional, "check_inputs", fail)


@pytest.mark.parametrize("dtype,pdtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, torch.float32),
                                          (torch.float16, None)])
@pytest.mark.parametrize("act", [None, "none", "relu", "silu", "gelu"])
def test_front_takes_plain_calls_and_matches_the_python_path(dtype, pdtype, act, monkeypatch):
    """Plain calls (and GroupNorm layers) skip the Python argument checks and give bitwise the
    Python path's forward and gradients."""
    _front_ready()
    x = make_input((2, 8, 4, 5), dtype, "channels_last", seed=21).requires_grad_()
    g = torch.Generator().manual_seed(22)
    w = torch.randn(8, generator=g).to(pdtype or dtype).requires_grad_()
    b = torch.randn(8, generator=g).to(pdtype or dtype).requires_grad_()
    dy = make_input((2, 8, 4, 5), dtype, "channels_last", seed=23)
    y0, g0 = _run(x, w, b, 4, act, dy, False, monkeypatch)
    _python_checks_must_not_run(monkeypatch)
    y1, g1 = _run(x, w, b, 4, act, dy, True, monkeypatch)
    assert torch.equal(y1, y0) and y1.stride() == y0.stride()
    assert all(torch.equal(a, e) for a, e in zip(g1, g0))
    layer = groupnorm.GroupNorm(4, 8, activation=act).to(pdtype or dtype)
    assert torch.equal(layer(x.detach()), group_norm(x.detach(), 4, layer.weight, layer.bias, activation=act))


_X = torch.randn(2, 4, 3)
BAD_CALLS = {
    "integer input": lambda: ((torch.ones(2, 4, 3, dtype=torch.int64), 2), {}),
    "1-D input": lambda: ((torch.randn(4), 2), {}),
    "groups do not divide C": lambda: ((_X, 3), {}),
    "zero groups": lambda: ((_X, 0), {}),
    "more groups than channels": lambda: ((_X, 8), {}),
    "float num_groups": lambda: ((_X, 2.0), {}),
    "num_groups beyond int64": lambda: ((_X, 2**70), {}),
    "negative num_groups beyond int64": lambda: ((_X, -(2**70)), {}),
    "bool num_groups": lambda: ((_X, True), {}),
    "zero eps": lambda: ((_X, 2, None, None, 0.0), {}),
    "negative eps": lambda: ((_X, 2, None, None, -1e-5), {}),
    "nan eps": lambda: ((_X, 2, None, None, float("nan")), {}),
    "inf eps": lambda: ((_X, 2, None, None, float("inf")), {}),
    "weight of 3": lambda: ((_X, 2, torch.ones(3)), {}),
    "2-D weight": lambda: ((_X, 2, torch.ones(1, 4)), {}),
    "float64 weight": lambda: ((_X, 2, torch.ones(4, dtype=torch.float64)), {}),
    "float16 weight, bfloat16 input": lambda: ((_X.bfloat16(), 2, torch.ones(4, dtype=torch.float16)), {}),
    "meta weight": lambda: ((_X, 2, torch.ones(4, device="meta")), {}),
    "list weight": lambda: ((_X, 2, [1.0, 1.0, 1.0, 1.0]), {}),
    "bias of 5": lambda: ((_X, 2, None, torch.zeros(5)), {}),
    "unknown activation": lambda: ((_X, 2), {"activation": "tanh"}),
    "activation in capitals": lambda: ((_X, 2), {"activation": "SiLU"}),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_front_declines_bad_calls_with_the_python_paths_error(name, monkeypatch):
    """The C++ front declines whatever the Python checks reject, so the error is the same one."""
    _front_ready()
    args, kwargs = BAD_CALLS[name]()
    with pytest.raises(Exception) as on:
        group_norm(*args, **kwargs)
    monkeypatch.setattr(native, "enabled", False)
    with pytest.raises(Exception) as off:
        group_norm(*args, **kwargs)
    assert type(on.value) is type(off.value) and str(on.value) == str(off.value)
    assert isinstance(on.value, (TypeError, ValueError)), repr(on.value)


def test_front_respects_every_way_of_forcing_a_path(monkeypatch):
    _front_ready()
    x = make_input((2, 8, 3, 3), seed=24).requires_grad_()
    group_norm(x, 4)
    assert groupnorm.last_backend() == "numba"
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    group_norm(x, 4)
    assert groupnorm.last_backend() == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert "GroupNormFunction" in group_norm(x, 4).grad_fn.name()
    monkeypatch.delenv(backends.ENV_VAR)
    with groupnorm.use_backend("composite"):
        group_norm(x, 4)
        assert groupnorm.last_backend() == "composite"
        with groupnorm.use_backend("auto"):
            assert "GroupNormFunction" in group_norm(x, 4).grad_fn.name()
    from groupnorm.backends import cpu

    monkeypatch.setattr(cpu, "split_mode", "split")
    assert "GroupNormFunction" not in group_norm(x, 4).grad_fn.name()
    monkeypatch.setattr(cpu, "split_mode", "auto")
    monkeypatch.setattr(native, "enabled", False)
    assert "GroupNormFunction" not in group_norm(x, 4).grad_fn.name()


def test_layer_goes_straight_to_the_front_and_keeps_its_own_errors(monkeypatch):
    """GroupNorm.forward hands plain tensors to group_norm and so to the C++ front (no Python checks,
    no _layer_group_norm), bitwise what the Python path gives; a wrong channel count still gets the
    layer's message, with and without affine parameters."""
    from groupnorm import layers

    _front_ready()
    x = make_input((2, 8, 4, 5), seed=25)
    for affine in (True, False):
        layer = groupnorm.GroupNorm(4, 8, affine=affine, activation="silu")
        monkeypatch.setattr(native, "enabled", False)
        expected = layer(x)
        monkeypatch.setattr(native, "enabled", True)
        with monkeypatch.context() as m:
            _python_checks_must_not_run(m)
            m.setattr(layers, "_layer_group_norm", lambda *a: pytest.fail("the layer took the checked path"))
            assert torch.equal(layer(x), expected)
        for bad in (torch.randn(2, 6, 4), torch.randn(8), torch.randn(2, 16, 3)):
            with pytest.raises(ValueError, match="GroupNorm\\(num_channels=8\\) got an input with|at least 2 dimensions"):
                layer(bad)
    # a call the front declines (float64 parameters, float32 input) is offered to it once, then checked
    offers = []
    real_front = native.front
    monkeypatch.setattr(native, "front", lambda *a: offers.append(1) or real_front(*a))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        groupnorm.GroupNorm(4, 8).double()(x)
    assert offers == [1]


def test_use_backend_in_another_thread_forces_only_that_thread():
    """forced() skips the per-thread lookup while no use_backend() context is open anywhere; one
    open in another thread must force that thread only, and the count returns to zero after an
    exception leaves a context."""
    _front_ready()
    x = make_input((2, 8, 3, 3), seed=26)
    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        with groupnorm.use_backend("composite"):
            inside.set()
            release.wait(10)
            group_norm(x, 4)
            seen.append(groupnorm.last_backend())

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    assert backends._contexts == 1 and not backends.forced()
    group_norm(x, 4)
    assert groupnorm.last_backend() == "numba"
    release.set()
    t.join()
    assert seen == ["composite"] and backends._contexts == 0
    with pytest.raises(KeyError):
        with groupnorm.use_backend("reference"):
            assert backends.forced()
            raise KeyError("leaves the context")
    assert backends._contexts == 0 and not backends.forced()


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")  # the checks must not warn while tracing
def test_jit_trace_of_a_model_with_groupnorm(monkeypatch):
    """While tracing, group_norm records the registered op groupnorm::forward (not the C++ front, not
    the fast lane's op, which checks nothing: traced graphs get inputs group_norm() never saw)."""
    _front_ready()
    torch.manual_seed(25)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), groupnorm.GroupNorm(4, 8, activation="silu"))
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), model(x))
    x2 = torch.randn(3, 3, 10, 10).to(memory_format=torch.channels_last)
    torch.testing.assert_close(traced(x2), model(x2))


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
    assert f"$GROUPNORM_CACHE={tmp_path}" in reason, reason  # where the build folder came from
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


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")  # the checks must not warn while tracing
def test_a_traced_layer_checks_new_inputs_and_loads_in_a_fresh_process(tmp_path):
    """Found in review: the traced graph used to hold the fast lane's unchecked op, so an empty or
    wrong-sized input crashed the process (SIGFPE/SIGSEGV) or read out of bounds, and a saved
    trace did not load in a new process."""
    torch.manual_seed(26)
    layer = groupnorm.GroupNorm(4, 8, activation="silu")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    traced = torch.jit.trace(layer, torch.randn(2, 8, 3))
    assert "groupnorm::forward" in str(traced.graph) and "groupnorm_native" not in str(traced.graph)
    for x in (torch.randn(5, 8, 7), torch.randn(3, 8, 4, 4).double().float(), torch.randn(0, 8, 3), torch.randn(2, 8, 0)):
        ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, layer.weight, layer.bias))
        torch.testing.assert_close(traced(x), ref)
    for bad, match in [(torch.randn(2, 16, 3), r"weight must have shape \(16,\)"),
                       (torch.randn(2, 2, 3), "num_groups must be in"),
                       (torch.ones(2, 8, 3, dtype=torch.int32), "supports float16")]:
        with pytest.raises(RuntimeError, match=match):
            traced(bad)
    x = torch.randn(4, 8, 5, requires_grad=True)
    traced(x).sum().backward()
    layer.zero_grad()
    x2 = x.detach().requires_grad_()
    layer(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    code = (
        "import torch, groupnorm\n"
        f"m = torch.jit.load({str(path)!r})\n"
        "x = torch.randn(3, 8, 6, dtype=torch.float64)\n"
        "ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, m.weight.double(), m.bias.double()))\n"
        "torch.testing.assert_close(m.double()(x), ref)\n"
        "print('LOADED')\n"
    )
    run_fresh(code, "LOADED")


def test_a_forked_child_runs_after_the_parent_used_the_kernels():
    """numba's OpenMP layer terminates a forked process that uses its pool ("fork() called from a
    process already using GNU OpenMP"): DataLoader workers that apply a GroupNorm died. The child
    now turns the numba backend off and runs the composite one."""
    code = (
        "import torch, groupnorm\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "norm = groupnorm.GroupNorm(4, 8)\n"
        "x = torch.randn(2, 8, 16, 16)\n"
        "with torch.no_grad():\n"
        "    y = norm(x)\n"
        "assert groupnorm.last_backend() == 'numba'\n"
        "class D(Dataset):\n"
        "    def __len__(self): return 3\n"
        "    def __getitem__(self, i):\n"
        "        with torch.no_grad():\n"
        "            return norm(x[:1]), groupnorm.last_backend(), groupnorm.available_backends()['numba']\n"
        "out = list(DataLoader(D(), num_workers=1, batch_size=None, multiprocessing_context='fork'))\n"
        "for z, name, why in out:\n"
        "    torch.testing.assert_close(z, y[:1])\n"
        "    assert name == 'composite' and 'forked' in why, (name, why)\n"
        "with torch.no_grad():\n"
        "    norm(x)\n"
        "assert groupnorm.last_backend() == 'numba'  # the parent keeps its kernels\n"
        "print('FORK OK')\n"
    )
    run_fresh(code, "FORK OK")


def test_entry_points_are_compiled_into_numbas_cache():
    """The C entry points link the kernels in (seconds per dtype); they must be cacheable (no ctypes
    addresses inside) so that the next process loads them instead of compiling again. Their module
    is named by a hash of cpu.py, so a changed kernel never meets a stale cached entry point."""
    if os.environ.get(native.ENV_SWITCH, "").strip() == "0":
        pytest.skip(f"{native.ENV_SWITCH}=0 turns the fast lane off")
    if os.environ.get("NUMBA_CACHE_DIR"):
        pytest.skip("NUMBA_CACHE_DIR moves numba's cache away from the generated module")
    group_norm(torch.randn(2, 4, 3), 2)
    assert native.status() is None
    path = native.entry_module_path(torch.float32)
    assert path.exists()
    index = {p.name.split(".")[1].split("-")[0] for p in (path.parent / "__pycache__").glob(f"{path.stem}.*.nbi")}
    assert index == {"forward", "backward"}, index
