"""Test helpers: inputs in every layout, tolerances per dtype, the oracle call."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from groupnorm import backends
from groupnorm.backends import reference

# (atol, rtol) of a result against the float64 oracle, scaled by the result's magnitude.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors here (numba once installed; triton only in its own tests)."""
    only = os.environ.get("GROUPNORM_TEST_BACKENDS")  # e.g. "composite,numba" to narrow a local run
    out = []
    for name in only.split(",") if only else ("composite", "numba", "reference"):
        b = backends.get(name)
        if b.available() is None:
            out.append(name)
    return out


def make_input(shape, dtype=torch.float32, layout="contiguous", mean=0.0, std=1.0, seed=0):
    """A random tensor of ``shape`` stored in ``layout`` ("contiguous" or "channels_last")."""
    g = torch.Generator().manual_seed(seed)
    N, C, *spatial = shape
    if layout == "channels_last":
        base = torch.randn(N, *spatial, C, dtype=torch.float64, generator=g) * std + mean
        x = base.to(dtype).movedim(-1, 1)
        assert x.movedim(1, -1).is_contiguous()
    else:
        x = (torch.randn(*shape, dtype=torch.float64, generator=g) * std + mean).to(dtype)
    return x


def oracle(x, w, b, G, eps, activation, dy=None):
    """Float64 NumPy reference: y, and (dx, dw, db) if dy is given."""
    npf = lambda t: None if t is None else t.detach().double().numpy()
    y, _, _ = reference.forward(npf(x), npf(w), npf(b), G, eps, activation)
    if dy is None:
        return torch.from_numpy(np.ascontiguousarray(y))
    dx, dw, db = reference.backward(npf(dy), npf(x), npf(w), npf(b), G, eps, activation)
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return torch.from_numpy(y), t(dx), t(dw), t(db)


def assert_close(actual, expected, dtype, what="", scale=None):
    atol, rtol = TOL[dtype]
    exp = expected.double()
    act = actual.detach().double()
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
    mag = float(exp.abs().max()) if exp.numel() else 0.0
    scale = max(1.0, mag) if scale is None else scale
    err = (act - exp).abs()
    bound = atol * scale + rtol * exp.abs()
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements off; max abs err {float(err.max()):.3g} "
            f"(scale {scale:.3g}); first bad flat index {i}: got {float(act.flatten()[i])}, expected {float(exp.flatten()[i])}"
        )


def run_fresh(code: str, marker: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh Python process (no state shared with this one); fail with its stderr
    unless it exits 0 and prints ``marker``. Returns its stdout."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and marker in done.stdout, done.stderr[-2000:]
    return done.stdout


def nonfinite_relu_case(layout, dtype=torch.float32):
    """x with a NaN in sample 1's group 1; dy with inf and NaN where torch's ReLU output is 0
    (and nowhere else), so every finite result of torch.nn.GroupNorm + ReLU stays finite; channel 6
    with weight and bias 0 (zero-init), so z is exactly 0 there and ReLU's gradient is 0 (z <= 0); sample 2's
    group 2 constant with bias 0, so z is exactly 0 there too, with a nonzero weight (dx must be 0)."""
    x = make_input((3, 8, 4, 4), torch.float64, layout, seed=3)
    x[1, 2, 0, 0] = float("nan")
    g = torch.Generator().manual_seed(4)
    w = 1 + 0.5 * torch.randn(8, dtype=torch.float64, generator=g)
    b = 0.5 * torch.randn(8, dtype=torch.float64, generator=g)
    w[6] = b[6] = 0.0
    x[2, 4:6] = 3.0
    b[4:6] = 0.0
    z = torch.nn.functional.group_norm(x, 4, w, b, 1e-5)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    off = (z <= 0).nonzero()  # positions whose ReLU output is 0 (a NaN z is not among them)
    dy[tuple(off[0])] = float("inf")
    dy[tuple(off[1])] = float("-inf")
    dy[tuple(off[2])] = float("nan")
    cast = lambda t: t.to(dtype).requires_grad_()
    return cast(x), cast(w), cast(b), dy.to(dtype)


def assert_like_torch_nonfinite(got, expected, what=""):
    """(y, dx, dweight, dbias) against torch's: the same NaN and inf positions, close elsewhere;
    nothing reaches channel 6's parameters through a ReLU whose input is exactly 0 there."""
    assert got[2][6] == 0 and got[3][6] == 0, f"{what}: ReLU passed a gradient at z == 0 (dweight, dbias of channel 6)"
    for name, ours, ref in zip(("y", "dx", "dweight", "dbias"), got, expected):
        ours = ours.detach().cpu()
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{what} {name}: NaN where torch has none, or the reverse"
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"{what} {name}: inf where torch has none, or the reverse"
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, equal_nan=True, msg=f"{what} {name} vs torch")
