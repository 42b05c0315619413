"""Spot measurements quoted in BENCHMARKS.md (sessions 3 and 4) that `groupnorm bench` does not make.

    python scripts/spot_checks.py silu                     # the float32 SiLU loop, 1M elements, one thread
    python scripts/spot_checks.py large-mean               # ATen vs groupnorm error at a large mean (float32)
    python scripts/spot_checks.py paths 32 1024 14 14      # fwd+bwd: fast lane vs Python path vs torch

silu: medians of 20 calls of a jitted loop over ``cpu._silu`` (the fused activation of the numba
kernels); run it from two checkouts (e.g. a ``git worktree``) with ``PYTHONPATH=<that checkout>`` to
compare versions (without it, ``import groupnorm`` finds the installed, editable checkout).
large-mean: max |error| against float64 of torch.nn.functional.group_norm and groupnorm.group_norm on
float32 input of mean 1e3/1e4/1e5 and std 0.1, both layouts, G = 8.
paths: one layer's forward+backward through the compiled fast lane, the Python path and
torch.nn.GroupNorm, alternated in an order shuffled every round; medians in ms and minor page
faults per call (run it once plainly and once with MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=17179869184 to see what fresh-page faults cost).

Session 4 additions:

    python scripts/spot_checks.py kernel-ab --old /path/to/older/checkout bwd 8x2048x7x7 2x2048x7x7
    python scripts/spot_checks.py activation-error [--old /path/to/older/checkout]   # float32 SiLU/GELU error
    python scripts/spot_checks.py stats-accuracy [--old /path/to/older/checkout]     # float32 forward vs float64
    python scripts/spot_checks.py neighbour-bias 8 2048 7 7   # one call timed in a rotated vs a shuffled order
    python scripts/spot_checks.py geomeans DIR [DIR ...]      # torch/ours geomeans per pass from bench.json files
    python scripts/spot_checks.py openmp-runtimes             # which OpenMP libraries the process holds

Session 6 additions:

    python scripts/spot_checks.py engine-cost   # autograd.grad of x * 2 vs both GroupNorms' backward, tiny input
    python scripts/spot_checks.py cl-blocks     # channels-last forward: per sample vs per L2-sized channel block
    python scripts/spot_checks.py startup       # three fresh processes: import, first float32 and float64 call
    python scripts/spot_checks.py forward-floor        # our forward kernel vs a copy, 32x256x56x56, in-process
    python scripts/spot_checks.py nt-store             # plain vs non-temporal stores over 98 MiB
    python scripts/spot_checks.py train-profile        # norm + ReLU vs convolution time in the bench's channels-last ResNet step

Session 7 additions:

    python scripts/spot_checks.py bitwise-ab --old /path/to/older/checkout   # old vs new kernels, bit for bit
    python scripts/spot_checks.py huge-values    # forward/backward error at std 1e18..1e30, float32

bitwise-ab: the numba forward and backward kernels (contiguous and channels-last) of this checkout and
of an older one on 168 cases (float32/float64 x 7 shapes x chunking 0/1/3 x none/relu/silu/gelu), and
whether outputs, statistics and gradients agree bit for bit.
Session 8 additions:

    python scripts/spot_checks.py exp-poly [--old /path/to/older/checkout]   # the float32 exp's fit, error, SiLU speed
    python scripts/spot_checks.py kernel-ab --act silu --old /path/to/older/checkout fwd 1x512x64x64

Session 9 additions:

    python scripts/spot_checks.py kernel-ab --layout channels_last --groups 8 --old /path/to/older/checkout fwd 2x128x16x16x16
    python scripts/spot_checks.py cl-rows       # channels-last statistics: a loop per row vs R rows per loop vs a copy
    python scripts/spot_checks.py torch-segv    # torch 2.13's crash (channels-last, weight gradient alone) vs ours
    python scripts/spot_checks.py ddp-exit 20   # torchrun runs failing at exit: destroy_process_group alone vs Dist.leave

Session 10 addition:

    python scripts/spot_checks.py cold-bwd --groups 8 1x64x32x32x32   # backward with the caches flushed, none vs ReLU

Session 12 addition:

    python scripts/spot_checks.py compile-times [--old /path/to/older/checkout]   # first-call JIT compile, nothing cached
    python scripts/spot_checks.py refcounts      # NRT_incref calls numba left per kernel helper (uncached compile, minutes)

huge-values: max relative error against float64 of y and dx (float32 input of std 1e18..1e30, G = 4)
for the numba and composite backends and torch.nn.functional.group_norm, both layouts.

kernel-ab: the contiguous numba kernels (fwd or bwd, float32, G = 32 or --groups, with --act fused, none by default;
--layout channels_last for the channels-last ones, since session 9) of this checkout
and of an older one (its cpu.py loaded under another module name), and ATen's (with torch's activation
op beside it when --act is given), called directly, timed as `groupnorm bench` times (shuffled rounds, 12 of them), every call allocating its outputs as ATen's
does; prints both ratios and whether old and new agree bitwise. --lane calls both through cfuncs over
carray views, as the eager fast lane's entry points do (the dispatcher's arrays carry numba's memory info,
and every helper call that keeps a reference to one makes atomic operations on it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numba
from numba.core import types
import numpy as np
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import bench
from groupnorm.backends import cpu


def silu() -> None:
    @numba.njit(error_model="numpy")
    def loop(x, y):
        k = cpu._consts(x)
        for i in range(x.shape[0]):
            y[i] = cpu._silu(x[i], k)

    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    y = np.empty_like(x)
    loop(x, y)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        loop(x, y)
        times.append(time.perf_counter() - t)
    print(f"SiLU over {x.size} float32, one thread: median {statistics.median(times) * 1e3:.3f} ms")


def large_mean() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 32, 4, 4), (2, 64, 16, 16), (2, 512, 7, 7)]:
        for mean in (1e3, 1e4, 1e5):
            x = torch.randn(shape, dtype=torch.float64, generator=g) * 0.1 + mean
            exact = F.group_norm(x, 8, eps=1e-5)
            for layout in ("contiguous", "channels_last"):
                xf = x.float() if layout == "contiguous" else x.float().to(memory_format=torch.channels_last)
                aten = float((F.group_norm(xf, 8, eps=1e-5).double() - exact).abs().max())
                ours = float((groupnorm.group_norm(xf, 8).double() - exact).abs().max())
                print(f"{str(shape):16s} mean {mean:7.0e} {layout:13s} max error: torch {aten:.2e}, groupnorm {ours:.2e}")


def paths(shape: tuple, threads: int, rounds: int) -> None:
    from groupnorm.backends import native  # not in older checkouts: silu/large-mean run there too

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    ours, ref = groupnorm.GroupNorm(32, shape[1]), torch.nn.GroupNorm(32, shape[1])

    def run(layer, lane):
        def f():
            native.enabled = lane
            torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], dy)
        return f

    variants = {"fast lane": run(ours, True), "Python path": run(ours, False), "torch": run(ref, True)}
    faults = {}
    t = time_interleaved(variants, rounds, min_sample_s=0.0, faults=faults)  # one call per sample
    native.enabled = True
    print(f"{shape}, {threads} thread(s), fwd+bwd medians of {rounds}: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms ({faults[k]:.0f} faults)" for k, v in t.items()))


def time_interleaved(cases: dict, rounds: int, min_sample_s: float = 2e-3, faults: dict | None = None) -> dict:
    """Seconds per call: `groupnorm bench`'s timing (round-robin, order shuffled every round,
    median over rounds; calls repeated within a sample to last min_sample_s), exactly ``rounds`` rounds."""
    return bench.time_interleaved(cases, bench.Timer("cpu"), rounds, 2, min_sample_s=min_sample_s, budget_s=0.0,
                                  faults=faults)


def _load_old_cpu(old_root: str, vector_bytes: int | None = None):
    """An older checkout's groupnorm/backends/cpu.py as a module of its own name, with that
    checkout's simd.py (when it has one) as a module of its own too, so that the two sides of an
    A/B run differ in both; vector_bytes (kernel-ab --old-vector-bytes) sets the old side's SIMD
    width in place of the one its simd.py picks for this CPU."""
    import importlib.util
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    def load(name, src, text=None):
        # a copy in a fresh directory: numba's on-disk cache (kept next to the file) pickles the
        # module name, so the old checkout's own cache must not be read under another name
        path = Path(tempfile.mkdtemp()) / f"{name}.py"
        if text is None:
            shutil.copy(src, path)
        else:
            path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    backends = Path(old_root) / "groupnorm" / "backends"
    text = (backends / "cpu.py").read_text()
    if (backends / "simd.py").exists():
        simd = load("groupnorm_old_simd", backends / "simd.py")
        if vector_bytes:
            simd.VECTOR_BYTES = vector_bytes  # read when a vector type is made, i.e. at compile time
        text = text.replace("from groupnorm.backends.simd import", "from groupnorm_old_simd import")
    elif vector_bytes:
        raise SystemExit(f"--old-vector-bytes: {old_root} has no groupnorm/backends/simd.py")
    return load("groupnorm_old_cpu", backends / "cpu.py", text)


def _lane_kernel(mod, name: str):
    """mod's kernel ``name`` behind a numba cfunc that makes its arrays with carray from pointers, as
    the eager fast lane's entry points do (groupnorm/backends/native.py): arrays without numba's
    memory info, so the reference counts numba keeps on array arguments cost no atomic operation.
    Returns a function of the same arguments as the kernel (NumPy arrays, then the integers)."""
    import ctypes

    from numba import carray, cfunc

    kernel = getattr(mod, name)
    P, i64, f64 = types.CPointer(types.float32), types.int64, types.float64
    if name.startswith("_forward"):
        @cfunc(types.void(P, P, P, P, P, i64, i64, i64, i64, f64, i64, i64), error_model="numpy")
        def entry(xp, yp, wp, bp, sp, N, C, S, G, eps, act, nch):
            n = N * C * S
            kernel(carray(xp, (n,)), carray(yp, (n,)), carray(wp, (C,)), carray(bp, (C,)), carray(sp, (N * G * 3,)),
                   N, C, S, G, eps, act, nch)

        V, I = ctypes.c_void_p, ctypes.c_int64
        fn = ctypes.CFUNCTYPE(None, V, V, V, V, V, I, I, I, I, ctypes.c_double, I, I)(entry.address)
        arrays = 5
    else:
        @cfunc(types.void(P, P, P, P, P, P, P, P, i64, i64, i64, i64, i64, i64), error_model="numpy")
        def entry(dyp, xp, dxp, dwp, dbp, wp, bp, sp, N, C, S, G, act, nch):
            n = N * C * S
            kernel(carray(dyp, (n,)), carray(xp, (n,)), carray(dxp, (n,)), carray(dwp, (C,)), carray(dbp, (C,)),
                   carray(wp, (C,)), carray(bp, (C,)), carray(sp, (N * G * 3,)), N, C, S, G, act, nch)

        V, I = ctypes.c_void_p, ctypes.c_int64
        fn = ctypes.CFUNCTYPE(None, V, V, V, V, V, V, V, V, I, I, I, I, I, I)(entry.address)
        arrays = 8

    def call(*args):
        fn(*(a.ctypes.data for a in args[:arrays]), *args[arrays:])

    call.entry = entry  # keeps the compiled code alive
    return call


def kernel_ab(old_root: str, which: str, shapes: list, threads: int, act: str = "none", layout: str = "contiguous",
              groups: int = 32, old_vector_bytes: int | None = None, lane: bool = False) -> None:
    old = _load_old_cpu(old_root, old_vector_bytes)
    fwd_k, bwd_k = ("_forward_cl", "_backward_cl") if layout == "channels_last" else ("_forward_nc", "_backward_nc")
    if lane:  # the kernels call the threading layer's get_thread_id: a cfunc linking them from the
        # cache before the layer is up fails with "Symbol not found" (the fast lane does the same)
        from numba.np.ufunc import parallel

        parallel._launch_threads()
    kernels = {}
    for key, mod in (("old", old), ("new", cpu)):
        kernels[key] = {k: (_lane_kernel(mod, k) if lane else getattr(mod, k)) for k in (fwd_k, bwd_k)}
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    cl = layout == "channels_last"
    for shape in shapes:
        N, C, G = shape[0], shape[1], groups
        S = int(np.prod(shape[2:]))
        xt, dyt = torch.randn(shape) * 3 + 2, torch.randn(shape)
        if cl:  # (N, C, *) views of channels-last storage, as a channels_last(_3d) tensor holds it
            xt, dyt = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (xt, dyt))
        wt, bt = torch.randn(C), torch.randn(C)
        _, mean, rstd = torch.ops.aten.native_group_norm(xt, wt, bt, N, C, S, G, 1e-5)
        x, dy, w, b = cpu._flat(xt), cpu._flat(dyt), wt.numpy(), bt.numpy()
        code = groupnorm.backends.ACT_CODES.get(act, 0)
        st = np.empty(N * G * 3, np.float32)
        nch = cpu._plan(N, C, S, G, cl, threads)[1]
        getattr(cpu, fwd_k)(x, np.empty_like(x), w, b, st, N, C, S, G, 1e-5, 0, nch)
        out = {}

        def mk(mod, key):
            # outputs allocated on every call, as ATen's are (until session 7 ours reused one
            # cache-warm buffer, which favoured them against ATen; old against new was fair)
            if which == "bwd":
                def call():
                    dx, dw, db = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
                    kernels[mod][bwd_k](dy, x, dx, dw, db, w, b, st, N, C, S, G, code, nch)
                    out[key] = (dx, dw, db)
                return call

            def call():
                y, s2 = np.empty_like(x), np.empty_like(st)
                kernels[mod][fwd_k](x, y, w, b, s2, N, C, S, G, 1e-5, code, nch)
                out[key] = (y, s2)
            return call

        cases = {"old": mk("old", "old"), "new": mk("new", "new")}
        if act != "none":  # ATen has no fused activation: its op and torch's activation op, both ways
            fn = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu}[act]
            z = torch.ops.aten.native_group_norm(xt, wt, bt, N, C, S, G, 1e-5)[0]
            rz = torch.relu(z)  # autograd saves ReLU's output: not recomputed per call
            act_bwd = {"relu": lambda: torch.ops.aten.threshold_backward(dyt, rz, 0),
                       "silu": lambda: torch.ops.aten.silu_backward(dyt, z),
                       "gelu": lambda: torch.ops.aten.gelu_backward(dyt, z)}[act]
            cases["aten"] = (lambda: fn(torch.ops.aten.native_group_norm(xt, wt, bt, N, C, S, G, 1e-5)[0])) if which == "fwd" \
                else (lambda: torch.ops.aten.native_group_norm_backward(act_bwd(), xt, mean, rstd, wt, N, C, S, G, [True] * 3))
        elif which == "bwd":
            cases["aten"] = lambda: torch.ops.aten.native_group_norm_backward(dyt, xt, mean, rstd, wt, N, C, S, G, [True] * 3)
        else:
            cases["aten"] = lambda: torch.ops.aten.native_group_norm(xt, wt, bt, N, C, S, G, 1e-5)
        m = {k: v * 1e6 for k, v in time_interleaved(cases, 12).items()}
        same = all(np.array_equal(a, e) for a, e in zip(out["old"], out["new"]))
        print(f"{which} {act} {layout} G={G} {threads} thread(s){' lane' if lane else ''} {shape}: " + ", ".join(f"{k} {v:.1f} us" for k, v in m.items())
              + f"; new/old {m['old'] / m['new']:.2f}x, aten/new {m['aten'] / m['new']:.2f}x, bitwise equal: {same}")


def bitwise_ab(old_root: str) -> None:
    old = _load_old_cpu(old_root)
    rng = np.random.default_rng(0)
    cases = differing = 0
    for dt in (np.float32, np.float64):
        for (N, C, S, G) in [(8, 256, 49, 32), (2, 64, 49, 8), (3, 96, 200, 4), (2, 64, 4096, 32),
                             (1, 32, 9000, 8), (4, 16, 7, 16), (2, 128, 512, 8)]:
            for nch in (0, 1, 3):
                for act in range(4):
                    x = (rng.standard_normal(N * C * S) * 3 + 2).astype(dt)
                    dy = rng.standard_normal(N * C * S).astype(dt)
                    w, b = rng.standard_normal(C).astype(dt), rng.standard_normal(C).astype(dt)
                    results = []
                    for mod in (old, cpu):
                        out = []
                        for fwd, bwd in ((mod._forward_nc, mod._backward_nc), (mod._forward_cl, mod._backward_cl)):
                            y, st = np.empty_like(x), np.empty(N * G * 3, dt)
                            fwd(x, y, w, b, st, N, C, S, G, 1e-5, act, nch)
                            dx, dw, db = np.empty_like(x), np.empty(C, dt), np.empty(C, dt)
                            bwd(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch)
                            out += [y, st, dx, dw, db]
                        results.append(out)
                    cases += 1
                    if not all(np.array_equal(a, e) for a, e in zip(*results)):
                        differing += 1
                        print(f"differs: {np.dtype(dt).name} N,C,S,G={N, C, S, G} chunks={nch} act={act}")
    print(f"{cases} cases (contiguous and channels-last each), {differing} with any difference")


def huge_values() -> None:
    torch.manual_seed(0)
    for std in (1e18, 1e20, 1e25, 1e30):
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(2, 64, 16, 16) * std
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
            dy = torch.randn(2, 64, 16, 16, dtype=torch.float64)
            x64 = x.double().requires_grad_()
            ref = F.group_norm(x64, 4, w, b)
            gref = torch.autograd.grad(ref, x64, dy)[0]
            row = []
            for name in ("numba", "composite", "torch"):
                xi = x.clone().requires_grad_()
                if name == "torch":
                    y = F.group_norm(xi, 4, w.float(), b.float())
                else:
                    y = groupnorm.group_norm(xi, 4, w.float(), b.float(), backend=name)
                g = torch.autograd.grad(y, xi, dy.float())[0]
                ey = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                eg = ((g.double() - gref).abs().max() / gref.abs().max()).item()
                row.append(f"{name} y {ey:.1e} dx {eg:.1e}")
            print(f"std {std:.0e} {layout:13}: " + " | ".join(row))


def activation_error(old_root: str | None) -> None:
    """Max error of the float32 SiLU, SiLU', GELU, GELU' helpers of the numba kernels against float64
    over 2M points in [-30, 30], relative to max(|f|, 1e-3); with --old also an older checkout's."""
    z = np.linspace(-30, 30, 2_000_001).astype(np.float32)
    zd = z.astype(np.float64)
    erf = np.frompyfunc(math.erf, 1, 1)(zd / math.sqrt(2)).astype(np.float64)
    sig = 1 / (1 + np.exp(-zd))
    exact = {"SiLU": zd * sig, "SiLU'": sig * (1 + zd * (1 - sig)), "GELU": 0.5 * zd * (1 + erf),
             "GELU'": 0.5 * (1 + erf) + zd * np.exp(-0.5 * zd * zd) / math.sqrt(2 * math.pi)}
    modules = {"this checkout": cpu}
    if old_root:
        modules = {"older checkout": _load_old_cpu(old_root), **modules}
    for label, mod in modules.items():
        @numba.njit(error_model="numpy")
        def evaluate(z, a, b, c, d):
            k = mod._consts(z)
            for i in range(z.shape[0]):
                a[i], b[i], c[i], d[i] = mod._silu(z[i], k), mod._dsilu(z[i], k), mod._gelu(z[i], k), mod._dgelu(z[i], k)

        outs = [np.empty_like(z) for _ in exact]
        evaluate(z, *outs)
        errors = {name: float(np.max(np.abs(o - e) / np.maximum(np.abs(e), 1e-3))) for (name, e), o in zip(exact.items(), outs)}
        print(f"{label}: " + ", ".join(f"{name} {err:.2e}" for name, err in errors.items()))


def stats_accuracy(old_root: str | None) -> None:
    """Max |error| of the float32 forward (numba backend, no affine) against float64 on the same
    float32 values, 5 seeds per case, both layouts; torch's CPU GroupNorm beside it; with --old also
    an older checkout's kernels. "mixed": channel means that differ within a group plus groups that
    start with an outlier (tests/test_backend_numba.py::test_float32_statistics_as_accurate_as_float64);
    "padded": the first 16 positions of every channel zero (test_float32_statistics_with_a_misleading_group_start)."""
    modules = {"this checkout": cpu}
    if old_root:
        modules = {"older checkout": _load_old_cpu(old_root), **modules}
    cases = [((8, 256, 7, 7), 32, 3.0, -2.0, ""), ((8, 256, 7, 7), 32, 3.0, -2.0, "mixed"),
             ((4, 64, 12, 12), 8, 3.0, -2.0, "mixed"), ((2, 64, 56, 56), 32, 1.0, 0.0, ""),
             ((2, 64, 56, 56), 32, 1.0, 5.0, ""), ((2, 64, 32, 32), 8, 1.0, 100.0, "padded")]
    for shape, G, std, mean, kind in cases:
        for layout in ("contiguous", "channels_last"):
            errors = {name: 0.0 for name in [*modules, "torch"]}
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                x64 = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
                if kind == "mixed":
                    x64 += torch.randn(1, shape[1], 1, 1, generator=g, dtype=torch.float64)
                    x64[:, :: shape[1] // G * 2, 0, 0] = 12.0
                elif kind == "padded":
                    x64[:, :, 0, :16] = 0.0
                x = x64.float()
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                exact = F.group_norm(x.double(), G)
                for name, mod in modules.items():
                    y, _ = mod.BACKEND.forward(x, None, None, G, 1e-5, "none")
                    errors[name] = max(errors[name], float((y.double() - exact).abs().max()))
                errors["torch"] = max(errors["torch"], float((F.group_norm(x, G).double() - exact).abs().max()))
            label = f"{'x'.join(map(str, shape))} G={G} mean {mean:g} std {std:g} {kind} {layout}"
            print(f"{label:52s} " + ", ".join(f"{name} {err:.1e}" for name, err in errors.items()))


def _time_rotated(fns: dict, rounds: int) -> dict:
    """`groupnorm bench`'s timing as it was until session 4: like bench.time_interleaved, but each
    round starts one variant later (A B C, B C A, C A B) instead of taking a shuffled order."""
    timer = bench.Timer("cpu")
    calls = {}
    for name, fn in fns.items():
        fn(), fn()
        calls[name] = max(1, min(1000, int(2e-3 / max(timer(fn), 1e-7))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timer(fns[name], calls[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def neighbour_bias(shape: tuple, threads: int, rounds: int) -> None:
    """The same backward call (autograd.grad through graphs of one groupnorm.GroupNorm layer: "ours A"
    to "ours E" are five graphs of the same op) among other variants, timed in a rotated order
    (each round starts one later: A B C, B C A, ...; `groupnorm bench` until session 4) and in
    `groupnorm bench`'s shuffled order. In a rotated order each variant follows the same neighbour in
    most rounds: "ours A" comes right after an empty_like that comes after an ATen backward."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    N, C = shape[:2]
    S, G = int(np.prod(shape[2:])), 32
    x, dy = torch.randn(shape).requires_grad_(), torch.randn(shape)
    layer, ref = groupnorm.GroupNorm(G, C), torch.nn.GroupNorm(G, C)
    layer(x)
    ya, yr = layer(x), ref(x)
    yb = groupnorm.group_norm(x, G, layer.weight, layer.bias, backend="numba")
    yc, yd, ye = layer(x), layer(x), layer(x)
    params, rparams = [x, layer.weight, layer.bias], [x, ref.weight, ref.bias]
    xd, w = x.detach(), ref.weight.detach()
    _, mean, rstd = torch.ops.aten.native_group_norm(xd, w, ref.bias.detach(), N, C, S, G, 1e-5)
    xn, dyn, wn, bn = xd.numpy().ravel(), dy.numpy().ravel(), w.numpy(), ref.bias.detach().numpy()
    st = np.empty(N * G * 3, np.float32)
    nch = cpu._plan(N, C, S, G, False, threads)[1]
    cpu._forward_nc(xn, np.empty_like(xn), wn, bn, st, N, C, S, G, 1e-5, 0, nch)
    dx, dw, db = np.empty_like(xn), np.empty(C, np.float32), np.empty(C, np.float32)
    cases = {
        "ours A": lambda: torch.autograd.grad(ya, params, dy, retain_graph=True),
        "torch": lambda: torch.autograd.grad(yr, rparams, dy, retain_graph=True),
        "ours B": lambda: torch.autograd.grad(yb, params, dy, retain_graph=True),
        "ours C": lambda: torch.autograd.grad(yc, params, dy, retain_graph=True),
        "ours D": lambda: torch.autograd.grad(yd, params, dy, retain_graph=True),
        "ours E": lambda: torch.autograd.grad(ye, params, dy, retain_graph=True),
        "numba kernel": lambda: cpu._backward_nc(dyn, xn, dx, dw, db, wn, bn, st, N, C, S, G, 0, nch),
        "aten bwd": lambda: torch.ops.aten.native_group_norm_backward(dy, xd, mean, rstd, w, N, C, S, G, [True] * 3),
        "empty_like": lambda: torch.empty_like(xd),
    }
    rotated = _time_rotated(cases, rounds)
    shuffled = bench.time_interleaved(cases, bench.Timer("cpu"), rounds, 2, budget_s=0.0)
    for name in ("ours A", "ours B", "ours C", "ours D", "ours E", "torch"):
        print(f"{shape} {threads} thread(s) {name}: rotated order {rotated[name] * 1e6:.0f} us, "
              f"shuffled order {shuffled[name] * 1e6:.0f} us")


def geomeans(dirs: list) -> None:
    """Geometric mean (and minimum) of torch/ours per suite, layout and pass (fwd, bwd, fwdbwd)
    in the bench.json of each `groupnorm bench --out DIR` given, side by side (the bench's own
    targets give only forward+backward)."""
    import json
    from pathlib import Path

    runs = {d: json.loads((Path(d) / "bench.json").read_text())["kernels"] for d in dirs}
    keys = sorted({(r["suite"], r["layout"], r["pass"]) for rows in runs.values() for r in rows})
    for key in keys:
        cells = []
        for d, rows in runs.items():
            vals = [r["speedup"] for r in rows if (r["suite"], r["layout"], r["pass"]) == key]
            if vals:
                cells.append(f"{math.exp(sum(map(math.log, vals)) / len(vals)):.3f} (min {min(vals):.2f})")
        print(f"{key[0]:9s} {key[1]:13s} {key[2]:6s} " + "   ".join(cells))


def openmp_runtimes() -> None:
    """The OpenMP libraries mapped into this process after one torch and one groupnorm call on
    two threads, and its thread count."""
    import os

    torch.set_num_threads(2)
    numba.set_num_threads(2)
    x = torch.randn(8, 64, 32, 32)
    groupnorm.group_norm(x, 8)
    F.group_norm(x, 8)
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "gomp" in line or "libiomp" in line})
    print(f"OpenMP libraries: {libs}; numba threading layer {numba.threading_layer()}; "
          f"threads in this process: {len(os.listdir('/proc/self/task'))}")


def forward_floor(threads: int) -> None:
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    shape, G = (32, 256, 56, 56), 32
    N, C, S = 32, 256, 56 * 56
    xt = torch.randn(shape)
    x, y = xt.numpy().ravel(), np.empty(xt.numel(), np.float32)
    w, b, st = np.ones(C, np.float32), np.zeros(C, np.float32), np.empty(N * G * 3, np.float32)
    yt = torch.empty_like(xt)
    cases = {
        "our forward kernel": lambda: cpu._forward_nc(x, y, w, b, st, N, C, S, G, 1e-5, 0, 0),
        "torch copy_ into an existing tensor": lambda: yt.copy_(xt),
        "torch clone": lambda: xt.clone(),
        "ATen forward": lambda: torch.native_group_norm(xt, None, None, N, C, S, G, 1e-5),
    }
    m = {k: v * 1e6 for k, v in time_interleaved(cases, 9, min_sample_s=0.0).items()}
    print(f"{shape}, {threads} thread(s), medians: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in m.items()))


def nt_store() -> None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def store8_nontemporal(typingctx, arr, idx, a0, a1, a2, a3, a4, a5, a6, a7):
        sig = types.void(arr, idx, a0, a1, a2, a3, a4, a5, a6, a7)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            vty = ir.VectorType(context.get_data_type(signature.args[0].dtype), 8)
            vec = ir.Constant(vty, ir.Undefined)
            for k in range(8):
                vec = builder.insert_element(vec, args[2 + k], ir.Constant(ir.IntType(32), k))
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]], inbounds=True), vty.as_pointer())
            store = builder.store(vec, ptr, align=16)  # numpy buffers: 16-byte aligned
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))

        return sig, codegen

    @numba.njit(error_model="numpy")
    def plain(x, y, m, a, b):
        for i in range(x.shape[0]):
            j = np.uint64(i)
            y[j] = (x[j] - m) * a + b

    @numba.njit(error_model="numpy")
    def nontemporal(x, y, m, a, b):
        n = x.shape[0]
        i = 0
        while i + 8 <= n:
            j = np.uint64(i)
            u = np.uint64
            store8_nontemporal(y, j, (x[j] - m) * a + b, (x[j + u(1)] - m) * a + b, (x[j + u(2)] - m) * a + b,
                               (x[j + u(3)] - m) * a + b, (x[j + u(4)] - m) * a + b, (x[j + u(5)] - m) * a + b,
                               (x[j + u(6)] - m) * a + b, (x[j + u(7)] - m) * a + b)
            i += 8
        while i < n:
            y[i] = (x[i] - m) * a + b
            i += 1

    x = np.random.default_rng(0).random(98 * 2**20 // 4, dtype=np.float32)
    y1, y2 = np.empty_like(x), np.empty_like(x)
    m, a, b = np.float32(0.5), np.float32(2.0), np.float32(0.1)
    plain(x, y1, m, a, b)
    nontemporal(x, y2, m, a, b)
    assert np.array_equal(y1, y2)
    r = {k: v * 1e6 for k, v in time_interleaved({"plain stores": lambda: plain(x, y1, m, a, b),
                                                  "non-temporal stores": lambda: nontemporal(x, y2, m, a, b),
                                                  "np.copyto": lambda: np.copyto(y1, x)}, 9, min_sample_s=0.0).items()}
    print("98 MiB elementwise pass, one thread, medians: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in r.items()))


def train_profile() -> None:
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from groupnorm.bench import SmallResNet, _norms, _to_layout

    torch.manual_seed(0)
    x = _to_layout(torch.randn(32, 3, 32, 32), "channels_last")
    target = torch.randint(0, 10, (32,))
    norm_ops = {"groupnorm": ("groupnorm_native", "GroupNormFunction", "clamp_min", "threshold_backward"),
                "torch.nn.BatchNorm2d": ("batch_norm", "clamp_min", "threshold_backward")}
    for name, norm in _norms(8).items():
        if name not in norm_ops:
            continue
        model = SmallResNet(norm, (32, 64, 128)).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()

        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 5e3
        norm_ms = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in norm_ops[name])) / 5e3
        conv_ms = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 5e3
        print(f"{name}: per step {total:.1f} ms, norm + every ReLU {norm_ms:.1f} ms, convolutions {conv_ms:.1f} ms")


def engine_cost(threads: int, rounds: int) -> None:
    """What one backward call costs before any kernel runs: torch.autograd.grad through a plain
    multiplication, against torch.nn.GroupNorm's and groupnorm.GroupNorm's backward, tiny input."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    shape = (2, 32, 4, 4)
    dy = torch.randn(shape)
    x = torch.randn(shape, requires_grad=True)
    cases = {"x * 2": (x * 2, (x,))}
    for name, layer in (("torch.nn.GroupNorm", torch.nn.GroupNorm(8, 32)), ("groupnorm.GroupNorm", groupnorm.GroupNorm(8, 32))):
        cases[name] = (layer(x), (x, layer.weight, layer.bias))

    def grad(y, inputs):
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    t = time_interleaved({k: grad(*v) for k, v in cases.items()}, rounds)
    print(f"{shape}, {threads} thread(s), backward via torch.autograd.grad, medians of {rounds} rounds: "
          + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in t.items()))


def cl_blocks(threads: int, rounds: int) -> None:
    """Channels-last forward (per-channel sums over S, then normalize), one item per sample as in
    cpu._forward_cl, against items of one sample's channel block sized to stay in L2 (so that the
    second pass would read from L2, as the contiguous kernel's groups do). Simplified kernels:
    no shift, no affine, the memory traffic of the real ones."""
    numba.set_num_threads(threads)

    @numba.njit(error_model="numpy")
    def sums(x, s1, s2, xo, c0, cb, S, C):
        a1 = np.empty(cb, x.dtype)
        a2 = np.empty(cb, x.dtype)
        for r0 in range(0, S, 64):
            a1[:] = 0
            a2[:] = 0
            for s in range(r0, min(r0 + 64, S)):
                xr = x[xo + s * C + c0:xo + s * C + c0 + cb]
                for c in range(cb):
                    a1[c] += xr[c]
                    a2[c] += xr[c] * xr[c]
            for c in range(cb):
                s1[c] += np.float64(a1[c])
                s2[c] += np.float64(a2[c])

    @numba.njit(error_model="numpy")
    def normalize(x, y, m, a, xo, c0, cb, S, C):
        for s in range(S):
            xr = x[xo + s * C + c0:xo + s * C + c0 + cb]
            yr = y[xo + s * C + c0:xo + s * C + c0 + cb]
            for c in range(cb):
                yr[c] = (xr[c] - m[c]) * a[c]

    @numba.njit(parallel=True, error_model="numpy")
    def forward(x, y, N, C, S, cb):
        nb = (C + cb - 1) // cb
        for it0 in numba.prange(N * nb):
            it = np.int64(it0)
            n = it // nb
            c0 = (it - n * nb) * cb
            w = min(cb, C - c0)
            s1 = np.zeros(w)
            s2 = np.zeros(w)
            sums(x, s1, s2, n * S * C, c0, w, S, C)
            m = np.empty(w, x.dtype)
            a = np.empty(w, x.dtype)
            for c in range(w):
                mu = s1[c] / S
                m[c] = mu
                a[c] = 1.0 / np.sqrt(max(s2[c] / S - mu * mu, 0.0) + 1e-5)
            normalize(x, y, m, a, n * S * C, c0, w, S, C)

    for N, C, S in [(32, 256, 3136), (8, 256, 3136), (8, 256, 4096), (32, 512, 784)]:
        x = np.random.default_rng(0).standard_normal(N * S * C).astype(np.float32)
        y = np.empty_like(x)
        widths = [C] + [cb for cb in (16, 32, 64) if cb < C]
        t = time_interleaved({cb: (lambda cb=cb: forward(x, y, N, C, S, cb)) for cb in widths}, rounds)
        t["np.copyto"] = time_interleaved({0: lambda: np.copyto(y, x)}, rounds)[0]
        print(f"N={N} C={C} S={S}, {threads} thread(s), ms: " + ", ".join(
            f"{'whole sample' if k == C else k if isinstance(k, str) else f'{k} channels ({k * S * 4 // 1024} KiB)'} {v * 1e3:.2f}"
            for k, v in t.items()))


def startup(runs: int) -> None:
    """Fresh interpreters: import groupnorm, then its first float32 and first float64 call (what each
    process, DDP rank or study job pays once). Run it from an older checkout with PYTHONPATH to compare."""
    import subprocess
    import sys

    code = (
        "import time; t = time.perf_counter()\n"
        "import torch, groupnorm; t1 = time.perf_counter()\n"
        "x = torch.randn(2, 8, 4, 4); groupnorm.group_norm(x, 4); t2 = time.perf_counter()\n"
        "groupnorm.group_norm(x.double(), 4); t3 = time.perf_counter()\n"
        "from groupnorm.backends import native\n"
        "print(f'import {t1 - t:.2f} s, first float32 call {t2 - t1:.2f} s, first float64 call {t3 - t2:.2f} s, '"
        "f'fast lane: {native.status() or \"on\"} ({groupnorm.__file__})')\n"
    )
    for _ in range(runs):
        print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())


def compile_times(old_root: str | None) -> None:
    """Each of the eight numba kernels' first call with nothing cached (the Python path, one fresh
    process compiling them in turn): the package is copied to an empty temporary folder, so neither
    its __pycache__ nor numba's cache is used; --old times an older checkout's package the same way."""
    import shutil
    import subprocess
    import sys
    import tempfile

    code = (
        "import time, torch\n"
        "from groupnorm.backends import cpu\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    for cl in (False, True):\n"
        "        x = torch.randn(2, 64, 8, 8, dtype=dt)\n"
        "        x = x.contiguous(memory_format=torch.channels_last) if cl else x\n"
        "        w, b = torch.ones(64, dtype=dt), torch.zeros(64, dtype=dt)\n"
        "        t = time.perf_counter(); y, st = cpu.BACKEND.forward(x, w, b, 8, 1e-5, 'none'); t1 = time.perf_counter()\n"
        "        cpu.BACKEND.backward(torch.ones_like(x), x, w, b, st, 8, 'none', (True, True, True))\n"
        "        t2 = time.perf_counter()\n"
        "        print(f'{str(dt)[6:]} {\"channels_last\" if cl else \"contiguous\"}: forward {t1 - t:.1f} s, backward {t2 - t1:.1f} s')\n"
    )
    roots = [("this checkout", Path(__file__).resolve().parents[1])]
    if old_root:
        roots.append((old_root, Path(old_root)))
    for label, root in roots:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(root / "groupnorm", Path(tmp) / "groupnorm", ignore=shutil.ignore_patterns("__pycache__"))
            env = dict(os.environ, PYTHONPATH=tmp, GROUPNORM_NATIVE="0", NUMBA_CACHE_DIR=str(Path(tmp) / "numba"))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp)
            print(f"{label}:\n{out.stdout.strip() or out.stderr.strip()[-2000:]}")


_REFCOUNT_CODE = r"""
import re, torch
from numba.core.registry import CPUDispatcher
from groupnorm.backends import cpu
for dt in (torch.float32, torch.float64):
    for shape in [(2, 8, 4, 4), (1, 8, 300), (2, 8, 200), (3, 16, 5, 5), (1, 64, 9, 9), (2, 16, 1000)]:
        for cl in (False, True):
            x = torch.randn(shape, dtype=dt)
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(shape[1], dtype=dt), torch.randn(shape[1], dtype=dt)
            for act in ("none", "relu", "silu", "gelu"):
                y, st = cpu.BACKEND.forward(x, w, b, 4, 1e-5, act)
                cpu.BACKEND.backward(torch.randn_like(y), x, w, b, st, 4, act, (True, True, True))
counts = {}
for name in dir(cpu):
    f = getattr(cpu, name)
    if not isinstance(f, CPUDispatcher):
        continue
    for sig in f.signatures:
        for d in f.inspect_llvm(sig).split("\ndefine ")[1:]:
            m = re.search(r'@"?([^"(\s]+)"?\(', d.split("\n", 1)[0])
            fn = m.group(1) if m else ""
            if not fn.startswith("_ZN9groupnorm8backends3cpu"):
                continue  # wrappers, gufuncs, NRT itself
            short = re.match(r"_ZN9groupnorm8backends3cpu(\d+)", fn)
            fname = fn[len(short.group(0)):][:int(short.group(1))]
            n = d.split("\n}\n", 1)[0].count("call void @NRT_incref")
            counts[fname] = max(counts.get(fname, 0), n)
for fname, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    print(f"{fname:28s} {n}")
"""


def refcounts() -> None:
    """numba's reference counts left in the CPU kernels' helpers: for each numba function of
    groupnorm/backends/cpu.py, the most NRT_incref calls in its own body over its compiled
    signatures (one per array argument it holds, where LLVM's pruning pass left them; each a call,
    and an atomic operation for arrays numba owns). The package is compiled in a fresh process with
    an empty numba cache (inspection needs code compiled in the process), every kernel with every
    activation, both layouts and dtypes: a few minutes. Functions with 0 call nothing that keeps a
    count; the kernels themselves (_forward_*, _backward_*) take theirs once per call, the row and
    group helpers once per call of theirs (session 15)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root / "groupnorm", Path(tmp) / "groupnorm", ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, PYTHONPATH=tmp, GROUPNORM_NATIVE="0", NUMBA_CACHE_DIR=str(Path(tmp) / "numba"))
        out = subprocess.run([sys.executable, "-c", _REFCOUNT_CODE], capture_output=True, text=True, env=env, cwd=tmp)
        print(out.stdout.strip() or out.stderr.strip()[-2000:])


def _fit_exp(deg: int) -> np.ndarray:
    """Coefficients c0 = 1, c1..c_deg of a polynomial for exp(r) on |r| <= ln2/2 (a hair wider), fitted
    for the least maximum relative error: least squares on Chebyshev nodes, reweighted toward the
    points of largest error (a Remez-like iteration; float64 throughout)."""
    half = math.log(2) / 2 * 1.0005
    r = np.cos(np.linspace(0, np.pi, 4000)) * half
    A = np.stack([r ** k for k in range(1, deg + 1)], 1) / np.exp(r)[:, None]
    target = (np.exp(r) - 1) / np.exp(r)
    w = np.ones_like(r)
    for _ in range(30):
        c, *_ = np.linalg.lstsq(A * w[:, None], target * w, rcond=None)
        err = np.abs(A @ c - target)
        w = w * (err / err.max()) ** 0.3 + 1e-3
        w /= w.max()
    return np.concatenate([[1.0], c])


def exp_poly(old_root: str | None, rounds: int) -> None:
    """The float32 exp of the fused activations: the fitted degree-6 coefficients (as cpu._vexp holds
    them), the relative error of _vexp over [-87, 88], and a SiLU loop's speed, this checkout against
    an older one (--old)."""
    import inspect
    import re

    c = _fit_exp(6)
    c32 = [float(np.float32(v)) for v in c]
    print("degree-6 fit, c0..c6 as float32: " + ", ".join(repr(v) for v in c32))
    # the literals in cpu._vexp (highest degree first, as Horner's rule reads them)
    literals = [float(v) for v in re.findall(r"p = (?:p \* r \+ )?np\.float32\(([-0-9.e]+)\)", inspect.getsource(cpu._vexp_impl))]
    print(f"  the same as cpu._vexp's coefficients: {literals[::-1] == c32}")
    r = np.linspace(-math.log(2) / 2, math.log(2) / 2, 200001)
    for label, coef in (("float64", c), ("float32-rounded", np.array(c32))):
        err = np.max(np.abs(np.polyval(coef[::-1], r) / np.exp(r) - 1))
        print(f"  max relative error on |r| <= ln2/2, {label} coefficients evaluated in float64: {err:.2e}")
    modules = {"this checkout": cpu}
    if old_root:
        modules = {"older checkout": _load_old_cpu(old_root), **modules}
    z = np.linspace(-87, 88, 8_000_001).astype(np.float32)
    x = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32) * 4  # 256 KiB: in L2
    loops = {}
    for label, mod in modules.items():
        @numba.njit(error_model="numpy")
        def ev(z, o):
            for i in range(z.shape[0]):
                o[i] = mod._vexp(z[i])

        @numba.njit(error_model="numpy")
        def silu_loop(x, y):
            k = mod._consts(x)
            for i in range(x.shape[0]):
                y[i] = mod._silu(x[i], k)

        o = np.empty_like(z)
        ev(z, o)
        err = float(np.max(np.abs(o.astype(np.float64) / np.exp(z.astype(np.float64)) - 1)))
        print(f"{label}: _vexp float32 max relative error over [-87, 88]: {err:.2e}")
        silu_loop(x, np.empty_like(x))  # compiled now, while `mod` is this module (numba reads the cell when it compiles)
        loops[label] = (lambda f: lambda: f(x, np.empty_like(x)))(silu_loop)
    m = time_interleaved(loops, max(rounds, 200))
    print("SiLU loop, 65536 float32 in L2, one thread, ns per element: "
          + ", ".join(f"{k} {v * 1e9 / x.size:.3f}" for k, v in m.items()))


def cl_rows(rounds: int) -> None:
    """The channels-last statistics pass, one thread: the row loop as it was before session 9 (a
    short vector loop per row of C values) against cpu._cl_stat_rows (R rows per loop; its row-span
    loops, not the SIMD block loops of session 12) and a copy."""
    @numba.njit(error_model="numpy")
    def per_row(x, s1, s2, shift, xo, slo, shi, C, Rv):
        a1 = np.empty(C, x.dtype)
        a2 = np.empty(C, x.dtype)
        for r0 in range(slo, shi, 64):
            a1[:] = 0
            a2[:] = 0
            for s in range(r0, min(r0 + 64, shi)):
                xr = x[xo + s * C:xo + (s + 1) * C]
                for c in range(C):
                    d = xr[c] - shift[c]
                    a1[c] += d
                    a2[c] += d * d
            for c in range(C):
                s1[c] += np.float64(a1[c])
                s2[c] += np.float64(a2[c])

    @numba.njit(error_model="numpy")
    def over_samples(fn, x, N, S, C, shift):
        s1, s2 = np.zeros(C), np.zeros(C)
        for n in range(N):
            fn(x, s1, s2, shift, n * S * C, 0, S, C, 0)
        return s1, s2

    numba.set_num_threads(1)
    for N, C, S in [(8, 256, 3136), (2, 128, 4096), (1, 64, 32768), (2, 512, 784)]:
        x = (np.random.default_rng(0).standard_normal(N * S * C) + 3).astype(np.float32)
        y = np.empty_like(x)
        shift = np.full(C, 3, np.float32)
        cases = {"per row": lambda: over_samples(per_row, x, N, S, C, shift),
                 "R rows (cpu.py)": lambda: over_samples(cpu._cl_stat_rows, x, N, S, C, shift),
                 "copy": lambda: np.copyto(y, x)}
        m = time_interleaved(cases, rounds)
        print(f"{N}x{C}x{S} (R = {cpu._cl_tile_rows(C)}): " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in m.items())
              + f"; per row / copy {m['per row'] / m['copy']:.2f}x, R rows / copy {m['R rows (cpu.py)'] / m['copy']:.2f}x")


def torch_segv() -> None:
    """torch 2.13's CPU group_norm on channels-last input with a weight and no bias, asked for the
    weight's gradient only, in a child process (it crashes the process); then ours on the same."""
    import subprocess
    import sys

    code = ("import torch, torch.nn.functional as F{imp}\n"
            "x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()\n"
            "w = torch.randn(4, requires_grad=True)\n"
            "print(torch.autograd.grad({fn}(x, 1, w, None), [w], torch.randn(2, 4, 3, 3))[0])\n")
    for name, imp, fn in (("torch.nn.functional.group_norm", "", "F.group_norm"),
                          ("groupnorm.group_norm", ", groupnorm", "groupnorm.group_norm")):
        done = subprocess.run([sys.executable, "-c", code.format(imp=imp, fn=fn)], capture_output=True, text=True)
        why = f" (signal {-done.returncode})" if done.returncode < 0 else ""
        print(f"{name}: exit code {done.returncode}{why}")


def ddp_exit(runs: int) -> None:
    """How often a 2-process gloo torchrun of the DDP test's script fails, ending with
    destroy_process_group() alone (as before session 9) and with Dist.leave() (barrier, destroy,
    gc.collect()). Each run takes a few seconds."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    import test_study_ddp as t

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    source = t.SCRIPT.format(repo=str(repo), norms=t.NORMS, steps=t.STEPS)
    marker = "d.leave()  # what `groupnorm study` does at the end under torchrun"
    assert marker in source, "the DDP test's script no longer ends as this check expects"
    with tempfile.TemporaryDirectory() as tmp:
        for ending in ("torch.distributed.destroy_process_group()", "d.leave()"):
            script = Path(tmp) / "ddp_exit.py"
            script.write_text(source.replace(marker, ending))
            failed = aborted = 0
            for _ in range(runs):
                done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                       "2", str(script), str(Path(tmp) / "out.json")], env=env, capture_output=True,
                                      text=True, timeout=300)
                failed += done.returncode != 0
                aborted += "terminate called without an active exception" in done.stdout + done.stderr
            print(f"ending with {ending}: {failed} of {runs} runs failed ({aborted} with 'terminate called "
                  "without an active exception')")


def cold_bwd(shape: tuple, groups: int, threads: int, rounds: int) -> None:
    """Our layer's backward through autograd (the bench's "bwd") with the caches flushed before each
    call (a 64 MiB buffer written), contiguous and channels-last, without an activation and with ReLU:
    what a backward costs when the saved input comes back from memory, as in a real network."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    for layout in ("contiguous", "channels_last"):
        cases = {}
        for act in ("none", "relu"):
            x = torch.randn(shape)
            x = (x if layout == "contiguous" else x.contiguous(memory_format=fmt)).requires_grad_()
            dy = torch.randn_like(x)
            layer = groupnorm.GroupNorm(groups, shape[1], activation=None if act == "none" else act)
            y = layer(x)
            params = [x, layer.weight, layer.bias]

            def f(y=y, params=params, dy=dy):
                flush.add_(1)
                t0 = time.perf_counter()
                torch.autograd.grad(y, params, dy, retain_graph=True)
                return time.perf_counter() - t0

            cases[act] = f
        for f in cases.values():
            f()
        times = {k: [] for k in cases}
        for _ in range(rounds):
            for k, f in cases.items():
                times[k].append(f())
        print(f"{shape} G={groups} {layout}, {threads} thread(s), cold-cache backward medians of {rounds}: "
              + ", ".join(f"{k} {statistics.median(v) * 1e3:.3f} ms" for k, v in times.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["silu", "large-mean", "paths", "kernel-ab", "activation-error", "forward-floor",
                                    "nt-store", "train-profile", "stats-accuracy", "neighbour-bias",
                                    "geomeans", "openmp-runtimes", "engine-cost", "cl-blocks", "startup",
                                    "bitwise-ab", "huge-values", "exp-poly", "cl-rows", "torch-segv", "ddp-exit",
                                    "cold-bwd", "compile-times", "refcounts"])
    p.add_argument("args", nargs="*", help="paths, neighbour-bias: a shape (default 32 1024 14 14, 8 2048 7 7); kernel-ab: fwd|bwd then shapes like 8x2048x7x7; geomeans: bench --out folders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--old", help="kernel-ab, bitwise-ab, activation-error, stats-accuracy, exp-poly, compile-times: root of an older checkout")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"],
                   help="kernel-ab: which kernels (channels_last: _forward_cl/_backward_cl on channels-last storage)")
    p.add_argument("--groups", type=int, default=32, help="kernel-ab: G")
    p.add_argument("--act", default="none", choices=["none", "relu", "silu", "gelu"],
                   help="kernel-ab: the fused activation (ATen's side: its group norm op and torch's activation op)")
    p.add_argument("--lane", action="store_true",
                   help="kernel-ab: call the kernels as the eager fast lane does (a cfunc making the arrays with "
                        "carray: no reference-count atomics on them) instead of through numba's dispatcher")
    p.add_argument("--old-vector-bytes", type=int, choices=[32, 64],
                   help="kernel-ab: the old side's SIMD vector width (default: what its simd.py picks for this CPU)")
    a = p.parse_intermixed_args()
    if a.what == "silu":
        silu()
    elif a.what == "large-mean":
        large_mean()
    elif a.what == "kernel-ab":
        if not a.old or not a.args or a.args[0] not in ("fwd", "bwd"):
            p.error("kernel-ab needs --old CHECKOUT, then fwd or bwd, then shapes such as 8x2048x7x7")
        kernel_ab(a.old, a.args[0], [tuple(int(v) for v in s.split("x")) for s in a.args[1:]] or [(8, 2048, 7, 7)], a.threads,
                  a.act, a.layout, a.groups, a.old_vector_bytes, a.lane)
    elif a.what == "bitwise-ab":
        if not a.old:
            p.error("bitwise-ab needs --old CHECKOUT")
        bitwise_ab(a.old)
    elif a.what == "huge-values":
        huge_values()
    elif a.what == "cl-rows":
        cl_rows(a.rounds)
    elif a.what == "torch-segv":
        torch_segv()
    elif a.what == "ddp-exit":
        ddp_exit(int(a.args[0]) if a.args else 20)
    elif a.what == "cold-bwd":
        cold_bwd(tuple(int(v) for v in a.args[0].split("x")) if a.args else (1, 64, 32, 32, 32),
                 a.groups, a.threads, max(a.rounds, 21))
    elif a.what == "refcounts":
        refcounts()
    elif a.what == "exp-poly":
        exp_poly(a.old, a.rounds)
    elif a.what == "activation-error":
        activation_error(a.old)
    elif a.what == "stats-accuracy":
        stats_accuracy(a.old)
    elif a.what == "geomeans":
        geomeans(a.args)
    elif a.what == "openmp-runtimes":
        openmp_runtimes()
    elif a.what == "engine-cost":
        engine_cost(a.threads, a.rounds)
    elif a.what == "cl-blocks":
        cl_blocks(a.threads, a.rounds)
    elif a.what == "startup":
        startup(3)
    elif a.what == "compile-times":
        compile_times(a.old)
    elif a.what == "neighbour-bias":
        neighbour_bias(tuple(int(v) for v in a.args) if a.args else (8, 2048, 7, 7), a.threads, max(a.rounds, 31))
    elif a.what == "forward-floor":
        forward_floor(a.threads)
    elif a.what == "nt-store":
        nt_store()
    elif a.what == "train-profile":
        train_profile()
    else:
        paths(tuple(int(v) for v in a.args) if a.args else (32, 1024, 14, 14), a.threads, a.rounds)


if __name__ == "__main__":
    main()
