"""group_norm(): input checks, backend dispatch, and the registered torch.library op.

The op is two custom ops, ``groupnorm::forward`` and ``groupnorm::backward``, each with a
fake (meta) kernel, joined by ``torch.library.register_autograd``: torch.compile sees
opaque nodes with known output shapes, and autograd works in eager and compiled code.
The backend is resolved when the op runs (see ``groupnorm.backends``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from groupnorm import backends
from groupnorm.backends.composite import stats_dtype
from groupnorm.groups import divisors

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- layout helpers
def _match_layout(t: Tensor, x: Tensor) -> Tensor:
    """t with x's layout (contiguous or channels-last dense); copies only when they differ."""
    if x.is_contiguous():
        return t.contiguous()
    if t.movedim(1, -1).is_contiguous():
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _dense_input(x: Tensor) -> Tensor:
    """x itself when contiguous or channels-last dense; any other striding is made contiguous."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


def _same_strides_as_empty_like(y: Tensor, x: Tensor) -> Tensor:
    """Backends may return views; the op promises exactly empty_like(x)'s strides."""
    if y.stride() == x.stride() or y.numel() == 0:
        return y
    out = torch.empty_like(x)
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------- the custom ops
def _forward_impl(x, weight, bias, num_groups, eps, activation, backend):
    """(y, stats, name of the backend that ran)."""
    N = x.shape[0]
    if x.numel() == 0:
        stats = torch.zeros(N, num_groups, 3, dtype=stats_dtype(x.dtype), device=x.device)
        return torch.empty_like(x), stats, backend
    impl = backends.select(x, activation, backend)
    y, stats = impl.forward(_dense_input(x), weight, bias, num_groups, eps, activation)
    backends.record(impl.name)
    return _same_strides_as_empty_like(y, x), stats, impl.name


@torch.library.custom_op("groupnorm::forward", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    # checked again here (cheaply): a traced or scripted graph calls this op on inputs group_norm()
    # never saw, and the kernels trust the shapes; compiled graphs pay this guard on every call
    C = x.shape[1] if x.dim() >= 2 else 0
    if not (x.dtype in FLOAT_DTYPES and 0 < num_groups <= C and C % num_groups == 0
            and (weight is None or weight.shape == (C,)) and (bias is None or bias.shape == (C,))):
        check_inputs(x, num_groups, weight, bias, eps, activation)  # raises the error that names the problem
    y, stats, _ = _forward_impl(x, weight, bias, num_groups, eps, activation, backend)
    return y, stats


@_forward_op.register_fake
def _forward_fake(x, weight, bias, num_groups, eps, activation, backend):
    stats = x.new_empty((x.shape[0], num_groups, 3), dtype=stats_dtype(x.dtype))
    return torch.empty_like(x), stats


def _backward_impl(dy, x, weight, bias, stats, num_groups, activation, backend, output_mask, ran=False):
    """dx, dweight, dbias; an entry not asked for (or whose parameter is None) is None.
    ``ran``: ``backend`` is the name of the backend that ran the forward (no selection needed)."""
    need_dx, need_dw, need_db = output_mask
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    dx = dw = db = None
    if x.numel() > 0:
        xd = _dense_input(x)
        impl = backends.get(backend) if ran else backends.select(xd, activation, backend)
        dx, dw, db = impl.backward(
            _match_layout(dy, xd), xd, weight, bias, stats, num_groups, activation, [need_dx, need_dw, need_db]
        )
        backends.record(impl.name)
    if need_dx:
        dx = torch.empty_like(x) if dx is None else _same_strides_as_empty_like(dx, x)
    if need_dw and dw is None:
        dw = torch.zeros_like(weight)
    if need_db and db is None:
        db = torch.zeros_like(bias)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None


@torch.library.custom_op("groupnorm::backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stats: Tensor,
    num_groups: int,
    activation: str,
    backend: str,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward_impl(dy, x, weight, bias, stats, num_groups, activation, backend, output_mask)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _backward_fake(dy, x, weight, bias, stats, num_groups, activation, backend, output_mask):
    need_dx, need_dw, need_db = output_mask
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight) if (need_dw and weight is not None) else x.new_empty(0)
    db = torch.empty_like(bias) if (need_db and bias is not None) else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, backend = inputs
    _, stats = output
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.num_groups, ctx.activation, ctx.backend = num_groups, activation, backend


def _backward(ctx, dy, dstats):
    x, weight, bias, stats = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    dx, dw, db = _backward_op(dy, x, weight, bias, stats, ctx.num_groups, ctx.activation, ctx.backend, mask)
    return (
        dx if mask[0] else None,
        dw if mask[1] and weight is not None else None,
        db if mask[2] and bias is not None else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("groupnorm::forward", _backward, setup_context=_setup_context)


class _EagerGroupNorm(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher, for eager mode.

    torch.library's Python dispatch costs tens of microseconds per call; eager code does not
    need it, so only traced code (torch.compile, export) goes through the registered ops.
    The backward runs on the backend that ran the forward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation, backend):
        y, stats, ran = _forward_impl(x, weight, bias, num_groups, eps, activation, backend)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.num_groups, ctx.eps, ctx.activation, ctx.backend = num_groups, eps, activation, ran
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through PyTorch ops
            grads = differentiable_grads(dy, x, weight, bias, ctx.num_groups, ctx.eps, ctx.activation, mask)
            return (*grads, None, None, None, None)
        dx, dw, db = _backward_impl(dy, x, weight, bias, stats, ctx.num_groups, ctx.activation, ctx.backend, mask,
                                    ran=True)
        return dx, dw, db, None, None, None, None


def differentiable_grads(dy, x, weight, bias, num_groups, eps, activation, mask):
    """Gradients that autograd can differentiate again (gradient penalties, double backward):
    the composite forward is recomputed with autograd on and differentiated with create_graph.
    Entries not asked for in ``mask`` (dx, dweight, dbias), or whose parameter is None, are None.
    Used by the Python path's backward and by the compiled fast lane's (``backends.native``)."""
    from groupnorm.backends.composite import BACKEND as composite

    y, _ = composite.forward(_dense_input(x), weight, bias, num_groups, eps, activation)
    wanted = [t for t, m in zip((x, weight, bias), mask) if m and t is not None]
    got = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return [next(got) if (m and t is not None) else None for t, m in zip((x, weight, bias), mask)]


# ----------------------------------------------------------------------------- the public function
@contextlib.contextmanager
def quiet_trace_checks():
    """Under torch.jit.trace, the argument checks compare traced sizes, and each comparison warns
    that the trace treats it as a constant. They only validate: the traced program records the
    registered op, which checks its arguments on every call, so those warnings are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def eps_error(eps, usual: str = "1e-5") -> Exception:
    """The error for an eps that is not a positive finite number (a Tensor: a TypeError saying float(eps))."""
    if isinstance(eps, Tensor):
        return TypeError(f"eps must be a Python number, got a Tensor ({eps!r}); pass float(eps)")
    return ValueError(f"eps must be a positive finite number, got {eps!r}; the usual value is {usual}")


def _check_param(name: str, p, x: Tensor) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(p).__name__}")
    C = x.shape[1]
    if p.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) for an input with {C} channels, got {tuple(p.shape)}"
        )
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but the input is on {x.device}; move both to one device")
    if p.dtype != x.dtype and not (x.dtype in HALF_DTYPES and p.dtype == torch.float32):
        raise TypeError(
            f"{name} has dtype {p.dtype} but the input is {x.dtype}; use the same dtype, e.g. "
            f"layer.to({x.dtype}) or input.to({p.dtype}) (float32 parameters are also accepted with "
            "float16/bfloat16 input)"
        )


def check_inputs(input, num_groups, weight, bias, eps, activation) -> str:
    """Validate the arguments of group_norm; return the canonical activation name."""
    if not isinstance(input, Tensor):
        raise TypeError(f"group_norm expects a Tensor input, got {type(input).__name__}")
    if input.dim() < 2:
        got = "a 0-d tensor (a single number)" if input.dim() == 0 else f"a 1-d tensor of shape {tuple(input.shape)}"
        fix = ("GroupNorm normalizes groups of channels, so give it a batch of them, "
               "e.g. shape (8, 32) or (8, 32, 16, 16)" if input.dim() == 0 else
               f"if it is one sample of {input.shape[0]} channels, input.unsqueeze(0) makes it (1, {input.shape[0]})")
        raise ValueError(
            f"group_norm expects an input of shape (N, C, *) with at least 2 dimensions (a batch dimension N, a "
            f"channel dimension C, then any spatial ones); got {got}; {fix}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"group_norm supports float16, bfloat16, float32 and float64 input, got {input.dtype}; "
            "convert it first, e.g. input.float()"
        )
    C = input.shape[1]
    if C == 0:
        raise ValueError(
            f"the input has no channels: shape {tuple(input.shape)} has C = 0 in dim 1, and GroupNorm splits the "
            "channels of an (N, C, *) input into groups; check how the input was built (an empty slice or view?)"
        )
    if type(num_groups) is not int and (  # the common case first: the ABC checks cost microseconds
        isinstance(num_groups, bool) or not isinstance(num_groups, (numbers.Integral, torch.SymInt))
    ):
        if getattr(num_groups, "ndim", None) == 0 and torch.compiler.is_compiling():
            # Dynamo hands a NumPy integer over as a 0-d array, which cannot be read (nor printed)
            # without a graph break
            raise TypeError("num_groups must be an int; under torch.compile a NumPy integer arrives as an "
                            "array: make it a Python int with int() outside the compiled code (e.g. where the "
                            "model is built)")
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__} {num_groups!r}")
    if num_groups <= 0 or num_groups > C:
        raise ValueError(f"num_groups must be in [1, C={C}], got {num_groups}; group counts that divide {C}: {divisors(C)}")
    if C % num_groups:
        raise ValueError(
            f"the input's {C} channels are not divisible by num_groups={num_groups}; "
            f"group counts that work: {divisors(C)} (groupnorm.GroupNorm's policy='divisor' or 'gcd' picks one for you)"
        )
    if not (type(eps) is float and 0 < eps < math.inf) and (
        isinstance(eps, bool) or not isinstance(eps, (numbers.Real, torch.SymFloat, torch.SymInt)) or not (0 < eps < math.inf)
    ):
        raise eps_error(eps)
    _check_param("weight", weight, input)
    _check_param("bias", bias, input)
    act = "none" if activation is None else activation
    if act not in backends.ACTIVATIONS:
        raise ValueError(f"activation must be None or one of 'relu', 'silu', 'gelu', got {activation!r}")
    return act


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Group Normalization of ``input`` (N, C, *), then ``activation`` if given.

    Same semantics as ``torch.nn.functional.group_norm``; ``activation`` in
    {None, "relu", "silu", "gelu"} is fused: the result is ``act(group_norm(x))``.
    The output keeps the input's dtype and memory format (contiguous or channels-last).
    ``backend`` forces an implementation ("numba", "triton", "composite", "reference");
    by default the ``use_backend`` context, then ``$GROUPNORM_BACKEND``, then "auto".
    """
    if backend is None:
        y = try_front(input, num_groups, weight, bias, eps, activation)
        if y is not None:
            return y
    if _tracing_state() is None:
        act = check_inputs(input, num_groups, weight, bias, eps, activation)
    else:
        with quiet_trace_checks():
            act = check_inputs(input, num_groups, weight, bias, eps, activation)
    if not isinstance(num_groups, torch.SymInt):
        num_groups = int(num_groups)  # numpy integers
    name = backend or ""  # "" : resolved when the op runs (use_backend context, env var, auto)
    if name and name != "auto" and name not in backends.names():  # no import here: this line is traced
        backends.get(name)  # raises the error that lists the valid names
    if torch.compiler.is_compiling() or _tracing_state() is not None:
        # torch.compile, and torch.jit.trace: the graph records the registered op (checked on every
        # call, loadable wherever groupnorm is imported), not the fast lane's unchecked one
        y, _ = _forward_op(input, weight, bias, num_groups, float(eps), act, name)
        return y
    if _is_expanded_weight(weight) or _is_expanded_weight(bias):
        # per-sample gradients by torch's ExpandedWeights (call_for_per_sample_grads, Opacus'
        # grad_sample_mode="ew"): they handle torch's group_norm, not our op
        if _is_expanded_weight(weight) and not _is_expanded_weight(bias):
            # torch 2.13's expanded group_norm fails in backward without an expanded bias (it reads
            # ctx.bias, set only for one; a frozen bias is not expanded): a stand-in with the bias's
            # values, or zeros, whose per-sample gradient nobody reads
            stand_in = torch.zeros(input.shape[1], dtype=weight.dtype, device=weight.device) if bias is None else bias.detach()
            bias = type(weight)(stand_in.clone().requires_grad_(), weight.batch_size, weight.loss_reduction)
            bias.allow_smaller_batches = weight.allow_smaller_batches
        from groupnorm.backends.composite import activate

        return activate(torch.nn.functional.group_norm(input, num_groups, weight, bias, eps), act)
    if _functorch_active() or _fwad._current_level >= 0:
        # vmap / grad / jvp (per-sample gradients) and forward-mode AD (torch.autograd.forward_ad):
        # PyTorch ops they can transform (the kernels would drop tangents)
        from groupnorm.backends.composite import BACKEND as composite

        return composite.forward(_dense_input(input), weight, bias, num_groups, float(eps), act)[0]
    if input.is_cpu and input.numel():  # the numba backend's compiled fast lane, if it is the one to run
        impl = backends.select(input, act, name)
        fast = getattr(impl, "fast_lane", None)
        y = fast(input, weight, bias, num_groups, float(eps), act) if fast is not None else None
        if y is not None:
            backends.record(impl.name)
            return y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        return _EagerGroupNorm.apply(input, weight, bias, num_groups, float(eps), act, name)
    return _forward_impl(input, weight, bias, num_groups, float(eps), act, name)[0]


_LANE_CODES = {None: 0, **backends.ACT_CODES}
_PARAM_TYPES = (Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_functorch_probe = getattr(torch._C, "_are_functorch_transforms_active", None)


def _is_expanded_weight(t) -> bool:
    """t is one of torch's ExpandedWeight tensors (torch.nn.utils._expanded_weights): a parameter
    wrapped for per-sample gradients, which only the torch functions it knows may receive."""
    return t is not None and type(t).__name__ == "ExpandedWeight" and type(t).__module__.startswith("torch.nn.utils._expanded")


def try_front(input, num_groups, weight, bias, eps, activation) -> Optional[Tensor]:
    """The C++ front's answer for a plain eager call (see ``backends.native``), or None: arguments
    of other types, or anything it does not take, go the checked Python path. Only for calls with
    no ``backend=`` argument."""
    lane = backends.native_lane
    if (
        lane is not None
        and type(input) is Tensor
        and type(num_groups) is int
        and 0 < num_groups < 1 << 62  # the op takes an int64; others get the Python path's error
        and type(eps) is float
        and (weight is None or type(weight) in _PARAM_TYPES)  # tensor subclasses (ExpandedWeight, DTensor, ...)
        and (bias is None or type(bias) in _PARAM_TYPES)  # take the Python path
        and _front_allowed(lane)
    ):
        code = _LANE_CODES.get(activation) if activation is None or type(activation) is str else None
        y = lane.front(input, weight, bias, num_groups, eps, code) if code is not None else None
        if y is not None:  # None: the C++ side declined (bad arguments, dtype not loaded, ...)
            backends.record("numba")
            return y
    return None


def _front_allowed(lane) -> bool:
    """The numba fast lane may take this call directly: eager mode (not compiling, not tracing), no
    functorch transform, no backend forced by use_backend()/$GROUPNORM_BACKEND, the lane switched on, the numba
    backend's automatic work split (tests force others). Then "auto" would pick numba for any
    CPU float input, which is what the fast lane runs."""
    if _is_compiling() or _tracing_state() is not None:  # torch.jit.trace: the tracer cannot
        return False  # record an op that returns Tensor? (the fast lane's own op traces)
    cpu = lane.cpu
    return (lane.enabled and cpu is not None and cpu.split_mode == "auto" and not _functorch_active()
            and _fwad._current_level < 0 and not backends.forced())


def _functorch_active() -> bool:
    return bool(_functorch_probe is not None and _functorch_probe())
