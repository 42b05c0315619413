"""Per-sample gradients of ``groupnorm.GroupNorm`` for Opacus (differential privacy).

Opacus computes per-sample gradients with a grad sampler registered per layer type, and
falls back to ``torch.func`` for unknown types; our layer's kernels are opaque to
``torch.func``, so this module registers a grad sampler for :class:`groupnorm.GroupNorm`
and :class:`groupnorm.convert.GroupNormAct`. Importing it registers them (Opacus is an
optional dependency; it is imported here only)::

    import groupnorm.opacus_support  # noqa: F401

``convert_batchnorm`` also calls :func:`register` when Opacus is already imported.

Since GroupNorm normalizes each sample on its own, the gradient of sample n's loss with
respect to gamma is sum over (H, W) of x_hat[n] * dL/dy_pre[n] and with respect to beta is
sum of dL/dy_pre[n], where y_pre = gamma * x_hat + beta is the output before the fused
activation (and before a GroupNormAct's children, which are differentiated through).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.dropout import _DropoutNd

from groupnorm.functional import group_norm
from groupnorm.layers import GroupNorm

_ACTIVATIONS = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu}
_registered = False


def per_sample_grads(layer: GroupNorm, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus grad sampler: {parameter: per-sample gradient of shape (N, C)} for ``layer``."""
    x = activations[0].detach()
    N, C = x.shape[:2]
    xhat = group_norm(x, layer.num_groups, None, None, layer.eps)
    children = list(layer.children())
    random = [c for c in children if isinstance(c, _DropoutNd) and c.training and c.p > 0]
    if random:
        raise RuntimeError(
            f"per-sample gradients of {type(layer).__name__} need its children re-run, and its "
            f"{type(random[0]).__name__}(p={random[0].p}) would draw a different mask than the forward pass did, "
            "giving wrong per-sample gradients; set its rate to 0 (e.g. the BatchNorm's drop= argument) "
            "or replace it with nn.Identity before making the model private"
        )
    if layer.activation is None and not children:
        dpre = backprops
    else:  # differentiate the activation and the children at this layer's pre-activation output
        with torch.enable_grad():
            shape = (1, C) + (1,) * (x.dim() - 2)
            pre = xhat if layer.weight is None else xhat * layer.weight.detach().view(shape)
            if layer.bias is not None:  # GroupNorm(..., bias=False): scale only
                pre = pre + layer.bias.detach().view(shape)
            pre = pre.detach().requires_grad_()
            out = _ACTIVATIONS[layer.activation](pre) if layer.activation else pre.clone()  # children may be in-place
            for child in children:
                out = child(out)
            (dpre,) = torch.autograd.grad(out, pre, backprops)
    grads = {}
    if layer.weight is not None and layer.weight.requires_grad:
        grads[layer.weight] = (xhat * dpre).reshape(N, C, -1).sum(2).to(layer.weight.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = dpre.reshape(N, C, -1).sum(2).to(layer.bias.dtype)
    return grads


def register() -> None:
    """Register :func:`per_sample_grads` with Opacus for GroupNorm and GroupNormAct (idempotent)."""
    global _registered
    if _registered:
        return
    from opacus.grad_sample import register_grad_sampler

    from groupnorm.convert import GroupNormAct

    register_grad_sampler([GroupNorm, GroupNormAct])(per_sample_grads)
    _registered = True


register()
