"""The numba backend's eager fast lane: a small C++ op whose autograd node calls the numba kernels.

Why: on a small tensor the numba kernel takes microseconds but the Python around it (the
``autograd.Function``, tensor-to-NumPy views, allocation) took about ten times that, so small
and medium shapes lost to ATen on per-call cost alone. Here one compiled op
(``groupnorm_native::group_norm``, source ``native.cpp``) allocates, saves what the backward
needs and calls the *same* numba kernels through C entry points (numba ``cfunc``); the backward
runs without Python. Results are bitwise those of the Python path (same kernels, same plan).

The library is compiled once per (source, torch, Python, compiler) into the cache directory
(``$GROUPNORM_CACHE``, default ``~/.cache/groupnorm``); ``make setup`` builds it
(``python -m groupnorm.backends.native``), and the first eager CPU call builds it otherwise.
``GROUPNORM_NATIVE=0`` turns the fast lane off (the Python path, same results, runs instead);
without a C++ compiler it is off by itself and ``status()`` says why.
Used only in eager mode, on CPU, when the numba backend would run the call anyway: torch.compile,
functorch transforms and the forced split modes of the tests keep the Python path.

Two ways in: ``group_norm`` here (the numba backend's ``fast_lane``, after group_norm's Python
argument checks and backend selection), and ``front`` (``groupnorm_native::try_group_norm``), which
``groupnorm.group_norm`` (and so ``groupnorm.GroupNorm``) calls first for plain eager calls when no
backend is forced: it makes the
same argument checks in C++ and returns None for anything it does not take, so errors still come
from the Python checks. Once loaded, this module sets ``groupnorm.backends.native_lane`` to itself.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from groupnorm import backends

ENV_SWITCH = "GROUPNORM_NATIVE"
ENV_CACHE = "GROUPNORM_CACHE"
SOURCE = Path(__file__).with_name("native.cpp")

# False: every call takes the Python path (tests compare the two); $GROUPNORM_NATIVE=0 sets it.
enabled = os.environ.get(ENV_SWITCH, "").strip() != "0"
_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": None, "ready": set(), "op": None}
_CFUNCS: dict = {}  # kernel dtype -> (forward cfunc, backward cfunc), kept alive here
# groupnorm_native::try_group_norm once the library is loaded, else None: group_norm()'s fast
# front (functional.py) calls it directly when nothing forces another path; it checks the
# arguments in C++ and returns None for anything it does not take (then the checked Python path runs).
front = None
cpu = None  # groupnorm.backends.cpu (the numba backend) once front is set: its split_mode is read per call


# ----------------------------------------------------------------------------- building the library
def _flags() -> list[str]:
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (
        ["-O2", "-std=c++20", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        + [f"-I{p}" for p in cpp_extension.include_paths()]
        + [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    )


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def library_path() -> Path:
    """Where the compiled library for this source, torch and Python lives."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{sys.version}|{_compiler()}".encode())
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "groupnorm")
    return base / f"groupnorm_native-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile native.cpp (about 30 s on 2 cores) into library_path(); written atomically."""
    out = library_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [_compiler(), str(SOURCE), "-o", str(tmp), *_flags()]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd[:3])} ...):\n{done.stderr[-3000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _built_library() -> Path:
    """library_path(), building it first if missing. One process builds while others wait on a
    file lock (a torchrun job on a fresh machine does not compile once per rank); a failed build
    leaves a ``.failed`` note so later processes do not spend a minute failing again (the
    explicit ``python -m groupnorm.backends.native`` ignores it and retries)."""
    import fcntl

    path = library_path()
    if path.exists():
        return path
    failed = path.with_name(path.name + ".failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        if failed.exists():
            raise RuntimeError(f"an earlier build failed (see {failed}): {failed.read_text().strip().splitlines()[0]}")
        print("groupnorm: compiling the native fast path once (about a minute) ...", file=sys.stderr, flush=True)
        try:
            build()
        except (OSError, RuntimeError) as exc:
            failed.write_text(f"{type(exc).__name__}: {exc}\n")
            raise
    return path


def _load() -> bool:
    """Load (building if needed) the library once per process; False with a reason if unusable."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        ok, reason = False, None
        try:
            path = _built_library()
            torch.ops.load_library(str(path))
            _define_differentiable_grads()
            _state["op"] = torch.ops.groupnorm_native.group_norm.default
            global front, cpu
            from groupnorm.backends import cpu as numba_backend

            cpu = numba_backend
            overload = torch.ops.groupnorm_native.try_group_norm.default
            front = getattr(overload, "_op", overload)  # the bound C++ op: skips OpOverload.__call__ (~3 us)
            backends.native_lane = sys.modules[__name__]
            ok = True
        except (OSError, RuntimeError) as exc:
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else exc!r}"
            warnings.warn(
                f"groupnorm: native fast lane off ({reason}); the Python path runs instead (same results, more "
                "time per call). `python -m groupnorm.backends.native` retries the build and shows the compiler output.",
                RuntimeWarning,
            )
        _state["reason"] = reason
        _state["loaded"] = ok
        return ok


def status() -> str | None:
    """None when the fast lane is in use, else why not (loads, and if needed builds, the library)."""
    if not enabled:
        return f"turned off ({ENV_SWITCH}=0 or groupnorm.backends.native.enabled = False)"
    _load()
    return _state["reason"]


# ----------------------------------------------------------------------------- the numba entry points
def _entry_points(kdt: torch.dtype):
    """numba cfuncs wrapping the forward and backward kernels for one kernel dtype (compiled
    on first use: a few seconds, the kernels themselves come from numba's cache)."""
    import numba
    from numba import carray, cfunc, types

    from groupnorm.backends import cpu

    nt = types.float64 if kdt == torch.float64 else types.float32
    P, i64 = types.CPointer(nt), types.int64
    opts = dict(error_model="numpy")

    @cfunc(types.void(P, P, P, P, P, i64, i64, i64, i64, types.float64, i64, i64), **opts)
    def forward(xp, yp, wp, bp, sp, N, C, S, G, eps, act, cl):
        n = N * C * S
        x, y = carray(xp, (n,)), carray(yp, (n,))
        w, b, st = carray(wp, (C,)), carray(bp, (C,)), carray(sp, (N * G * 3,))
        T = numba.get_num_threads()
        threads, nch = cpu._plan_auto(N, C, S, G, cl != 0, T)
        if threads != T:
            numba.set_num_threads(threads)
        if cl != 0:
            cpu._forward_cl(x, y, w, b, st, N, C, S, G, eps, act, nch)
        else:
            cpu._forward_nc(x, y, w, b, st, N, C, S, G, eps, act, nch)
        if threads != T:
            numba.set_num_threads(T)

    @cfunc(types.void(P, P, P, P, P, P, P, P, i64, i64, i64, i64, i64, i64), **opts)
    def backward(dyp, xp, dxp, dwp, dbp, wp, bp, sp, N, C, S, G, act, cl):
        n = N * C * S
        dy, x, dx = carray(dyp, (n,)), carray(xp, (n,)), carray(dxp, (n,))
        dw, db, w, b = carray(dwp, (C,)), carray(dbp, (C,)), carray(wp, (C,)), carray(bp, (C,))
        st = carray(sp, (N * G * 3,))
        T = numba.get_num_threads()
        threads, nch = cpu._plan_auto(N, C, S, G, cl != 0, T)
        if threads != T:
            numba.set_num_threads(threads)
        if cl != 0:
            cpu._backward_cl(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch)
        else:
            cpu._backward_nc(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch)
        if threads != T:
            numba.set_num_threads(T)

    return forward, backward


def _ensure_kernels(kdt: torch.dtype) -> None:
    index = 1 if kdt == torch.float64 else 0
    if index in _state["ready"]:
        return
    with _lock:
        if index in _state["ready"]:
            return
        from numba.np.ufunc import parallel

        launch = getattr(parallel, "_launch_threads", None)
        if launch is not None:  # start the kernels' thread pool, as a call of a parallel @njit would
            launch()
        else:  # pragma: no cover - other numba versions: a call of a parallel kernel starts it
            from groupnorm.backends import cpu

            cpu.BACKEND.forward(torch.zeros(1, 1, 1), None, None, 1, 1e-5, "none")
        fwd, bwd = _entry_points(kdt)
        _CFUNCS[kdt] = (fwd, bwd)
        torch.ops.groupnorm_native.set_kernels(index, fwd.address, bwd.address)
        _state["ready"].add(index)


# ----------------------------------------------------------------------------- double backward
def _define_differentiable_grads() -> None:
    """groupnorm::differentiable_grads: the composite gradients with create_graph, which the C++
    backward calls when autograd records it (gradient penalties, gradgradcheck)."""
    if hasattr(torch.ops.groupnorm, "differentiable_grads"):
        return
    lib = torch.library.Library("groupnorm", "FRAGMENT")
    lib.define(
        "differentiable_grads(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
        "int activation, bool need_dx, bool need_dw, bool need_db) -> Tensor[]"
    )
    lib.impl("differentiable_grads", _differentiable_grads, "CompositeImplicitAutograd")
    _state["lib"] = lib  # a Library unregisters its ops when collected


def _differentiable_grads(dy, x, weight, bias, num_groups, eps, activation, need_dx, need_dw, need_db):
    from groupnorm.functional import differentiable_grads

    act = backends.ACTIVATIONS[activation]
    grads = differentiable_grads(dy, x, weight, bias, num_groups, eps, act, (need_dx, need_dw, need_db))
    return [g if g is not None else x.new_empty(0) for g in grads]


# ----------------------------------------------------------------------------- the call
def group_norm(x, weight, bias, num_groups: int, eps: float, act_code: int):
    """The op, or None when the fast lane is off or unavailable (the caller takes the Python path)."""
    if not enabled or not _load():
        return None
    try:
        _ensure_kernels(torch.float64 if x.dtype == torch.float64 else torch.float32)
    except Exception as exc:  # a numba that cannot build the entry points: the Python path, said once
        _state["loaded"], _state["reason"] = False, f"numba entry points failed: {type(exc).__name__}: {exc}"
        warnings.warn(f"groupnorm: native fast lane off, {_state['reason']}; the Python path runs instead", RuntimeWarning)
        return None
    return _state["op"](x, weight, bias, num_groups, eps, act_code)


_NEEDS = (
    "It needs a C++ compiler (g++, or $CXX) and the torch headers of this environment; "
    f"install g++, or set {ENV_SWITCH}=0 to run the (slower per call, same results) Python path."
)


def main() -> None:
    """python -m groupnorm.backends.native: build (if needed) and check the fast lane."""
    path = library_path()
    if path.exists():
        print(f"native fast path already built: {path}")
    else:
        print(f"building the native fast path: {path}")
        path.with_name(path.name + ".failed").unlink(missing_ok=True)
        try:
            build(verbose="-v" in sys.argv)
        except (OSError, RuntimeError) as exc:
            raise SystemExit(f"building the native fast path failed: {exc}\n{_NEEDS}") from None
    reason = status()
    if reason:
        raise SystemExit(f"native fast path unusable: {reason}\n{_NEEDS}")
    x = torch.randn(2, 8, 3, 3)
    y = group_norm(x, None, None, 4, 1e-5, 0)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 4))
    print("native fast path ready")


if __name__ == "__main__":
    main()
