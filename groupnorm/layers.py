"""Layers: GroupNorm (optionally with a fused activation), weight-standardized convolutions,
and the ``norm_layer`` factory for torchvision/timm-style model constructors.

Each layer is a thin shell over ``groupnorm.functional``: the constructor validates and
stores, ``reset_parameters`` initializes, ``forward`` calls the functional op.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from groupnorm.functional import _is_expanded_weight, _tracing_state, eps_error, group_norm, quiet_trace_checks
from groupnorm.groups import check_request, resolve_groups


def _layer_group_norm(input, num_channels, num_groups, weight, bias, eps, activation):
    if input.dim() >= 2 and input.shape[1] != num_channels:
        raise ValueError(
            f"GroupNorm(num_channels={num_channels}) got an input with {input.shape[1]} channels "
            f"(shape {tuple(input.shape)}); the channel axis is dim 1 (N, C, *)"
        )
    return group_norm(input, num_groups, weight, bias, eps, activation=activation)


_is_scripting = torch.jit.is_scripting  # bound once: GroupNorm.forward asks it on every eager call

# torch.fx.symbolic_trace (and feature extractors built on it) keep this call as one node
torch.fx.wrap("_layer_group_norm")


def _check_eps(eps, usual: str = "1e-5") -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < eps < math.inf):
        raise eps_error(eps, usual)


def _check_eps_activation(eps, activation) -> None:
    _check_eps(eps)
    _check_activation(activation)


def _check_activation(activation) -> None:
    if activation not in (None, "none", "relu", "silu", "gelu"):
        raise ValueError(f"activation must be None, 'relu', 'silu' or 'gelu', got {activation!r}")


class GroupNorm(nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm`` (a subclass: same parameters, state_dict keys,
    positional arguments and ``isinstance`` checks), running ``groupnorm.group_norm``.

    Args:
        num_groups: number of groups G; or None with ``group_size`` given.
        num_channels: number of channels C of the input (N, C, *).
        eps: added to the variance inside the square root.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        bias: with ``affine``, False learns the scale only (as torch's keyword-only ``bias``).
        group_size: channels per group instead of ``num_groups`` (the paper's Table 3 ablation).
        activation: None, "relu", "silu" or "gelu", fused after the affine.
        policy: what to do when C is not divisible: "strict" (error), "divisor", "gcd"
            (see ``groupnorm.groups``). The G actually used is ``self.num_groups``.
        min_group_size: under "divisor"/"gcd", the fewest channels a group may get (default 2, as
            ``convert_batchnorm``; "strict" never changes an exact request).
        device, dtype: of the parameters (positional, as in torch).
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "activation"]

    def __init__(
        self,
        num_groups: int | None = None,
        num_channels: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        group_size: int | None = None,
        activation: str | None = None,
        policy: str = "strict",
        min_group_size: int = 2,
    ) -> None:
        if num_channels is None:
            raise TypeError("GroupNorm needs num_channels, e.g. GroupNorm(32, 256) or GroupNorm(num_channels=256, group_size=16)")
        groups = resolve_groups(num_channels, num_groups, group_size=group_size, policy=policy, min_group_size=min_group_size)
        num_channels = int(num_channels)  # numpy integers, checked by resolve_groups
        _check_eps_activation(eps, activation)
        super().__init__(groups, num_channels, float(eps), affine, device=device, dtype=dtype)
        if affine and not bias:  # torch's keyword-only bias=False (also on torch versions without it)
            self.register_parameter("bias", None)
        self.requested_groups = num_groups
        self.group_size = group_size
        self.policy = policy
        self.activation = None if activation == "none" else activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _is_scripting():
            return self._scripted_forward(input)
        return self._eager_forward(input)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch.jit.script's forward: the registered op (checked; loads wherever groupnorm is imported)."""
        act = "none" if self.activation is None else self.activation
        return torch.ops.groupnorm.forward(input, self.weight, self.bias, self.num_groups, self.eps, act, "")[0]

    @torch.jit.unused
    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        if _tracing_state() is not None:  # torch.jit.trace: checked as eager calls are, without TracerWarnings
            with quiet_trace_checks():
                return _layer_group_norm(
                    input, self.num_channels, self.num_groups, self.weight, self.bias, self.eps, self.activation
                )
        if type(input) is torch.Tensor and input.dim() >= 2 and input.shape[1] == self.num_channels:
            p = self._parameters
            if type(self) in _PLAIN_LAYERS and "weight" in p and "bias" in p:
                # the Parameters straight from their dict: self.weight goes through Module.__getattr__,
                # which cost tiny calls ~20% (25 against 32 us a forward); subclasses (parametrize
                # swaps the class in) and weight_norm-style layers (weight moved out of the dict)
                # keep the attribute lookup
                weight, bias = p["weight"], p["bias"]
            else:
                weight, bias = self.weight, self.bias
            return group_norm(input, self.num_groups, weight, bias, self.eps, activation=self.activation)
        # fx proxies (kept as one node), and the layer's own error for a wrong channel count
        return _layer_group_norm(
            input, self.num_channels, self.num_groups, self.weight, self.bias, self.eps, self.activation
        )

    def extra_repr(self) -> str:
        s = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}"
        if self.group_size is not None:
            s += f", group_size={self.group_size}"
            if self.num_channels // self.num_groups != self.group_size:
                s += f" (used: {self.num_channels // self.num_groups}), policy={self.policy!r}"
        if self.requested_groups is not None and self.requested_groups != self.num_groups:
            s += f", requested_groups={self.requested_groups}, policy={self.policy!r}"
        if self.activation:
            s += f", activation={self.activation!r}"
        return s


class GroupNormAct(GroupNorm):
    """GroupNorm followed by child modules (run in registration order), for what GroupNorm does not
    fuse: timm's norm+act layers with a ``drop`` (dropout/DropBlock) before the activation, or an
    activation other than ReLU, SiLU and exact GELU. ``weight``/``bias`` stay top-level, so
    state_dict keys match a BatchNorm's or GroupNorm's affine keys.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # not super().forward(): TorchScript does not take super()
        x = self._scripted_forward(input) if _is_scripting() else self._eager_forward(input)
        for child in self.children():
            x = child(x)
        return x


_PLAIN_LAYERS = (GroupNorm, GroupNormAct)


def fused_activation(module: nn.Module) -> str | None:
    """The ``activation=`` string GroupNorm fuses in place of ``module``, or None if it cannot."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(module))


_ACTIVATION_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
_ACTIVATION_NAMES = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}  # timm's string names

_BATCHNORM_ONLY = ("momentum", "track_running_stats")
_BATCHNORM_POSITIONAL = ("eps", "momentum", "affine", "track_running_stats")  # after num_features


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _resolve_act_layer(act_layer):
    """timm's ``act_layer`` (a class, partial, function or one of the names GroupNorm fuses) as a
    callable that builds the activation module."""
    if isinstance(act_layer, str):
        name = _ACTIVATION_NAMES.get(act_layer.replace("_", "").lower())
        if name is None:
            raise ValueError(
                f"act_layer={act_layer!r}: as a string only {sorted(_ACTIVATION_NAMES)} are known here; "
                f"pass the module class instead, e.g. act_layer=timm.layers.get_act_layer({act_layer!r})"
            )
        return _ACTIVATION_MODULES[name]
    if not callable(act_layer):
        raise TypeError(f"act_layer must be an activation class, a callable building one, or a name, got {act_layer!r}")
    return act_layer


def _timm_activation(act_layer, act_kwargs: dict) -> nn.Module:
    module = _resolve_act_layer(act_layer)(**act_kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"act_layer={act_layer!r} built {type(module).__name__}, not an nn.Module")
    return module


def group_norm_layer(
    num_channels: int | None = None,
    *args,
    num_features: int | None = None,
    apply_act: bool | None = None,
    act_layer=None,
    act_kwargs=_UNSET,
    drop_layer=_UNSET,
    inplace=_UNSET,
    **kwargs,
) -> GroupNorm:
    """Build ``GroupNorm(num_channels=..., **kwargs)`` the way model code calls its norm layer.

    - BatchNorm call forms: ``num_features=`` for the channel count, BatchNorm's positional order
      (eps, momentum, affine, track_running_stats), BatchNorm-only arguments (``momentum``,
      ``track_running_stats``) ignored.
    - timm's norm+act call forms (``get_norm_act_layer`` users: ConvNormAct, EfficientNet/MobileNet
      blocks, ResNetV2/BiT, CSPNet, RegNet, ...): ``apply_act=False`` gives no activation;
      ``act_layer`` (+ ``act_kwargs``) names it; a ``drop_layer`` runs between the norm and the
      activation (a :class:`GroupNormAct`). ReLU, SiLU and exact GELU are fused, any other activation
      is kept as a child module; ``inplace`` is ignored. timm passes ``act_layer`` only to its own
      classes, so a factory used as a timm norm+act layer must say its activation:
      ``norm_layer(32, activation="relu")`` (``"none"`` for none). A call that can only come from a
      norm+act caller (``apply_act=True``, or ``inplace``, ``act_kwargs`` or ``drop_layer`` given)
      raises without it, instead of silently dropping the model's activation.
    """
    if (num_channels is None) == (num_features is None):
        raise TypeError("norm layer needs the channel count once, e.g. norm_layer(256) or norm_layer(num_features=256)")
    if len(args) > len(_BATCHNORM_POSITIONAL):
        raise TypeError(f"norm layer takes at most {len(_BATCHNORM_POSITIONAL) + 1} positional arguments "
                        f"(num_features, {', '.join(_BATCHNORM_POSITIONAL)}), got {len(args) + 1}")
    kwargs.update(zip(_BATCHNORM_POSITIONAL, args))
    for key in _BATCHNORM_ONLY:
        kwargs.pop(key, None)
    channels = num_channels if num_features is None else num_features
    norm_act_call = apply_act is not None or any(v is not _UNSET for v in (act_kwargs, drop_layer, inplace))
    act_kwargs = {} if act_kwargs is _UNSET or act_kwargs is None else dict(act_kwargs)
    drop_layer = None if drop_layer is _UNSET else drop_layer
    activation = kwargs.pop("activation", _UNSET)
    if activation is not _UNSET:
        _check_activation(activation)
        activation = None if activation == "none" else activation
    act_module = None
    if apply_act is False:
        activation = None
    elif act_layer is not None:
        act_module = _timm_activation(act_layer, act_kwargs)
        fused = fused_activation(act_module)
        if activation is not _UNSET and activation != fused:
            raise ValueError(
                f"the factory says activation={activation!r} but the model asks for act_layer={act_layer!r}; "
                "leave the factory's activation unset to follow the model"
            )
        if fused is not None and drop_layer is None:
            activation, act_module = fused, None
        else:
            activation = None
    elif activation is _UNSET:
        if norm_act_call:
            raise TypeError(
                f"norm layer for {channels} channels was called as timm's norm+act layer without an activation: "
                "timm passes act_layer only to its own classes, so this layer cannot know the model's activation. "
                "Say it in the factory, e.g. groupnorm.norm_layer(32, activation='relu') ('silu' for SiLU/Swish "
                "models such as EfficientNet, 'gelu', or 'none' for no activation), or for another activation "
                "groupnorm.norm_layer(32, act_layer=nn.LeakyReLU). A model that mixes activations (MobileNetV3) "
                "cannot say which one per layer through timm's norm_layer: convert its BatchNorms instead "
                "(groupnorm.convert_batchnorm keeps each layer's own activation)"
            )
        activation = None
    elif activation is not None and set(act_kwargs) - {"inplace"}:
        raise ValueError(f"act_kwargs={act_kwargs!r} cannot be applied to the fused activation {activation!r}")
    if drop_layer is None and act_module is None:
        return GroupNorm(num_channels=channels, activation=activation, **kwargs)
    # timm's order: norm, drop, act; an activation after a drop is not fused
    if drop_layer is not None and activation is not None:
        act_module, activation = _ACTIVATION_MODULES[activation](), None
    layer = GroupNormAct(num_channels=channels, activation=activation, **kwargs)
    if drop_layer is not None:
        layer.add_module("drop", drop_layer())
    if act_module is not None:
        layer.add_module("act", act_module)
    return layer


def norm_layer(
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    eps: float = 1e-5,
    affine: bool = True,
    activation: str | None = _UNSET,  # type: ignore[assignment]
    act_layer=None,
    act_kwargs: dict | None = None,
    policy: str = "strict",
    min_group_size: int = 2,
) -> functools.partial:
    """A ``norm_layer=`` factory for torchvision/timm-style models: called with the channel count.

    ``norm_layer(32)(256)`` builds ``GroupNorm(32, 256)``; ``norm_layer(group_size=16)`` gives 16
    channels per group in every layer; with neither, G = 32 (the paper's default). Keyword
    arguments at call time (e.g. ``eps`` from timm) override the factory's. It is a
    ``functools.partial`` of a plain function, so timm's ``get_norm_layer`` and
    ``get_norm_act_layer`` accept it and it pickles.

    ``activation`` ("relu", "silu", "gelu" fused after the norm, or "none"): leave it unset for
    plain norm layers. Where timm wants a norm+act layer (``get_norm_act_layer``: ConvNormAct,
    ResNetV2/BiT, CSPNet, RegNet, ...) set it to the model's activation; timm's ``apply_act=False``
    calls then get none (see :func:`group_norm_layer`). For an activation GroupNorm does not fuse,
    give ``act_layer`` (and ``act_kwargs``) instead, e.g. ``act_layer=nn.LeakyReLU``: it runs as a
    child module after the norm.
    """
    if num_groups is None and group_size is None:
        num_groups = 32
    # validate the request now rather than at the first layer
    check_request(num_groups, group_size, policy, min_group_size, example="norm_layer(group_size=16) or norm_layer(32)")
    _check_eps_activation(eps, None if activation is _UNSET else activation)
    kwargs = dict(eps=eps, affine=affine, policy=policy, min_group_size=min_group_size)
    if activation is not _UNSET:
        kwargs["activation"] = activation
    if act_layer is not None:
        if activation is not _UNSET:
            raise TypeError("give activation= (fused: 'relu', 'silu', 'gelu') or act_layer= (any module), not both")
        act_layer = _resolve_act_layer(act_layer)  # checked now, not at the first layer
        # bound into act_layer: timm's ConvNormAct calls with act_kwargs=None, which would replace them
        kwargs["act_layer"] = functools.partial(act_layer, **act_kwargs) if act_kwargs else act_layer
    elif act_kwargs is not None:
        raise TypeError("act_kwargs needs act_layer, e.g. norm_layer(32, act_layer=nn.LeakyReLU, act_kwargs={'negative_slope': 0.1})")
    kwargs["num_groups" if group_size is None else "group_size"] = num_groups if group_size is None else group_size
    return functools.partial(group_norm_layer, **kwargs)


# ----------------------------------------------------------------------------- weight standardization
def conv_fan_in(conv: nn.Module) -> int:
    """Weights per output filter of a convolution: what weight standardization averages over."""
    return (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(w - mean) / sqrt(var + eps) per output filter, biased variance over (in/groups, *kernel)."""
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(var + eps)


class _StdConvMixin:
    """Weight Standardization (Qiao et al. 2019): the conv uses standardized weights.

    Variance is biased (divide by fan-in), eps sits inside the square root. The stored
    ``weight`` stays the raw parameter, so state_dicts match ``nn.ConvNd``.
    """

    def _std_init(self, eps: float) -> None:
        _check_eps(eps, usual="1e-6")
        if conv_fan_in(self) == 1:
            raise ValueError(
                f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"groups={self.groups}) has one weight per output filter: standardized, it is always 0 and the "
                f"layer outputs only its bias; use a plain nn.{type(self).__name__[3:]} for it"
            )
        self.eps = float(eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if _is_expanded_weight(weight):
            raise RuntimeError(
                f"{type(self).__name__} cannot run under torch's ExpandedWeights (Opacus' grad_sample_mode='ew'): "
                "they differentiate only the torch functions they know (conv, linear, the norms) with respect to "
                "the parameter given to them, and this layer standardizes its weight before the conv; use Opacus' "
                "default grad_sample_mode='hooks' (or 'functorch'), which give this layer's per-sample gradients"
            )
        return self._conv_forward(input, standardize_weight(weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"

    @classmethod
    def from_conv(cls, conv, eps: float = 1e-6):
        """A StdConv with ``conv``'s settings and its parameters (copied bitwise)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            eps=eps,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new


class StdConv1d(_StdConvMixin, nn.Conv1d):
    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self._std_init(eps)


class StdConv2d(_StdConvMixin, nn.Conv2d):
    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self._std_init(eps)


class StdConv3d(_StdConvMixin, nn.Conv3d):
    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self._std_init(eps)
