"""Layers: GroupNorm (optionally with a fused activation), weight-standardized convolutions,
and the ``norm_layer`` factory for torchvision/timm-style model constructors.

Each layer is a thin shell over ``groupnorm.functional``: the constructor validates and
stores, ``reset_parameters`` initializes, ``forward`` calls the functional op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from groupnorm.functional import group_norm
from groupnorm.groups import resolve_groups


class GroupNorm(nn.Module):
    """Drop-in for ``torch.nn.GroupNorm`` (same parameters, buffers and state_dict keys).

    Args:
        num_groups: number of groups G; or None with ``group_size`` given.
        num_channels: number of channels C of the input (N, C, *).
        eps: added to the variance inside the square root.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        group_size: channels per group instead of ``num_groups`` (the paper's Table 3 ablation).
        activation: None, "relu", "silu" or "gelu", fused after the affine.
        policy: what to do when C is not divisible: "strict" (error), "divisor", "gcd"
            (see ``groupnorm.groups``). The G actually used is ``self.num_groups``.
        min_group_size: under "divisor"/"gcd", the fewest channels a group may get.
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "activation"]

    def __init__(
        self,
        num_groups: int | None = None,
        num_channels: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        group_size: int | None = None,
        activation: str | None = None,
        policy: str = "strict",
        min_group_size: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_channels is None:
            raise TypeError("GroupNorm needs num_channels, e.g. GroupNorm(32, 256) or GroupNorm(num_channels=256, group_size=16)")
        self.num_groups = resolve_groups(
            num_channels, num_groups, group_size=group_size, policy=policy, min_group_size=min_group_size
        )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}; the usual value is 1e-5")
        if activation not in (None, "none", "relu", "silu", "gelu"):
            raise ValueError(f"activation must be None, 'relu', 'silu' or 'gelu', got {activation!r}")
        self.num_channels = num_channels
        self.requested_groups = num_groups
        self.group_size = group_size
        self.policy = policy
        self.eps = float(eps)
        self.affine = affine
        self.activation = None if activation == "none" else activation
        if affine:
            factory = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            self.bias = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm(num_channels={self.num_channels}) got an input with {input.shape[1]} channels "
                f"(shape {tuple(input.shape)}); the channel axis is dim 1 (N, C, *)"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        s = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if self.group_size is not None:
            s += f", group_size={self.group_size}"
        if self.requested_groups is not None and self.requested_groups != self.num_groups:
            s += f", requested_groups={self.requested_groups}, policy={self.policy!r}"
        if self.activation:
            s += f", activation={self.activation!r}"
        return s


class norm_layer:
    """A factory usable as ``norm_layer=`` of torchvision/timm-style models.

    ``norm_layer(32)(256)`` builds ``GroupNorm(32, 256)``. Extra keyword arguments at call
    time (e.g. ``eps`` from timm) override the factory's. Picklable, with a readable repr.
    """

    def __init__(
        self,
        num_groups: int | None = 32,
        *,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = None,
        policy: str = "strict",
        min_group_size: int = 1,
    ) -> None:
        if group_size is not None:
            num_groups = None
        self.kwargs = dict(
            num_groups=num_groups,
            group_size=group_size,
            eps=eps,
            affine=affine,
            activation=activation,
            policy=policy,
            min_group_size=min_group_size,
        )
        resolve_groups(max(num_groups or 1, group_size or 1), num_groups, group_size=group_size, policy="gcd")  # validate early

    def __call__(self, num_channels: int, **overrides) -> GroupNorm:
        kwargs = {**self.kwargs, **overrides}
        return GroupNorm(num_channels=num_channels, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None)
        return f"groupnorm.norm_layer({args})"


# ----------------------------------------------------------------------------- weight standardization
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
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = float(eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)

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
