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
torch.jit.trace (which records the registered, checked op), functorch transforms, forward-mode AD
and the forced split modes of the tests keep the Python path. The numba entry points the op calls
are cached too (see ``_ENTRY_SOURCE``); a process forked after the kernels ran turns the numba
backend off (``_after_fork_in_child``).

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


# ----------------------------------------------------------------------------- fork()
FORKED = (
    "this process was forked from one that had started numba's OpenMP threads, which cannot run in a "
    "forked child (numba would terminate it); the composite backend runs here instead"
)


def _after_fork_in_child() -> None:
    """A child forked after the numba kernels ran (DataLoader workers, gunicorn --preload,
    multiprocessing's fork start method) must not call them: numba's OpenMP layer kills a forked
    process that uses its pool. The child turns the fast lane and the numba backend off, so
    "auto" picks the composite backend there (torch handles its own pool across fork)."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return
    if getattr(parallel, "_threading_layer", "omp") != "omp":  # tbb and workqueue survive fork()
        return
    global enabled
    enabled = False
    backends._loaded["numba"] = backends._Unavailable("numba", FORKED)
    backends._auto_choice.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
            if os.environ.get(ENV_CACHE):
                reason += f"; the build folder comes from ${ENV_CACHE}={os.environ[ENV_CACHE]}"
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
# The entry points are numba cfuncs around the forward and backward kernels. Compiling them links the
# kernels' code in (about 7 s per dtype on 2 cores), so they are compiled with cache=True from a module
# generated into the cache directory, named by a hash of this template, cpu.py, simd.py and the numba and
# Python versions: numba's cache does not notice changes in the functions a cached one calls, the
# file name does. The next process loads them from numba's cache in well under a second.
_ENTRY_SOURCE = """\
# generated by groupnorm.backends.native: C entry points of the {dtype} numba kernels (see there)
from llvmlite import ir
from numba import carray, cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

from groupnorm.backends import cpu

_P, _i64 = types.CPointer(types.{dtype}), types.int64


# numba.get_num_threads()/set_num_threads() would embed the address of a ctypes function, which
# numba cannot cache; these call the threading layer's symbols by name (registered by numba's
# _launch_threads(), which runs before this module is imported). C signatures: int get_num_threads(void),
# void set_num_threads(int).
@intrinsic
def _get_threads(typingctx):
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "get_num_threads")
        return builder.sext(builder.call(fn, []), ir.IntType(64))
    return types.int64(), codegen


@intrinsic
def _set_threads(typingctx, n):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "set_num_threads")
        builder.call(fn, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()
    return types.void(types.int64), codegen


@cfunc(types.void(_P, _P, _P, _P, _P, _i64, _i64, _i64, _i64, types.float64, _i64, _i64),
       error_model="numpy", cache=True)
def forward(xp, yp, wp, bp, sp, N, C, S, G, eps, act, cl):
    n = N * C * S
    x, y = carray(xp, (n,)), carray(yp, (n,))
    w, b, st = carray(wp, (C,)), carray(bp, (C,)), carray(sp, (N * G * 3,))
    T = _get_threads()
    threads, nch = cpu._plan_auto(N, C, S, G, cl != 0, T)
    if threads != T:
        _set_threads(threads)
    if cl != 0:
        cpu._forward_cl(x, y, w, b, st, N, C, S, G, eps, act, nch)
    else:
        cpu._forward_nc(x, y, w, b, st, N, C, S, G, eps, act, nch)
    if threads != T:
        _set_threads(T)


@cfunc(types.void(_P, _P, _P, _P, _P, _P, _P, _P, _i64, _i64, _i64, _i64, _i64, _i64),
       error_model="numpy", cache=True)
def backward(dyp, xp, dxp, dwp, dbp, wp, bp, sp, N, C, S, G, act, cl):
    n = N * C * S
    dy, x, dx = carray(dyp, (n,)), carray(xp, (n,)), carray(dxp, (n,))
    dw, db, w, b = carray(dwp, (C,)), carray(dbp, (C,)), carray(wp, (C,)), carray(bp, (C,))
    st = carray(sp, (N * G * 3,))
    T = _get_threads()
    threads, nch = cpu._plan_auto(N, C, S, G, cl != 0, T)
    if threads != T:
        _set_threads(threads)
    if cl != 0:
        cpu._backward_cl(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch)
    else:
        cpu._backward_nc(dy, x, dx, dw, db, w, b, st, N, C, S, G, act, nch)
    if threads != T:
        _set_threads(T)
"""


def entry_module_path(kdt: torch.dtype) -> Path:
    """Where the generated entry-point module for kernel dtype ``kdt`` lives (see _ENTRY_SOURCE)."""
    import numba

    dtype = "float64" if kdt == torch.float64 else "float32"
    key = hashlib.sha256()
    key.update(_ENTRY_SOURCE.encode())
    key.update(Path(__file__).with_name("cpu.py").read_bytes())
    key.update(Path(__file__).with_name("simd.py").read_bytes())
    key.update(f"{numba.__version__}|{sys.version}".encode())
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "groupnorm")
    return base / f"groupnorm_entry_{dtype}_{key.hexdigest()[:16]}.py"


def _entry_points(kdt: torch.dtype):
    """The (forward, backward) cfuncs for one kernel dtype, from the generated module (compiled
    on first use, then loaded from numba's cache next to it)."""
    import importlib.util
    import tempfile

    path = entry_module_path(kdt)
    text = _ENTRY_SOURCE.format(dtype="float64" if kdt == torch.float64 else "float32")
    try:
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: ranks of one job may write it at once
    except OSError:  # a cache directory we cannot write: one per user under the temporary directory
        path = Path(tempfile.gettempdir()) / f"groupnorm-entry-{os.getuid()}" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # numba's cache refers to the module's intrinsics by module name
    spec.loader.exec_module(module)
    return module.forward, module.backward


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
