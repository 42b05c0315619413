"""NumPy reference: Group Normalization forward and its analytic backward, in float64.

Short enough to check by eye; every other backend is tested against it.

    xhat = (x - mean_g) / sqrt(var_g + eps)       per sample, per group of C/G channels
    z    = xhat * weight_c + bias_c
    y    = act(z)

Backward, with g = dy * act'(z) and M the number of elements in a group:

    dbias_c   = sum over (n, spatial) of g
    dweight_c = sum over (n, spatial) of g * xhat
    dxhat     = g * weight_c
    dx        = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "none":
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "silu":
        return z / (1.0 + np.exp(-z))
    if activation == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {activation!r}")


def activate_grad(z: np.ndarray, activation: str) -> np.ndarray:
    """d act(z) / dz."""
    if activation == "none":
        return np.ones_like(z)
    if activation == "relu":  # 1 at a NaN z, as torch's ReLU passes the gradient there
        return (~(z <= 0)).astype(z.dtype)
    if activation == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    raise ValueError(f"unknown activation {activation!r}")


def _grouped(a: np.ndarray, G: int) -> np.ndarray:
    N, C = a.shape[:2]
    return a.reshape(N, G, -1)  # (N, G, C/G * spatial), channels of a group are adjacent


def _per_channel(v, shape, dtype=np.float64) -> np.ndarray:
    C = shape[1]
    v = np.ones(C) if v is None else np.asarray(v, dtype)
    return v.reshape((1, C) + (1,) * (len(shape) - 2))


def normalize(x: np.ndarray, G: int, eps: float):
    """(xhat, mean, rstd) with mean and rstd of shape (N, G), all float64."""
    xg = _grouped(np.asarray(x, np.float64), G)
    with np.errstate(invalid="ignore"):  # NaN/inf stay in their own group
        mean = xg.mean(axis=2)
        var = ((xg - mean[..., None]) ** 2).mean(axis=2)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = (xg - mean[..., None]) * rstd[..., None]
    return xhat.reshape(x.shape), mean, rstd


def forward(x, weight, bias, G: int, eps: float, activation: str = "none"):
    """y, mean, rstd (float64)."""
    xhat, mean, rstd = normalize(x, G, eps)
    z = xhat * _per_channel(weight, x.shape)
    if bias is not None:
        z = z + _per_channel(bias, x.shape)
    return activate(z, activation), mean, rstd


def backward(dy, x, weight, bias, G: int, eps: float, activation: str = "none"):
    """dx, dweight, dbias (float64; dweight/dbias None when the parameter is None)."""
    _, mean, rstd = normalize(x, G, eps)
    return backward_from_stats(dy, x, weight, bias, mean, rstd, G, activation)


def backward_from_stats(dy, x, weight, bias, mean, rstd, G: int, activation: str = "none"):
    """The backward given the forward's per-(sample, group) mean and rstd, each (N, G)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    mean, rstd = np.asarray(mean, np.float64), np.asarray(rstd, np.float64)
    xhat = ((_grouped(x, G) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    w = _per_channel(weight, x.shape)
    z = xhat * w + (_per_channel(bias, x.shape) if bias is not None else 0.0)
    if activation == "relu":  # a select, as torch's threshold_backward: inf/NaN dy at a zeroed output give 0
        g = np.where(z <= 0.0, 0.0, dy)
    else:
        g = dy * activate_grad(z, activation)
    reduce_axes = (0,) + tuple(range(2, x.ndim))
    dweight = (g * xhat).sum(axis=reduce_axes) if weight is not None else None
    dbias = g.sum(axis=reduce_axes) if bias is not None else None
    dxhat = _grouped(g * w, G)
    xh = _grouped(xhat, G)
    dx = rstd[..., None] * (
        dxhat - dxhat.mean(axis=2, keepdims=True) - xh * (dxhat * xh).mean(axis=2, keepdims=True)
    )
    return dx.reshape(x.shape), dweight, dbias


class ReferenceBackend:
    """The NumPy oracle behind the dispatch interface (CPU tensors, any float dtype; slow)."""

    name = "reference"

    def available(self):
        return None

    def supports(self, x, activation):
        return x.device.type == "cpu"

    @staticmethod
    def _np(t):
        return None if t is None else t.detach().double().numpy()

    def forward(self, x, weight, bias, num_groups, eps, activation):
        import torch

        y, mean, rstd = forward(self._np(x), self._np(weight), self._np(bias), num_groups, eps, activation)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = torch.zeros(x.shape[0], num_groups, 3, dtype=torch.float64)
        stats[..., 0] = torch.from_numpy(mean)
        stats[..., 0] = stats[..., 0].to(stat_dtype).double()  # hi: mean rounded to the stats dtype
        stats[..., 1] = torch.from_numpy(mean) - stats[..., 0]  # lo: what the rounding lost
        stats[..., 2] = torch.from_numpy(rstd)
        out = torch.empty_like(x)
        out.copy_(torch.from_numpy(y))
        return out, stats.to(stat_dtype)

    def backward(self, dy, x, weight, bias, stats, num_groups, activation, output_mask):
        import torch

        st = stats.double()
        mean = (st[..., 0] + st[..., 1]).numpy()
        dx, dw, db = backward_from_stats(
            self._np(dy), self._np(x), self._np(weight), self._np(bias), mean, st[..., 2].numpy(), num_groups, activation
        )
        dx_t = torch.empty_like(x)
        dx_t.copy_(torch.from_numpy(dx))
        dw_t = None if dw is None else torch.from_numpy(dw).to(weight.dtype)
        db_t = None if db is None else torch.from_numpy(db).to(bias.dtype)
        return dx_t, dw_t, db_t


BACKEND = ReferenceBackend()
