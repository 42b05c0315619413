"""Composite backend: GroupNorm from PyTorch tensor ops, on any device, the fallback.

Layouts are read through views: an NC* tensor as (N, G, C/G, S), a channels-last tensor
as (N, S, G, C/G); neither view copies. Statistics use a shifted two-pass scheme in
float32 (float64 for float64 input): a first pass gives the mean, rounded to the stats
dtype, as the shift ``hi``; the second pass sums ``d = x - hi`` (exact by Sterbenz when the
mean is large against the spread) for ``lo = mean(d)`` and ``var = mean(d^2) - lo^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is stored channels-last (N, *spatial, C) and not plainly contiguous."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


class _Layout:
    """Grouped views of one tensor layout: reduce dims, per-channel and per-group shapes."""

    def __init__(self, x: torch.Tensor, G: int):
        self.shape = x.shape
        self.N, self.C = x.shape[:2]
        self.G, self.Cg = G, self.C // G
        self.channels_last = is_channels_last(x)
        if self.channels_last:  # (N, S, G, Cg)
            self.group_dims, self.channel_dims = (1, 3), (0, 1)
            self.param_shape, self.stat_shape = (1, 1, G, self.Cg), (self.N, 1, G, 1)
        else:  # (N, G, Cg, S)
            self.group_dims, self.channel_dims = (2, 3), (0, 3)
            self.param_shape, self.stat_shape = (1, G, self.Cg, 1), (self.N, G, 1, 1)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return t.movedim(1, -1).reshape(self.N, -1, self.G, self.Cg)
        return t.reshape(self.N, self.G, self.Cg, -1)

    def unview(self, v: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            spatial = self.shape[2:]
            return v.reshape(self.N, *spatial, self.C).movedim(-1, 1)
        return v.reshape(self.shape)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    raise ValueError(f"unknown activation {activation!r}")


def activate_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return torch.ones_like(z)
    if activation == "relu":  # 1 at a NaN z, as torch's ReLU passes the gradient there
        return (~(z <= 0)).to(z.dtype)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    raise ValueError(f"unknown activation {activation!r}")


def compute_stats(xv: torch.Tensor, lay: _Layout, eps: float) -> torch.Tensor:
    """(N, G, 3) = (mean_hi, mean_lo, rstd) of the grouped view xv (already in stats dtype)."""
    hi = xv.mean(dim=lay.group_dims, keepdim=True)
    d = xv - hi
    lo = d.mean(dim=lay.group_dims, keepdim=True)
    var = (d * d).mean(dim=lay.group_dims, keepdim=True) - lo * lo
    rstd = torch.rsqrt(var.clamp_min(0) + eps)
    return torch.stack([hi.reshape(lay.N, lay.G), lo.reshape(lay.N, lay.G), rstd.reshape(lay.N, lay.G)], dim=-1)


def _xhat(xv: torch.Tensor, stats: torch.Tensor, lay: _Layout) -> torch.Tensor:
    hi, lo, rstd = (stats[..., i].reshape(lay.stat_shape) for i in range(3))
    return ((xv - hi) - lo) * rstd


def _affine(xhat, weight, bias, lay):
    z = xhat
    if weight is not None:
        z = z * weight.to(xhat.dtype).reshape(lay.param_shape)
    if bias is not None:
        z = z + bias.to(xhat.dtype).reshape(lay.param_shape)
    return z


class CompositeBackend:
    name = "composite"

    def available(self):
        return None

    def supports(self, x, activation):
        return x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def forward(self, x, weight, bias, num_groups, eps, activation):
        lay = _Layout(x, num_groups)
        sd = stats_dtype(x.dtype)
        xv = lay.view(x).to(sd)
        stats = compute_stats(xv, lay, eps)
        y = activate(_affine(_xhat(xv, stats, lay), weight, bias, lay), activation)
        return lay.unview(y.to(x.dtype)), stats

    def backward(self, dy, x, weight, bias, stats, num_groups, activation, output_mask):
        lay = _Layout(x, num_groups)
        sd = stats_dtype(x.dtype)
        xv = lay.view(x).to(sd)
        g = lay.view(dy).to(sd)
        xhat = _xhat(xv, stats.to(sd), lay)
        if activation == "relu":  # torch's threshold_backward: a select, so inf/NaN in dy at a zeroed output give 0
            g = torch.where(_affine(xhat, weight, bias, lay) <= 0, torch.zeros_like(g), g)
        elif activation != "none":
            g = g * activate_grad(_affine(xhat, weight, bias, lay), activation)
        dweight = dbias = dx = None
        if weight is not None and output_mask[1]:
            dweight = (g * xhat).sum(dim=lay.channel_dims).reshape(lay.C).to(weight.dtype)
        if bias is not None and output_mask[2]:
            dbias = g.sum(dim=lay.channel_dims).reshape(lay.C).to(bias.dtype)
        if output_mask[0]:
            dxhat = g * weight.to(sd).reshape(lay.param_shape) if weight is not None else g
            m1 = dxhat.mean(dim=lay.group_dims, keepdim=True)
            m2 = (dxhat * xhat).mean(dim=lay.group_dims, keepdim=True)
            rstd = stats[..., 2].to(sd).reshape(lay.stat_shape)
            dx = lay.unview((rstd * (dxhat - m1 - xhat * m2)).to(x.dtype))
        return dx, dweight, dbias


BACKEND = CompositeBackend()
