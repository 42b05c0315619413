"""Spot measurements quoted in BENCHMARKS.md (session 3) that `groupnorm bench` does not make.

    python scripts/spot_checks.py silu                     # the float32 SiLU loop, 1M elements, one thread
    python scripts/spot_checks.py large-mean               # ATen vs groupnorm error at a large mean (float32)
    python scripts/spot_checks.py paths 32 1024 14 14      # fwd+bwd: fast lane vs Python path vs torch

silu: medians of 20 calls of a jitted loop over ``cpu._silu`` (the fused activation of the numba
kernels); run it from two checkouts (e.g. a ``git worktree``) to compare versions.
large-mean: max |error| against float64 of torch.nn.functional.group_norm and groupnorm.group_norm on
float32 input of mean 1e3/1e4/1e5 and std 0.1, both layouts, G = 8.
paths: one layer's forward+backward through the compiled fast lane, the Python path and
torch.nn.GroupNorm, alternated with the order rotated every round; medians in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.backends import cpu


def silu() -> None:
    @numba.njit(error_model="numpy")
    def loop(x, y):
        k = cpu._consts(x)
        for i in range(x.shape[0]):
            y[i] = cpu._silu(x[i], k)

    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    y = np.empty_like(x)
    loop(x, y)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        loop(x, y)
        times.append(time.perf_counter() - t)
    print(f"SiLU over {x.size} float32, one thread: median {statistics.median(times) * 1e3:.3f} ms")


def large_mean() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 32, 4, 4), (2, 64, 16, 16), (2, 512, 7, 7)]:
        for mean in (1e3, 1e4, 1e5):
            x = torch.randn(shape, dtype=torch.float64, generator=g) * 0.1 + mean
            exact = F.group_norm(x, 8, eps=1e-5)
            for layout in ("contiguous", "channels_last"):
                xf = x.float() if layout == "contiguous" else x.float().to(memory_format=torch.channels_last)
                aten = float((F.group_norm(xf, 8, eps=1e-5).double() - exact).abs().max())
                ours = float((groupnorm.group_norm(xf, 8).double() - exact).abs().max())
                print(f"{str(shape):16s} mean {mean:7.0e} {layout:13s} max error: torch {aten:.2e}, groupnorm {ours:.2e}")


def paths(shape: tuple, threads: int, rounds: int) -> None:
    from groupnorm.backends import native  # not in older checkouts: silu/large-mean run there too

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    ours, ref = groupnorm.GroupNorm(32, shape[1]), torch.nn.GroupNorm(32, shape[1])

    def run(layer, lane):
        def f():
            native.enabled = lane
            torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], dy)
        return f

    variants = {"fast lane": run(ours, True), "Python path": run(ours, False), "torch": run(ref, True)}
    samples = {k: [] for k in variants}
    for f in variants.values():
        f()
    names = list(variants)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - t)
    native.enabled = True
    print(f"{shape}, {threads} thread(s), fwd+bwd medians of {rounds}: "
          + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in samples.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["silu", "large-mean", "paths"])
    p.add_argument("shape", type=int, nargs="*", default=[32, 1024, 14, 14])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    if a.what == "silu":
        silu()
    elif a.what == "large-mean":
        large_mean()
    else:
        paths(tuple(a.shape), a.threads, a.rounds)


if __name__ == "__main__":
    main()
