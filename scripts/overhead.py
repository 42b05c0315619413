"""Where a small GroupNorm call spends its time, layer by layer, against torch.nn.functional.group_norm.

    python scripts/overhead.py                 # (8, 16, 7, 7), G = 2, one thread
    python scripts/overhead.py --shape 2 32 4 4 --groups 8

Times (in-process medians of interleaved rounds) the numba kernel alone, the backend object, the
dispatch (`_forward_impl`), the `autograd.Function`, the public `group_norm` with and without
autograd on the Python path, the compiled fast lane (`groupnorm.backends.native`) alone, its C++
front (argument checks in C++) alone, through `group_norm` and through a `GroupNorm` layer, and
torch's native kernel, `F.group_norm` and `nn.GroupNorm`; then forward+backward of ours (both
paths) and torch's.
Also prints two machine-speed probes (a pure-Python loop, a tiny torch op), since per-call cost
follows them. To compare two versions, run it from two checkouts (e.g. a `git worktree`) with
PYTHONPATH pointing at each, alternating a few times.
"""

from __future__ import annotations

import argparse
import collections
import time

import numba
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import functional as fn
from groupnorm.backends import cpu, native


def medians(cases: dict, rounds: int, calls: int) -> dict:
    for f in cases.values():
        for _ in range(max(10, calls // 5)):
            f()
    samples = collections.defaultdict(list)
    for _ in range(rounds):
        for name, f in cases.items():
            t = time.perf_counter()
            for _ in range(calls):
                f()
            samples[name].append((time.perf_counter() - t) / calls * 1e6)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[8, 16, 7, 7])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=500)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    numba.set_num_threads(a.threads)
    shape, G = tuple(a.shape), a.groups
    N, C = shape[:2]
    S = torch.Size(shape[2:]).numel()

    t = time.perf_counter()
    s = 0
    for i in range(5_000_000):
        s += i
    loop = time.perf_counter() - t
    small = torch.randn(10)
    tiny = medians({"add": lambda: small.add(1)}, 5, 20000)["add"]
    print(f"machine: 5M-iteration Python loop {loop:.2f} s; tiny torch.add {tiny:.1f} us; "
          f"torch {torch.__version__}, numba {numba.__version__}, {a.threads} thread(s)")

    x = torch.randn(*shape, requires_grad=True)
    w = torch.ones(C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    dy = torch.randn(shape)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    y0 = torch.empty_like(xd)
    st0 = torch.empty(N, G, 3)
    kernel = cpu._forward_cl if not xd.is_contiguous() else cpu._forward_nc
    args = (cpu._flat(xd), cpu._flat(y0), wd.numpy(), bd.numpy(), st0.numpy().ravel(), N, C, S, G, 1e-5, 0, 0)

    lane = native.status() is None
    if not lane:
        print(f"native fast lane off: {native.status()}")

    def python_path(f):  # the same call with the fast lane turned off
        def g():
            native.enabled = False
            try:
                return f()
            finally:
                native.enabled = lane
        return g

    forward = {
        "numba kernel alone": lambda: kernel(*args),
        "backend.forward": lambda: cpu.BACKEND.forward(xd, wd, bd, G, 1e-5, "none"),
        "_forward_impl (dispatch)": lambda: fn._forward_impl(xd, wd, bd, G, 1e-5, "none", ""),
        "autograd.Function.apply": lambda: fn._EagerGroupNorm.apply(x, w, b, G, 1e-5, "none", ""),
        "group_norm, no autograd, py": python_path(lambda: groupnorm.group_norm(xd, G, wd, bd)),
        "group_norm, autograd, py": python_path(lambda: groupnorm.group_norm(x, G, w, b)),
        "torch native kernel": lambda: torch.native_group_norm(xd, wd, bd, N, C, S, G, 1e-5),
        "torch F.group_norm, autograd": lambda: F.group_norm(x, G, w, b),
    }
    ours_layer, torch_layer = groupnorm.GroupNorm(G, C), torch.nn.GroupNorm(G, C)
    forward["torch nn.GroupNorm layer"] = lambda: torch_layer(x)
    if lane:
        groupnorm.group_norm(x, G, w, b)  # loads the lane and sets its C++ front
        forward["fast-lane op alone"] = lambda: native.group_norm(x, w, b, G, 1e-5, 0)
        forward["C++ front op alone"] = lambda: native.front(x, w, b, G, 1e-5, 0)
        forward["group_norm, autograd, lane"] = lambda: groupnorm.group_norm(x, G, w, b)
        forward["GroupNorm layer, lane"] = lambda: ours_layer(x)
    print(f"forward of {shape}, G = {G} (median us per call; py: the Python path, lane: the compiled fast lane):")
    for name, us in medians(forward, a.rounds, a.calls).items():
        print(f"  {name:30s} {us:8.1f}")

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(x, G, w, b), (x, w, b), dy)

    cases = {"ours, py": python_path(fwd_bwd(groupnorm.group_norm)), "torch": fwd_bwd(F.group_norm)}
    if lane:
        cases["ours, lane"] = fwd_bwd(groupnorm.group_norm)
    both = medians(cases, a.rounds, a.calls // 2)
    print("forward+backward: " + ", ".join(f"{k} {v:.1f} us" for k, v in both.items())
          + "; torch/ours " + ", ".join(f"{k.split(', ')[1]} {both['torch'] / v:.2f}x" for k, v in both.items() if k != "torch"))


if __name__ == "__main__":
    main()
