"""The one dispatch point: backend name -> implementation.

A backend is an object with

    name: str
    available() -> str | None
        None when usable here, else the reason it is not (e.g. "numba is not installed").
    supports(x: Tensor, activation: str) -> bool
        whether it runs this input (device, dtype); the caller falls back otherwise.
    forward(x, weight, bias, num_groups, eps, activation) -> (y, stats)
    backward(dy, x, weight, bias, stats, num_groups, activation, output_mask) -> (dx, dweight, dbias)
    fast_lane(x, weight, bias, num_groups, eps, activation) -> y or None      (optional)
        the whole eager op, autograd included, in compiled code (the numba backend's
        ``backends.native``); ``group_norm`` tries it first in eager mode and takes the
        Python path (forward/backward above through an autograd.Function) on None.
        Before any of this, ``group_norm`` hands plain eager calls with no backend forced
        to ``native_lane.front`` (set below once the fast lane is loaded), which checks the
        arguments in C++ and returns None for anything it does not take.

The contract every backend keeps (the op in ``functional`` guarantees the inputs):

* ``x`` has shape (N, C, *spatial), N * C > 0, and is either contiguous ("NC*") or
  channels-last dense, i.e. ``x.movedim(1, -1).is_contiguous()`` ("N*C"); both layouts are
  read in place. ``dy`` has the same shape and the same layout as ``x``.
* ``weight``/``bias`` are None or contiguous (C,) tensors on x's device, of x's dtype or,
  for float16/bfloat16 ``x``, float32 (mixed precision).
* ``activation`` is one of "none", "relu", "silu", "gelu" (exact, erf-based GELU);
  the op computes ``act(gn(x) * weight + bias)``.
* ``y`` and ``dx`` have x's dtype and x's layout (``torch.empty_like(x)`` keeps it).
  ``dweight``/``dbias`` have the parameter's dtype; an entry whose ``output_mask`` flag
  (dx, dweight, dbias) is False, or whose parameter is None, may be returned as None.
* ``stats`` is an (N, G, 3) tensor in the statistics dtype (float64 for float64 input,
  float32 otherwise) holding, per (sample, group), ``mean_hi, mean_lo, rstd``: the mean is
  the unevaluated sum ``mean_hi + mean_lo`` so that ``(x - mean_hi) - mean_lo`` stays exact
  when the mean is large against the spread; ``rstd = 1 / sqrt(var + eps)`` with the biased
  variance. ``backward`` recomputes ``xhat`` (and the pre-activation) from x and stats.
* Results are deterministic: no float atomics, reductions in a fixed order.

Selection: an explicit ``backend=`` argument, else the innermost ``use_backend(...)``
context, else the ``GROUPNORM_BACKEND`` environment variable, else "auto", which picks the
fastest available backend that supports the input's device and dtype.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

ACTIVATIONS = ("none", "relu", "silu", "gelu")
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # the kernels' integer activation codes
ENV_VAR = "GROUPNORM_BACKEND"

# name -> module that defines BACKEND; imported lazily so that a missing numba or
# triton only matters when that backend is asked for.
_MODULES = {
    "reference": "groupnorm.backends.reference",
    "composite": "groupnorm.backends.composite",
    "numba": "groupnorm.backends.cpu",
    "triton": "groupnorm.backends.gpu",
}
# "auto" tries these in order for each device type.
_AUTO_ORDER = {
    "cpu": ("numba", "composite"),
    "cuda": ("triton", "composite"),
}
_loaded: dict = {}
_auto_choice: dict = {}  # (device type, dtype, activation) -> backend name picked by "auto"
_local = threading.local()  # per thread: .forced (stack of use_backend names), .last
# use_backend() contexts open in any thread: while there are none, forced() (asked on every eager
# call) need not look up this thread's stack
_contexts = 0
_contexts_lock = threading.Lock()
# the module groupnorm.backends.native once its library is loaded (set there), else None:
# group_norm() sends eager CPU calls straight to its C++ front (no import of it needed here)
native_lane = None


def names() -> tuple[str, ...]:
    """Every backend name that can be requested (plus "auto")."""
    return tuple(_MODULES)


def get(name: str):
    """The backend object called ``name``; a clear error if unknown or unusable here."""
    if name not in _MODULES:
        raise ValueError(f"unknown groupnorm backend {name!r}; choose one of auto, {', '.join(_MODULES)}")
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            _loaded[name] = module.BACKEND
        except ImportError as exc:  # optional dependency missing
            _loaded[name] = _Unavailable(name, f"{type(exc).__name__}: {exc}")
    return _loaded[name]


def available() -> dict[str, str | None]:
    """name -> None if usable here, else the reason it is not."""
    return {name: get(name).available() for name in _MODULES}


def _stack() -> list:
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    return stack


def requested() -> str:
    """The name forced by this thread's innermost use_backend() context, or "" if none."""
    stack = _stack()
    return stack[-1] if stack else ""


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block: ``with groupnorm.use_backend("composite"): ...``.

    Read when the op runs (also inside compiled code), per thread.
    """
    if name != "auto":
        get(name)  # fail early on a typo
    global _contexts
    stack = _stack()
    with _contexts_lock:
        _contexts += 1
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
        with _contexts_lock:
            _contexts -= 1


# os.environ.get costs ~2 us when the variable is unset (a KeyError raised and caught inside);
# the encoded mapping behind os.environ (kept in sync by it) answers a miss in ~50 ns.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None


def env_backend() -> str:
    """$GROUPNORM_BACKEND, stripped ("" when unset), read at every call."""
    if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:
        return ""
    return os.environ.get(ENV_VAR, "").strip()


def forced() -> bool:
    """True when a use_backend() context or $GROUPNORM_BACKEND names a backend other than auto."""
    name = (requested() if _contexts else "") or env_backend()  # select()'s order
    return bool(name) and name != "auto"


def select(x, activation: str, name: str = ""):
    """Resolve ``name`` to a backend for x: the argument, else this thread's use_backend()
    context, else $GROUPNORM_BACKEND, else "auto"."""
    if not name:
        name = requested() or env_backend() or "auto"
        if name not in _MODULES and name != "auto" and name == env_backend():
            raise ValueError(f"${ENV_VAR}={name!r} names no groupnorm backend; set it to one of auto, "
                             f"{', '.join(_MODULES)}, or unset it")
    if name != "auto":
        backend = get(name)
        reason = backend.available()
        if reason is not None:
            raise RuntimeError(f"groupnorm backend {name!r} was requested but is unavailable here: {reason}")
        if not backend.supports(x, activation):
            raise RuntimeError(
                f"groupnorm backend {name!r} does not support {x.dtype} input on {x.device.type}; "
                f"use backend='auto' or one of: {', '.join(n for n in _MODULES if get(n).available() is None and get(n).supports(x, activation))}"
            )
        return backend
    # what auto picks depends only on (device type, dtype, activation): decided once per process
    key = ("cpu" if x.is_cpu else x.device.type, x.dtype, activation)
    chosen = _auto_choice.get(key)
    if chosen is None:
        for candidate in _AUTO_ORDER.get(key[0], ()) + ("composite",):
            backend = get(candidate)
            if backend.available() is None and backend.supports(x, activation):
                chosen = _auto_choice[key] = candidate
                break
        else:  # pragma: no cover - composite supports every float input
            raise RuntimeError(f"no groupnorm backend supports {x.dtype} input on {x.device}")
    return get(chosen)


def record(name: str) -> None:
    _local.last = name


def last_backend() -> str | None:
    """Name of the backend that ran the most recent group_norm call in this thread (forward or backward)."""
    return getattr(_local, "last", None)


class _Unavailable:
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def available(self):
        return self.reason

    def supports(self, x, activation):
        return False
