"""Switching an existing model to GN: BatchNorm conversion and a batch-independence check.

``convert_batchnorm(model)`` follows ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: a
recursive walk over ``named_children`` that replaces every BatchNorm (1d/2d/3d, SyncBatchNorm,
initialized lazy BatchNorm, and BatchNorm subclasses such as timm's ``BatchNormAct2d``) with
``groupnorm.GroupNorm``, in place, the root included, returning the (possibly new) root.
The BatchNorm's ``weight``/``bias`` Parameter objects are moved into the new layer, so they
stay bitwise equal, keep ``requires_grad``, device and dtype, and an optimizer built before
the conversion still points at them. Every other parameter is untouched.

``check_batch_independence(model, batch)`` runs the model on a batch, on each sample alone
and on a shuffled batch, compares every module's output through forward hooks, re-runs the
modules whose outputs moved on their own inputs to name the layers that couple samples,
and scans the module types statically.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from groupnorm.groups import check_request, resolve_groups
from groupnorm.layers import (
    GroupNorm, GroupNormAct, StdConv1d, StdConv2d, StdConv3d, _StdConvMixin, conv_fan_in, fused_activation,
)

logger = logging.getLogger(__name__)

__all__ = [
    "convert_batchnorm",
    "ConversionSummary",
    "Replacement",
    "GroupNormAct",
    "check_batch_independence",
    "BatchIndependenceReport",
    "ModuleCheck",
    "batch_coupled_layers",
]

_STD_CONVS: dict[type, type] = {nn.Conv1d: StdConv1d, nn.Conv2d: StdConv2d, nn.Conv3d: StdConv3d}


# ============================================================================ conversion
@dataclass(frozen=True)
class Replacement:
    """One replaced layer: where it was, what it was, and the GroupNorm (or StdConv) it became."""

    name: str  # qualified module name, "" for the root
    old_type: str
    new_type: str
    num_channels: int
    num_groups: int | None  # None for a convolution
    eps: float
    affine: bool

    @property
    def group_size(self) -> int | None:
        return None if self.num_groups is None else self.num_channels // self.num_groups


class ConversionSummary(list):
    """The list of :class:`Replacement` rows, printable as a table."""

    def norms(self) -> list[Replacement]:
        return [r for r in self if r.num_groups is not None]

    def convs(self) -> list[Replacement]:
        return [r for r in self if r.num_groups is None]

    def __str__(self) -> str:
        norms, convs = self.norms(), self.convs()
        lines = [f"converted {len(norms)} BatchNorm layer(s) to GroupNorm"
                 + (f" and {len(convs)} convolution(s) to weight-standardized ones" if convs else "")]
        if norms:
            width = max(len("layer"), *(len(r.name or "<root>") for r in norms))
            lines.append(f"  {'layer':<{width}}  {'was':<18} {'C':>5} {'G':>4} {'C/G':>4}  eps      affine")
            for r in norms:
                lines.append(f"  {r.name or '<root>':<{width}}  {r.old_type:<18} {r.num_channels:>5} {r.num_groups:>4} "
                             f"{r.group_size:>4}  {r.eps:<8.1e} {r.affine}")
        return "\n".join(lines)


def _check_request(num_groups, group_size, policy, min_group_size, eps) -> None:
    check_request(num_groups, group_size, policy, min_group_size,
                  example="convert_batchnorm(model, group_size=16) for 16 channels per group, "
                          "or convert_batchnorm(model, num_groups=32)")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise ValueError(f"eps must be a positive number or None (keep each BatchNorm's eps), got {eps!r}")


def _is_uninitialized(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _lazy_error(name: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"{type(module).__name__} at {name or '<root>'!r} has not seen data yet, so its channel count "
        "(and hence its group count) is unknown; run one forward pass first, e.g. `model(example_batch)`, "
        "which turns lazy layers into ordinary ones, then call convert_batchnorm"
    )


def _split_children(bn: _BatchNorm) -> tuple[str | None, dict[str, nn.Module]]:
    """For a BatchNorm subclass with children (a norm+act layer): the activation GroupNorm can
    fuse, and the children to keep. Identity children are dropped."""
    children = {n: c for n, c in bn.named_children() if not isinstance(c, nn.Identity)}
    if len(children) == 1:
        (child,) = children.values()
        fused = fused_activation(child)
        if fused is not None:
            return fused, {}
    return None, children


def _build_groupnorm(bn: _BatchNorm, num_channels: int, request: dict, eps: float) -> GroupNorm:
    activation, children = _split_children(bn)
    cls = GroupNormAct if children else GroupNorm
    ref = bn.weight if bn.weight is not None else bn.running_mean
    dtype = ref.dtype if ref is not None else None
    # Built on the meta device (no allocation, no init), then given the BatchNorm's own Parameters.
    new = cls(num_channels=num_channels, eps=eps, affine=bn.affine, activation=activation,
              device="meta", dtype=dtype, **request)
    if bn.affine:
        new.weight = bn.weight
        new.bias = bn.bias
    for child_name, child in children.items():
        new.add_module(child_name, child)
    new.train(bn.training)
    return new


def _build_stdconv(conv: nn.Module) -> nn.Module:
    cls = _STD_CONVS[type(conv)]
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
              padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


def _conv_base(m: nn.Module) -> type:
    """The class a convolution was built as: torch.nn.utils.parametrize swaps in a generated
    subclass (ParametrizedConv2d), which still counts as the plain conv it wraps."""
    cls = type(m)
    return cls.__bases__[0] if parametrize.is_parametrized(m) and cls.__bases__ else cls


def _check_plain_weight(name: str, m: nn.Module, weight_standardization: bool) -> None:
    """Refuse, before anything changes, a layer whose weight is not a plain Parameter (weight norm,
    torch.nn.utils.parametrize): moving it into the new layer would fail half-way through."""
    where = f"{type(m).__name__} at {name or '<root>'!r}"
    if parametrize.is_parametrized(m):
        raise ValueError(
            f"{where} has parametrized tensors ({', '.join(m.parametrizations.keys())}); remove them first "
            "(torch.nn.utils.parametrize.remove_parametrizations(layer, name)), then convert"
            + ("" if isinstance(m, _BatchNorm) else ", or convert without weight_standardization")
        )
    if getattr(m, "weight", None) is not None and not isinstance(m._parameters.get("weight"), nn.Parameter):
        raise ValueError(
            f"{where} computes its weight from other parameters (e.g. torch.nn.utils.weight_norm); remove that "
            "first (torch.nn.utils.remove_weight_norm(layer)), then convert"
            + ("" if isinstance(m, _BatchNorm) else ", or convert without weight_standardization")
        )


def _named_tree(module: nn.Module, prefix: str = "", seen: set | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) pairs, the root first, not descending into BatchNorms (they are replaced whole)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    if isinstance(module, _BatchNorm):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _named_tree(child, f"{prefix}.{name}" if prefix else name, seen)


def convert_batchnorm(
    module: nn.Module,
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    policy: str = "divisor",
    min_group_size: int = 2,
    eps: float | None = None,
    weight_standardization: bool = False,
    verbose: bool = False,
    return_summary: bool = False,
):
    """Replace every BatchNorm in ``module`` (the root included) with ``groupnorm.GroupNorm``.

    Works in place, like ``nn.SyncBatchNorm.convert_sync_batchnorm``: use the returned module
    (it is a new object only when ``module`` itself is a BatchNorm); ``copy.deepcopy`` first to
    keep the original.

    Args:
        module: the model (any ``nn.Module``).
        num_groups: requested groups per layer; None (with no ``group_size``) means the paper's 32.
        group_size: request channels per group instead (e.g. 16); giving both is an error.
        policy: how each layer's G is chosen when C does not fit the request (see
            ``groupnorm.groups``): "divisor" (default) takes the largest divisor of C not above
            the request, "gcd" gcd(C, request) as Opacus' fixer does, "strict" raises.
        min_group_size: under "divisor"/"gcd", the fewest channels a group may get; the default 2
            keeps narrow layers from silently becoming Instance Norm (one channel per group)
            while leaving the paper's ResNet-50 at G = 32 everywhere. Pass 1 to allow it.
        eps: None keeps each BatchNorm's eps; a number sets it on every new layer.
        weight_standardization: also swap every ``nn.Conv1d/2d/3d`` (exact types) for the
            ``groupnorm.StdConv`` of the same rank, keeping its Parameters (GN+WS, Qiao et al. 2019).
        verbose: print the per-layer summary table.
        return_summary: return ``(module, ConversionSummary)`` instead of the module.

    What is converted: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, lazy BatchNorm after its
    first forward pass (an uninitialized one raises: its C is unknown), and BatchNorm subclasses;
    a subclass's extra children (timm's ``BatchNormAct2d``: ``drop``, ``act``) are kept: a lone
    ReLU/SiLU becomes GroupNorm's fused ``activation``, anything else a :class:`GroupNormAct`.
    Affine-free BatchNorm becomes ``affine=False`` GroupNorm; a frozen one keeps
    ``requires_grad=False``; train/eval mode is kept. Running statistics are dropped: GroupNorm
    has none, so a model converted in eval mode computes a different function until trained.

    Every request is checked before anything is replaced, so an error leaves the model untouched.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_batchnorm expects a torch.nn.Module, got {type(module).__module__}.{type(module).__qualname__}; "
            "pass the model itself (e.g. convert_batchnorm(model)), not its state_dict or parameters"
        )
    if num_groups is None and group_size is None:
        num_groups = 32  # the paper's choice
    _check_request(num_groups, group_size, policy, min_group_size, eps)
    request = dict(num_groups=num_groups, group_size=group_size, policy=policy, min_group_size=min_group_size)

    # Plan: resolve every layer first so that an impossible request raises before any change.
    plan: dict[int, tuple[str, nn.Module, Callable[[], nn.Module], Replacement]] = {}
    skipped_convs: list[str] = []
    other_convs: list[str] = []  # subclasses of nn.ConvNd: their forward may not be the plain conv's
    for name, m in _named_tree(module):
        if _is_uninitialized(m):
            if isinstance(m, _BatchNorm) or (weight_standardization and isinstance(m, nn.modules.conv._ConvNd)):
                raise _lazy_error(name, m)
            continue
        if isinstance(m, _BatchNorm):
            _check_plain_weight(name, m, weight_standardization)
            C = m.num_features
            try:
                G = resolve_groups(C, num_groups, group_size=group_size, policy=policy, min_group_size=min_group_size)
            except ValueError as e:
                raise ValueError(f"cannot convert {type(m).__name__} at {name or '<root>'!r} ({C} channels): {e}") from None
            layer_eps = m.eps if eps is None else eps
            if not layer_eps > 0:
                raise ValueError(
                    f"{type(m).__name__} at {name or '<root>'!r} has eps={m.eps!r}; GroupNorm needs eps > 0: "
                    "pass eps=1e-5 to convert_batchnorm"
                )
            new_type = GroupNormAct.__name__ if _split_children(m)[1] else GroupNorm.__name__
            row = Replacement(name, type(m).__name__, new_type, C, G, float(layer_eps), m.affine)
            plan[id(m)] = (name, m, lambda m=m, C=C, e=layer_eps: _build_groupnorm(m, C, request, e), row)
        elif weight_standardization and isinstance(m, tuple(_STD_CONVS)) and not isinstance(m, _StdConvMixin):
            if _conv_base(m) not in _STD_CONVS:
                other_convs.append(f"{name or '<root>'!r} ({type(m).__module__}.{type(m).__qualname__})")
                continue
            if conv_fan_in(m) == 1:
                skipped_convs.append(name)
                continue
            _check_plain_weight(name, m, weight_standardization)
            row = Replacement(name, type(m).__name__, _STD_CONVS[type(m)].__name__, m.out_channels, None,
                              float("nan"), m.bias is not None)  # eps filled in once built
            plan[id(m)] = (name, m, lambda m=m: _build_stdconv(m), row)

    # Apply: one new module per old one (a module shared in two places stays shared).
    built: dict[int, nn.Module] = {}
    summary = ConversionSummary()

    def replace(m: nn.Module) -> nn.Module:
        key = id(m)
        if key in plan and key not in built:
            name, old, build, row = plan[key]
            built[key] = new = build()
            summary.append(row if row.num_groups is not None else dataclasses.replace(row, eps=new.eps))
        return built.get(key, m)

    def walk(parent: nn.Module, seen: set) -> None:
        if id(parent) in seen or isinstance(parent, (_BatchNorm, GroupNorm)):
            return
        seen.add(id(parent))
        # _modules, not named_children(): that skips a module registered twice under one parent
        # (nn.ModuleList([bn] * 3), Sequential(..., bn, ..., bn)), which would stay a BatchNorm
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replace(child)
            if new is not child:
                setattr(parent, child_name, new)
            else:
                walk(child, seen)

    root = replace(module)
    walk(root, set())

    for r in summary.norms():
        logger.info("%s: %s(%d) -> %s(%d groups of %d, eps=%g)", r.name or "<root>", r.old_type,
                    r.num_channels, r.new_type, r.num_groups, r.group_size, r.eps)
        if r.group_size == 1 and r.num_channels > 1 and min_group_size > 1:
            logger.warning("%s: %d channels give one channel per group (Instance Norm)", r.name, r.num_channels)
    if summary.convs():
        logger.info("%d convolution(s) swapped for weight-standardized ones", len(summary.convs()))
    if skipped_convs:
        warnings.warn(
            f"weight standardization skipped {len(skipped_convs)} convolution(s) with one weight per filter "
            f"({', '.join(repr(n) for n in skipped_convs[:5])}{' ...' if len(skipped_convs) > 5 else ''}): "
            "standardizing a single weight gives 0, which would silence the layer; they stay plain convolutions",
            stacklevel=2,
        )
    if other_convs:
        warnings.warn(
            f"weight standardization left {len(other_convs)} convolution subclass(es) plain "
            f"({', '.join(other_convs[:5])}{' ...' if len(other_convs) > 5 else ''}): only exact nn.Conv1d/2d/3d "
            "are swapped, since a subclass may change what its forward computes; give such a layer "
            "standardized weights in its own code (groupnorm.layers.standardize_weight(self.weight, 1e-6))",
            stacklevel=2,
        )
    # BatchNorm1d after a Linear normalizes (N, C) features, where GroupNorm sees only C/G values per group
    linear_widths = {m.out_features for m in root.modules() if isinstance(m, nn.Linear)}
    narrow_1d = [r for r in summary.norms() if r.old_type.endswith("BatchNorm1d") and r.group_size < 16
                 and r.num_channels in linear_widths]
    if narrow_1d:
        names = ", ".join(f"{r.name or '<root>'!r} ({r.num_channels} channels, {r.group_size} per group)"
                          for r in narrow_1d[:5]) + (" ..." if len(narrow_1d) > 5 else "")
        warnings.warn(
            f"converted BatchNorm1d layer(s) {names} as wide as a Linear layer's output: if a layer normalizes "
            "(N, C) features (an MLP or projection head, no length dimension), each sample's group holds only its channels-per-group "
            "values, and with 2 of them the output is about +-1 whatever the input; convert such a layer first, "
            "on its own, as one group (like LayerNorm): convert_batchnorm(model.head, group_size=C)",
            stacklevel=2,
        )
    if verbose:
        print(summary)
    if "opacus" in sys.modules:  # DP users convert then wrap: give Opacus our per-sample gradients
        from groupnorm import opacus_support  # noqa: F401  (registers on import)
    return (root, summary) if return_summary else root


# ============================================================================ batch independence
def batch_coupled_layers(model: nn.Module, *, train: bool = True) -> list[tuple[str, str, bool, str]]:
    """Static scan: (name, type, active, why) for each layer type known to couple samples.

    ``active`` says whether the coupling applies in the given mode: BatchNorm uses batch
    statistics in training, and in eval only when it keeps no running statistics.
    """
    found = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, _BatchNorm):
            if train:
                found.append((name, kind, True, "normalizes with the batch's statistics in training"))
            elif m.running_mean is None:
                found.append((name, kind, True, "keeps no running statistics, so it uses the batch's even in eval"))
            else:
                found.append((name, kind, False, "uses the batch's statistics in training only (eval uses running ones)"))
        elif ("BatchNorm" in kind or "BatchRenorm" in kind) and "Frozen" not in kind:
            found.append((name, kind, True, "its name says batch normalization (not a torch BatchNorm subclass)"))
    return found


@dataclass
class ModuleCheck:
    """One module's result: the largest deviation of its outputs between the full batch and
    each sample alone (``alone``) or a shuffled batch (``shuffled``), over all its calls."""

    name: str
    type: str
    calls: int = 0
    alone: float = 0.0
    shuffled: float = 0.0
    scale: float = 0.0  # largest |output| in the full batch
    ok: bool = True
    offender: bool = False  # couples samples itself (re-run on its own inputs), not just downstream
    note: str = ""

    @property
    def deviation(self) -> float:
        return max(self.alone, self.shuffled)


@dataclass
class BatchIndependenceReport:
    """What :func:`check_batch_independence` found. ``ok`` is True when no module's output for one
    sample depends on the other samples and no batch-coupled layer is active."""

    mode: str
    batch_size: int
    atol: float | None  # as used; None: per dtype, see DEFAULT_TOLERANCES
    rtol: float | None  # likewise, each on its own
    rows: list[ModuleCheck] = field(default_factory=list)
    coupled_layers: list[tuple[str, str, bool, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failing(self) -> list[ModuleCheck]:
        return [r for r in self.rows if not r.ok]

    @property
    def offenders(self) -> list[str]:
        """Names of the modules that couple samples themselves (dynamic), else the active static finds."""
        names = [r.name for r in self.rows if r.offender]
        return names or [n for n, _, active, _ in self.coupled_layers if active]

    @property
    def ok(self) -> bool:
        return not self.failing and not self.errors and not any(a for _, _, a, _ in self.coupled_layers)

    def __getitem__(self, name: str) -> ModuleCheck:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        default = DEFAULT_TOLERANCES[torch.float32]
        atol = default[0] if self.atol is None else self.atol
        rtol = default[1] if self.rtol is None else self.rtol
        missing = [n for n, v in (("atol", self.atol), ("rtol", self.rtol)) if v is None]
        per_dtype = (" for float32, per dtype" if len(missing) == 2
                     else f" ({missing[0]} per dtype, shown for float32)" if missing else "")
        head = (f"batch independence ({self.mode} mode, batch of {self.batch_size}, "
                f"tolerance max|diff| <= {atol:g} + {rtol:g}*max|ref|{per_dtype}): ")
        lines = [head + ("OK: no sample's output depends on the others" if self.ok else "FAILED")]
        lines += [f"  error: {e}" for e in self.errors]
        offenders = [r for r in self.rows if r.offender]
        if offenders:
            lines.append(f"  {len(offenders)} module(s) couple samples themselves:")
            for r in offenders:
                lines.append(f"    {r.name or '<root>'} ({r.type}): max deviation {r.deviation:.3g} "
                             f"(alone {r.alone:.3g}, shuffled {r.shuffled:.3g}, output scale {r.scale:.3g})"
                             + (f"; {r.note}" if r.note else ""))
        downstream = [r for r in self.failing if not r.offender]
        if downstream:
            worst = max(downstream, key=lambda r: r.deviation)
            lines.append(f"  {len(downstream)} other module(s) deviate downstream of them "
                         f"(worst: {worst.name or '<root>'} {worst.deviation:.3g})")
        if self.ok and self.rows:
            worst = max(self.rows, key=lambda r: r.deviation)
            lines.append(f"  {len(self.rows)} modules checked; largest deviation {worst.deviation:.3g} "
                         f"at {worst.name or '<root>'}")
        active = [c for c in self.coupled_layers if c[2]]
        if active:
            lines.append(f"  static scan: {len(active)} batch-coupled layer(s):")
            for n, kind, _, why in active[:20]:
                lines.append(f"    {n or '<root>'} ({kind}): {why}")
            if len(active) > 20:
                lines.append(f"    ... and {len(active) - 20} more")
        inactive = [c for c in self.coupled_layers if not c[2]]
        if inactive:
            lines.append(f"  static scan: {len(inactive)} BatchNorm layer(s) inactive in this mode "
                         "(they couple samples in training)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _leaves(o)]
    return []


def _map(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


# (atol, rtol) per dtype when none are given: batch and single-sample kernels sum in different orders.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-5, 1e-3),
    torch.bfloat16: (1e-3, 5e-2),
    torch.float16: (1e-4, 1e-2),
}


def _check_tolerance(name: str, value) -> float | None:
    """A tolerance as a float, None kept (the per-dtype default for that one)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0 (or None for the per-dtype default), "
                        f"got {type(value).__name__} {value!r}")
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0 (or None for the per-dtype default), got {value!r}")
    return float(value)


def _deviation(out: Tensor, ref: Tensor, atol: float | None, rtol: float | None) -> tuple[float, bool]:
    """(max |out - ref|, whether it is within atol + rtol * max |ref|).

    The tolerance scales with the whole tensor, not each element: batched and single-sample
    kernels sum in different orders, and an element-wise rtol fails on near-zero elements.
    """
    if out.shape != ref.shape:
        return float("inf"), False
    if not (ref.is_floating_point() or ref.is_complex()):
        same = torch.equal(out, ref)
        return (0.0 if same else float("inf")), same
    if not ref.numel():
        return 0.0, True
    diff = (out - ref).abs()
    nan_ok = out.isnan() == ref.isnan()
    diff = diff.nan_to_num(nan=0.0, posinf=float("inf"))
    dev = float(diff.max())
    scale = float(ref.abs().nan_to_num(nan=0.0).max())
    if atol is None or rtol is None:
        default = DEFAULT_TOLERANCES.get(ref.dtype, DEFAULT_TOLERANCES[torch.float32])
        atol, rtol = default[0] if atol is None else atol, default[1] if rtol is None else rtol
    return dev, bool(nan_ok.all()) and dev <= atol + rtol * scale


class _Hooks:
    """Forward hooks on every module. ``record`` keeps each call's batched outputs (cloned: later
    in-place layers overwrite them) and, for the modules in ``keep_inputs``, its inputs;
    ``compare`` measures each call's outputs against the recorded ones on the fly."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.handles = []
        self.mode = "record"
        self.keep_inputs: set[str] = set()
        self.tol = (0.0, 0.0)
        # (module, call, output) whose dim 0 turned out not to be the batch (it did not shrink to one
        # sample): a sequence-first RNN's output when L == N, say; skipped from then on
        self.unbatched: set[tuple[str, int, int]] = set()
        self.reset()
        for m, n in self.names.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(n), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(n)))

    def reset(self, mode: str = "record", ref=None, pick=None, on_dev=None):
        self.mode, self.ref, self.pick, self.on_dev = mode, ref, pick, on_dev
        self.outputs: dict[str, list[list[Tensor]]] = {}
        self.inputs: dict[str, list[tuple]] = {}
        self.counts: dict[str, int] = {}
        self.stack: list[str] = []

    def _pre(self, name):
        def hook(module, args, kwargs):
            self.stack.append(name)
            if self.mode == "record" and name in self.keep_inputs:  # cloned now: in-place layers overwrite inputs
                clone = lambda t: t.detach().clone()  # noqa: E731
                self.inputs.setdefault(name, []).append((_map(args, clone), _map(kwargs, clone)))
        return hook

    def _post(self, name):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            k = self.counts[name] = self.counts.get(name, 0) + 1
            outs = _leaves(output)
            if self.mode == "record":
                self.outputs.setdefault(name, []).append([t.detach().clone() for t in outs])
                return
            refs = self.ref.get(name, [])
            if k > len(refs):
                return  # more calls than in the batch: found by the call count
            for j, (ref, out) in enumerate(zip(refs[k - 1], outs)):
                if not (ref.dim() and ref.shape[0] == self.pick.size) or (name, k, j) in self.unbatched:
                    continue  # only tensors batched along dim 0
                picked = self.pick(ref)
                if out.dim() == 0 or out.shape[0] != picked.shape[0]:
                    self.unbatched.add((name, k, j))
                    continue
                self.on_dev(name, *_deviation(out.detach(), picked, *self.tol))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _Pick:
    """Selects from a full-batch reference the rows that correspond to another run's samples."""

    def __init__(self, size: int, index=None):
        self.size, self.index = size, index

    def __call__(self, ref: Tensor) -> Tensor:
        if self.index is None:
            return ref
        if isinstance(self.index, slice):
            return ref[self.index]
        return ref[self.index.to(ref.device)]


def check_batch_independence(
    model: nn.Module,
    example_batch,
    *,
    train: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> BatchIndependenceReport:
    """Does any sample's output depend on the other samples of its batch?

    Runs ``model`` (in train mode by default, where BatchNorm couples samples; ``train=False``
    checks eval mode) on ``example_batch`` (a tensor, or a tuple/list of tensors passed as
    positional arguments, batched along dim 0, at least 2 distinct samples), on each sample
    alone, and on the batch rolled by one. Forward hooks compare every module's outputs (the
    tensors whose dim 0 is the batch) across the runs; a deviation counts when
    ``max|out - ref| > atol + rtol * max|ref|`` (kernels sum in a different order for one sample
    than for a batch; by default atol, rtol = 1e-5, 1e-3 for float32 outputs, looser for half
    precision, see ``DEFAULT_TOLERANCES``; atol and rtol are numbers >= 0, and one left None
    takes its default while the other is used as given). Each module whose outputs moved is then re-run on its
    own recorded batch inputs, whole and one sample at a time, to tell the layers that couple samples themselves
    (``offender``) from those that merely sit downstream of one. A static scan names the
    batch-coupled layer types (:func:`batch_coupled_layers`).

    torch Dropout layers are put in eval mode for the check (they act per sample, but randomly);
    other randomness (e.g. DropPath) is detected by running the batch twice and reported as an
    error. The model's train/eval flags, its buffers (BatchNorm running statistics) and the global
    RNG state are restored; parameters are not touched. Every module's batch outputs are kept in
    memory during the check: use a few small samples.

    Returns a :class:`BatchIndependenceReport` (``.ok``, ``.rows``, ``.offenders``, ``str(report)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_batch_independence expects a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_batch) if isinstance(example_batch, (tuple, list)) else (example_batch,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("example_batch must be a tensor or a tuple/list of tensors batched along dim 0")
    N = args[0].shape[0] if args[0].dim() else 0
    if N < 2 or any(a.dim() == 0 or a.shape[0] != N for a in args):
        raise ValueError(
            f"example_batch needs at least 2 samples along dim 0 of every tensor, got shapes "
            f"{[tuple(a.shape) for a in args]}; e.g. torch.randn(4, 3, 64, 64)"
        )
    atol, rtol = _check_tolerance("atol", atol), _check_tolerance("rtol", rtol)
    report = BatchIndependenceReport("train" if train else "eval", N, atol, rtol,
                                     coupled_layers=batch_coupled_layers(model, train=train))
    if all(torch.equal(a[0], a[i]) for a in args for i in range(1, N)):
        report.notes.append("all samples are identical, so batch statistics equal per-sample ones; use distinct samples")

    modes = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    hooks = None
    try:
        model.train(train)
        dropouts = [m for m in model.modules() if isinstance(m, _DropoutNd) and m.training]
        for m in dropouts:
            m.eval()
        if dropouts:
            report.notes.append(f"{len(dropouts)} Dropout layer(s) were put in eval mode for the check")
        hooks = _Hooks(model)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _run_checks(model, args, N, hooks, report, seed)
    finally:
        if hooks is not None:
            hooks.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers and b.shape == buffers[n].shape:
                    b.copy_(buffers[n])
    return report


def _run_checks(model, args, N, hooks: _Hooks, report: BatchIndependenceReport, seed: int) -> None:
    tol = hooks.tol = (report.atol, report.rtol)
    modules = {n: m for m, n in hooks.names.items()}
    rows = {n: ModuleCheck(n, type(m).__name__) for n, m in modules.items()}

    def run(batch, mode="record", pick=None, on_dev=None, run_seed=seed):
        hooks.reset(mode, ref, pick, on_dev)
        torch.manual_seed(run_seed)
        model(*(a.clone() for a in batch))  # a model that works on its input in place must not change the caller's
        return hooks.counts

    def where() -> str:
        return f" (raised in {hooks.stack[-1] or '<root>'!r})" if hooks.stack else ""

    ref: dict = {}
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 - the model fails on this batch: nothing to compare
        report.errors.append(f"the model fails on the full batch{where()}: {type(e).__name__}: {e}")
        return
    ref = hooks.outputs
    for n, calls in ref.items():
        rows[n].calls = len(calls)
        rows[n].scale = max((float(t.abs().max()) for c in calls for t in c if t.numel() and t.is_floating_point()),
                            default=0.0)

    # Randomness left with Dropout off (DropPath, noise layers): two runs of the same batch must agree.
    random_modules: list[str] = []
    run(args, "compare", _Pick(N), lambda n, d, ok: ok or n in random_modules or random_modules.append(n),
        run_seed=seed + 1)
    if random_modules:
        first = random_modules[0]
        report.errors.append(
            f"outputs change between two runs of the same batch, first at {first or '<root>'!r} "
            f"({rows[first].type}): a random layer (e.g. DropPath); set its rate to 0 or check with train=False"
        )

    def record(attr):
        def on_dev(n, dev, ok):
            setattr(rows[n], attr, max(getattr(rows[n], attr), dev))
            rows[n].ok &= ok
        return on_dev

    def check_counts(counts, what):
        for n, calls in ref.items():
            if counts.get(n, 0) != len(calls):
                rows[n].ok = False
                rows[n].note = f"called {counts.get(n, 0)} time(s) {what}, {len(calls)} in the batch"

    for i in range(N):
        try:
            counts = run(tuple(a[i:i + 1] for a in args), "compare", _Pick(N, slice(i, i + 1)), record("alone"))
        except Exception as e:  # noqa: BLE001 - e.g. BatchNorm1d on a single sample in training
            report.errors.append(f"the model fails on sample {i} alone{where()}: {type(e).__name__}: {e}")
            for n in hooks.stack:
                rows[n].ok = False
            break
        check_counts(counts, "on one sample")
    perm = torch.roll(torch.arange(N), -1)
    counts = run(tuple(a[perm.to(a.device)] for a in args), "compare", _Pick(N, perm), record("shuffled"))
    check_counts(counts, "on the shuffled batch")

    # Name the layers that couple samples themselves: re-run each moved module (deepest first) on its own
    # batch inputs, whole and one sample at a time, unless a module inside it already explains it.
    suspects = [n for n in modules if (not rows[n].ok or report.errors) and not _per_sample_by_design(modules[n])]
    if not suspects:
        report.rows = [rows[n] for n in modules if n in ref]
        return
    hooks.keep_inputs = set(suspects)
    try:
        run(args)
    except Exception:  # noqa: BLE001 - it ran a moment ago; keep what was recorded
        pass
    inputs = hooks.inputs
    hooks.remove()  # the re-runs below must not trigger the recording hooks
    offenders: list[str] = []
    for n in sorted(suspects, key=lambda n: -(n.count(".") + 1 if n else 0)):
        if any(o.startswith(n + ".") for o in offenders) or (n == "" and offenders):
            continue
        dev, ok, note = _isolated(modules[n], inputs.get(n, []), N, tol, seed)
        if not ok:
            offenders.append(n)
            rows[n].offender, rows[n].ok = True, False
            rows[n].note = note or rows[n].note
    report.rows = [rows[n] for n in modules if n in ref]


# torch layers that act on each sample alone; a subclass may override forward, so exact torch classes only.
_PER_SAMPLE_MODULES = tuple(f"torch.nn.modules.{m}" for m in (
    "activation", "container", "conv", "dropout", "flatten", "instancenorm", "linear", "normalization", "padding",
    "pixelshuffle", "pooling", "sparse", "upsampling", "channelshuffle", "fold"))


def _per_sample_by_design(module: nn.Module) -> bool:
    """Known not to couple samples: the exact torch layer types above, and groupnorm's own layers."""
    return type(module).__module__ in _PER_SAMPLE_MODULES or type(module) in (GroupNorm, StdConv1d, StdConv2d, StdConv3d)


def _isolated(module, calls, N, tol, seed) -> tuple[float, bool, str]:
    """Re-run ``module`` on each recorded call's inputs: the whole batch vs. each sample alone."""
    worst, all_ok = 0.0, True
    clone = lambda t: t.clone()  # noqa: E731
    for args, kwargs in calls:
        torch.manual_seed(seed)
        try:
            ref = _leaves(module(*_map(args, clone), **_map(kwargs, clone)))
        except Exception as e:  # noqa: BLE001
            return float("inf"), False, f"fails when re-run on its own inputs: {type(e).__name__}: {e}"
        for i in range(N):
            one = lambda t, i=i: (t[i:i + 1] if t.dim() and t.shape[0] == N else t).clone()  # noqa: E731
            torch.manual_seed(seed)
            try:
                outs = _leaves(module(*_map(args, one), **_map(kwargs, one)))
            except Exception as e:  # noqa: BLE001 - e.g. BatchNorm1d needs more than one value per channel
                return float("inf"), False, f"fails on one sample alone: {type(e).__name__}: {e}"
            for r, o in zip(ref, outs):
                if r.dim() and r.shape[0] == N and o.dim() and o.shape[0] == 1:
                    dev, ok = _deviation(o, r[i:i + 1], *tol)
                    worst, all_ok = max(worst, dev), all_ok and ok
    return worst, all_ok, ""
