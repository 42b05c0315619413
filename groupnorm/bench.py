"""Time groupnorm against torch.nn.GroupNorm and against the memory floor.

For every shape of the chosen suites and both memory layouts, times the forward, the
backward and forward+backward of groupnorm.GroupNorm (the registered op with its autograd,
so dispatch and allocation are counted) against torch.nn.GroupNorm (followed by the
activation module when the case fuses one) and against the memory floor measured in the
same run: a copy of the same bytes (x.clone(), allocation included); the forward floor
is 1 copy (read x, write y), the backward 1.5 copies (read x and dy, write dx).
Variants run interleaved, round after round, so machine drift hits all of them alike;
the reported figure is the median over rounds, after warm-up. On the CPU each variant's
minor page faults per call are counted too (ours_faults, torch_faults): with glibc's
default settings, tensors of tens of MiB get fresh pages on every allocation, and in a VM
those faults can cost more than the kernel; --steady-malloc reruns with glibc keeping
freed memory, which shows the kernels themselves.

Suites (CPU): resnet (ResNet-50 stage shapes at batch 2, 8, 32, G=32), diffusion
(UNet/VAE shapes at batch 1, G=32, SiLU), 3d (N, C, D, H, W segmentation shapes, G=8),
1d (sequence shapes), small (per-call overhead). gpu (with --device cuda): SD/SDXL UNet
and VAE shapes in bfloat16 with SiLU, with achieved bandwidth against the measured copy
bandwidth. The train benchmark times whole SGD steps of a small ResNet with groupnorm's
GroupNorm, torch.nn.GroupNorm and torch.nn.BatchNorm2d. Your own layers' shapes: --shape
(with --groups and --activation), in place of the default suites, or after the --suite ones.

Examples:
  groupnorm bench --quick --out /tmp/gnbench
  groupnorm bench --shape 16x256x64x64 16x512x32x32 --groups 32 --activation silu
  groupnorm bench --suite resnet diffusion --layouts channels_last --plot --out results/
  groupnorm bench --suite resnet --steady-malloc --out results/
  groupnorm bench --device cuda --suite gpu --out results/
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- shape suites
# entries: (shape, num_groups, activation)
_R50 = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
SUITES: dict[str, list] = {
    "resnet": [((n, c, s, s), 32, "none") for n in (2, 8, 32) for c, s in _R50],
    "diffusion": [
        ((1, 320, 64, 64), 32, "silu"),  # SD UNet, 512x512 image, first level
        ((1, 640, 32, 32), 32, "silu"),
        ((1, 1280, 16, 16), 32, "silu"),
        ((1, 512, 64, 64), 32, "silu"),  # VAE decoder levels
        ((1, 256, 128, 128), 32, "silu"),
        ((1, 128, 256, 256), 32, "silu"),
    ],
    "3d": [
        ((1, 32, 64, 64, 64), 8, "none"),
        ((1, 64, 32, 32, 32), 8, "relu"),
        ((2, 128, 16, 16, 16), 8, "none"),
        ((2, 256, 8, 8, 8), 8, "none"),
    ],
    "1d": [((8, 256, 4096), 32, "none"), ((32, 512, 256), 32, "gelu")],
    "small": [((2, 32, 4, 4), 8, "none"), ((8, 64, 8, 8), 16, "relu"), ((2, 64, 16, 16), 32, "silu")],
    "gpu": [
        ((1, 512, 256, 256), 32, "silu"),  # SD VAE decoder at 512px / SDXL VAE
        ((1, 256, 512, 512), 32, "silu"),
        ((1, 128, 512, 512), 32, "silu"),
        ((1, 128, 1024, 1024), 32, "silu"),  # SDXL VAE at 1024px
        ((2, 320, 128, 128), 32, "silu"),  # SDXL UNet (CFG batch 2), 1024px latents
        ((2, 640, 64, 64), 32, "silu"),
        ((2, 1280, 32, 32), 32, "silu"),
        ((1, 320, 64, 64), 32, "silu"),  # SD 1.5 UNet
    ],
}
QUICK = [
    ((2, 64, 16, 16), 16, "none"),
    ((1, 64, 32, 32), 32, "silu"),
    ((2, 16, 8, 8, 8), 8, "relu"),
    ((4, 32, 128), 8, "gelu"),
]
CPU_SUITES = ("resnet", "diffusion", "3d", "1d", "small")
ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_shape(text: str) -> tuple:
    """'8x256x56x56' -> (8, 256, 56, 56): an (N, C, *spatial) shape for --shape."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write N x C x spatial sizes joined by 'x', e.g. 8x256x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a GroupNorm input is (N, C, *spatial) with every size >= 1, e.g. 8x256x56x56")
    return shape


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_positive_int.__name__ = "a positive integer"  # argparse names the type in its messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse reads "-1x8x4x4" as an unknown option ("--shape: expected at least one argument"); let such
    # tokens reach parse_shape, which says what is wrong with them (no option of this parser looks like that)
    parser._negative_number_matcher = re.compile(r"^-\d[\dx,.]*$")
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES) + ["all"], default=None,
                        help="shape suites to run (default: all CPU suites, or gpu with --device cuda; "
                             "none when --shape is given; given with --shape, both are timed, the suites first)")
    parser.add_argument("--shape", nargs="+", type=parse_shape, default=None, metavar="NxCx...",
                        help="your own input shapes, e.g. --shape 16x256x64x64 4x64x32x32x32 (timed with "
                             "--groups and --activation, in place of the default suites or after any --suite given; "
                             "no training step unless --train yes)")
    parser.add_argument("--groups", type=int, default=32, help="G for the --shape inputs")
    parser.add_argument("--activation", choices=tuple(ACT_MODULES), default="none",
                        help="activation fused after GroupNorm for the --shape inputs (torch.nn.GroupNorm "
                             "is followed by the same module)")
    parser.add_argument("--quick", action="store_true", help="a few small shapes and a tiny training step (seconds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to time: cpu (the numba kernels) or cuda (the Triton kernels, CUDA events)")
    parser.add_argument("--layouts", choices=("both", "contiguous", "channels_last"), default="both",
                        help="memory layouts of the input")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="input dtype (default float32 on CPU, bfloat16 for the gpu suite)")
    parser.add_argument("--backend", default=None,
                        help="groupnorm backend to time (default: automatic, numba on CPU, triton on CUDA)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (JIT compile, allocator)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch and numba (default: all)")
    parser.add_argument("--train", choices=("yes", "no", "only"), default=None,
                        help="also time whole training steps (forward, backward, SGD) of a small ResNet "
                             "(default: yes, or no with --shape)")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench.csv, bench.json (and bench.png)")
    parser.add_argument("--plot", action="store_true", help="also save a PNG of the speedups (needs --out)")
    parser.add_argument("--steady-malloc", action="store_true",
                        help="(Linux/glibc) rerun this command with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_, "
                             "MALLOC_TRIM_THRESHOLD_): tensors of tens of MiB then stop page-faulting on most "
                             "allocation, for torch and groupnorm alike, and the figures show the kernels "
                             "rather than the operating system's page-fault cost (the faults/call columns show which you got)")


# ----------------------------------------------------------------------------- timing
def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages), 0 where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return 0


class Timer:
    """Seconds per call of fn: CPU wall clock, or CUDA events on a GPU. On the CPU it also
    leaves the minor page faults per call of the last measurement in ``faults``."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.faults = 0.0

    def __call__(self, fn, calls: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        f0 = _minor_faults()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = (time.perf_counter() - t0) / calls
        self.faults = (_minor_faults() - f0) / calls
        return t


def time_interleaved(fns: dict, timer: Timer, repeats: int, warmup: int, min_sample_s: float = 2e-3,
                     budget_s: float = 2.0, faults: dict | None = None) -> dict:
    """Median seconds per call of each fn, timed round-robin in an order shuffled every round
    (a seeded shuffle, so reruns repeat it): what one variant leaves behind (the allocator's heap,
    caches, another library's thread pool still spinning) then falls on every other variant
    alike. A fixed or merely rotated order (A, B, C, then B, C, A) has each variant follow the
    same neighbour in nearly every round, which biased single variants by up to 1.5x on a 2-core
    VM (``python scripts/spot_checks.py neighbour-bias``: a backward call always timed after an
    ATen call and an allocation, against identical calls elsewhere in the cycle).

    Fast functions are called several times per sample so that one sample lasts about
    min_sample_s (timer resolution stays negligible). At least ``repeats`` rounds are
    run, more (up to 10x) while a round is cheap against ``budget_s``: on a busy machine
    more rounds make the median robust to preemption. ``faults``, if given, receives each
    fn's median minor page faults per call (CPU)."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            fn()
        t = timer(fn)
        calls[name] = max(1, min(1000, int(min_sample_s / max(t, 1e-7))))
    samples = {name: [] for name in fns}
    fault_samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    order = list(fns)
    shuffle = random.Random(0).shuffle
    while rounds < repeats or (rounds < 10 * repeats and (time.perf_counter() - start) * (rounds + 1) / rounds < budget_s):
        last = order[-1]
        shuffle(order)
        if order[0] == last and len(order) > 1:  # nor right after itself, its own caches warm
            order[0], order[1] = order[1], order[0]
        for name in order:
            samples[name].append(timer(fns[name], calls[name]))
            fault_samples[name].append(timer.faults)
        rounds += 1
    if faults is not None:
        faults.update({name: statistics.median(v) for name, v in fault_samples.items()})
    return {name: statistics.median(v) for name, v in samples.items()}


# ----------------------------------------------------------------------------- one case
def _to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() >= 3:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _our_module(G: int, C: int, act: str, backend: str | None):
    """groupnorm's layer (or the op itself if the layer is unavailable), in float32 params."""
    activation = None if act == "none" else act
    try:
        from groupnorm import GroupNorm

        layer = GroupNorm(G, C, activation=activation)
        if backend is None:
            return layer
    except ImportError:  # pragma: no cover - the op landed with the layer
        layer = None
    from groupnorm import group_norm

    weight, bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))

    class _Op(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = weight, bias

        def forward(self, x):
            return group_norm(x, G, self.weight, self.bias, 1e-5, activation=activation, backend=backend)

    return _Op()


def bench_case(shape, G, act, layout, dtype, device, backend, timer, repeats, warmup) -> list[dict]:
    """Rows (one per pass: fwd, bwd, fwdbwd) for one shape and layout."""
    from groupnorm import backends

    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x0 = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    x = _to_layout(x0, layout).requires_grad_(True)
    dy = _to_layout(torch.randn(shape, generator=gen).to(device=device, dtype=dtype), layout)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and device == "cpu" else dtype

    ours = _our_module(G, C, act, backend).to(device=device, dtype=param_dtype)
    ref_gn = nn.GroupNorm(G, C).to(device=device, dtype=dtype)
    with torch.no_grad():
        w = torch.linspace(0.5, 1.5, C)
        b = torch.linspace(-0.2, 0.2, C)
        for m in (ours, ref_gn):
            m.weight.copy_(w)
            m.bias.copy_(b)
    ref = nn.Sequential(ref_gn, ACT_MODULES[act]()) if act != "none" else ref_gn
    params_ours = [x, ours.weight, ours.bias]
    params_ref = [x, ref_gn.weight, ref_gn.bias]

    y_ours = ours(x)
    last = backends.last_backend()
    y_ref = ref(x)

    fns = {
        "floor": lambda: x.detach().clone(),
        "ours_fwd": lambda: ours(x),
        "torch_fwd": lambda: ref(x),
        "ours_bwd": lambda: torch.autograd.grad(y_ours, params_ours, dy, retain_graph=True),
        "torch_bwd": lambda: torch.autograd.grad(y_ref, params_ref, dy, retain_graph=True),
        "ours_fwdbwd": lambda: torch.autograd.grad(ours(x), params_ours, dy),
        "torch_fwdbwd": lambda: torch.autograd.grad(ref(x), params_ref, dy),
    }
    faults = {}
    t = time_interleaved(fns, timer, repeats, warmup, faults=faults)
    nbytes = x.numel() * x.element_size()
    copy_gbps = 2 * nbytes / t["floor"] / 1e9
    rows = []
    for pas, floor_copies, passes in (("fwd", 1.0, 2), ("bwd", 1.5, 3), ("fwdbwd", 2.5, 5)):
        ours_s, torch_s = t[f"ours_{pas}"], t[f"torch_{pas}"]
        floor_s = floor_copies * t["floor"]
        rows.append({
            "shape": "x".join(map(str, shape)),
            "groups": G,
            "activation": act,
            "layout": layout,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
            "backend": last or "",
            "mib": round(nbytes / 2**20, 3),
            "pass": pas,
            "ours_ms": ours_s * 1e3,
            "torch_ms": torch_s * 1e3,
            "floor_ms": floor_s * 1e3,
            "speedup": torch_s / ours_s,
            "vs_floor": ours_s / floor_s,
            "ours_gbps": passes * nbytes / ours_s / 1e9,
            "copy_gbps": copy_gbps,
            "ours_faults": faults[f"ours_{pas}"],
            "torch_faults": faults[f"torch_{pas}"],
            "floor_faults": faults["floor"],
        })
    return rows


# ----------------------------------------------------------------------------- training step
class _Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm(cout, True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout, False)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout, False))

    def forward(self, x):
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return F.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (one basic block per stage) with an injected norm(C, relu_follows)."""

    def __init__(self, norm, widths=(32, 64, 128), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm(widths[0], True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Block(cin, w, 1 if i == 0 else 2, norm))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _norms(groups: int):
    from groupnorm import GroupNorm

    def ours(c, relu):  # the activation fused into the op
        return GroupNorm(min(groups, c), c, activation="relu" if relu else None)

    def torch_gn(c, relu):
        gn = nn.GroupNorm(min(groups, c), c)
        return nn.Sequential(gn, nn.ReLU()) if relu else gn

    def bn(c, relu):
        b = nn.BatchNorm2d(c)
        return nn.Sequential(b, nn.ReLU()) if relu else b

    return {"groupnorm": ours, "torch.nn.GroupNorm": torch_gn, "torch.nn.BatchNorm2d": bn}


def bench_training(device, timer, repeats, warmup, quick, layouts) -> list[dict]:
    batch, size, widths = (8, 16, (16, 32, 64)) if quick else (32, 32, (32, 64, 128))
    rows = []
    for layout in layouts:
        gen = torch.Generator().manual_seed(0)
        x = _to_layout(torch.randn(batch, 3, size, size, generator=gen), layout).to(device)
        target = torch.randint(0, 10, (batch,), generator=gen).to(device)
        steps = {}
        for name, norm in _norms(8).items():
            torch.manual_seed(0)
            model = SmallResNet(norm, widths).to(device)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
                opt.step()

            steps[name] = step
        t = time_interleaved(steps, timer, repeats, warmup, min_sample_s=0.0)
        for name, s in t.items():
            rows.append({
                "model": f"SmallResNet{widths}",
                "norm": name,
                "layout": layout,
                "batch": batch,
                "image": size,
                "device": device,
                "step_ms": s * 1e3,
                "vs_batchnorm": s / t["torch.nn.BatchNorm2d"],
            })
    return rows


# ----------------------------------------------------------------------------- summary
def _geomean(v):
    v = [x for x in v if x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def summarize(rows: list[dict], train_rows: list[dict]) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met. They are the
    project's goals over its own shape suites: --shape rows (suite "custom") are left out, so a
    user timing their own layers is not graded against goals they never set."""
    rows = [r for r in rows if r.get("suite") != "custom"]
    fb = [r for r in rows if r["pass"] == "fwdbwd" and r["mib"] >= 0.25]
    targets = []

    def add(name, value, ok, detail=""):
        targets.append({"target": name, "value": value, "met": ok, "detail": detail})

    nc = [r["speedup"] for r in fb if r["layout"] == "contiguous" and r["activation"] == "none"]
    if nc:
        g = _geomean(nc)
        add("fwd+bwd contiguous, geomean speedup >= 1.6x, none < 0.9x", g, g >= 1.6 and min(nc) >= 0.9,
            f"geomean {g:.2f}x, min {min(nc):.2f}x over {len(nc)} shapes")
    cl = [r["speedup"] for r in fb if r["layout"] == "channels_last" and r["activation"] == "none"]
    if cl:
        g = _geomean(cl)
        add("fwd+bwd channels_last, geomean speedup >= 5x", g, g >= 5, f"geomean {g:.2f}x, min {min(cl):.2f}x over {len(cl)} shapes")
    silu = [r["speedup"] for r in fb if r["activation"] == "silu"]
    if silu:
        g = _geomean(silu)
        add("fused GN+SiLU fwd+bwd, speedup >= 2.5x vs GroupNorm+SiLU", g, g >= 2.5,
            f"geomean {g:.2f}x, min {min(silu):.2f}x over {len(silu)} cases")
    big = [r for r in fb if r["mib"] >= 4]
    if big:
        within = [r for r in big if r["vs_floor"] <= 1.25]
        worst = max(r["vs_floor"] for r in big)
        add("shapes >= 4 MiB: fwd+bwd within 1.25x of the memory floor", len(within) / len(big), len(within) == len(big),
            f"{len(within)}/{len(big)} within; median {statistics.median(r['vs_floor'] for r in big):.2f}x, worst {worst:.2f}x")
    tiny = [r for r in rows if r["mib"] < 0.05 and r["pass"] in ("fwd", "bwd")]
    if tiny:
        worst_us = max(r["ours_ms"] for r in tiny) * 1e3
        extra_us = max((r["ours_ms"] - r["torch_ms"]) * 1e3 for r in tiny)
        add("per-call overhead on small shapes < 30 us", worst_us, worst_us < 30,
            f"slowest tiny-shape fwd or bwd call {worst_us:.1f} us (torch.nn.GroupNorm: "
            f"{max(r['torch_ms'] for r in tiny) * 1e3:.1f} us; most added over torch's call on one case: "
            f"{extra_us:+.1f} us)")
    for layout in ("contiguous", "channels_last"):
        tr = [r for r in train_rows if r["norm"] == "groupnorm" and r["layout"] == layout]
        if tr:
            ratio = tr[0]["vs_batchnorm"]
            add(f"GN ResNet training step ({layout}) no slower than BatchNorm2d", ratio, ratio <= 1.0,
                f"step time {ratio:.2f}x BatchNorm2d's")
    return targets


# ----------------------------------------------------------------------------- output
def _fmt_table(rows, cols, fmts) -> str:
    cells = [[fmts.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


ROW_COLS = ["shape", "groups", "activation", "layout", "dtype", "mib", "pass", "ours_ms", "torch_ms", "floor_ms",
            "speedup", "vs_floor", "ours_gbps", "ours_faults", "torch_faults"]
ROW_FMTS = {"mib": "{:.2f}", "ours_ms": "{:.3f}", "torch_ms": "{:.3f}", "floor_ms": "{:.3f}", "speedup": "{:.2f}x",
            "vs_floor": "{:.2f}x", "ours_gbps": "{:.1f}", "ours_faults": "{:.0f}", "torch_faults": "{:.0f}"}
TRAIN_COLS = ["model", "norm", "layout", "batch", "image", "step_ms", "vs_batchnorm"]
TRAIN_FMTS = {"step_ms": "{:.1f}", "vs_batchnorm": "{:.2f}x"}


def machine_info(device: str) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": "groupnorm " + " ".join(sys.argv[1:]) if "bench" in sys.argv[1:2] else "",
        "malloc": {k: os.environ[k] for k in STEADY_MALLOC if k in os.environ} or "default",
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = round(os.getloadavg()[0], 2)
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
        from groupnorm.backends import native

        reason = native.status() if device == "cpu" else None
        info["native_fast_lane"] = "on" if reason is None else f"off ({reason})"
    except ImportError:  # pragma: no cover
        info["numba"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def _cpu_model() -> str:
    """The model name, with the vendor's family/model numbers and the widest vector ISA where
    /proc/cpuinfo has them (VMs often say only "AMD EPYC", which covers several generations)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first CPU is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    extra = []
    if "cpu family" in fields and "model" in fields:
        extra.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86: flags, ARM: Features
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "neon" if "asimd" in flags else ""
    if isa:
        extra.append(isa.upper())
    return name + (f" ({', '.join(extra)})" if extra else "")


def busy_warning(threads: int) -> str | None:
    """A warning when other work keeps the cores busy: a parallel region waits for its slowest thread,
    and with a core taken, multi-thread medians come out as scheduler slices (multiples of ~4-8 ms)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this OS (Windows)
        return None
    cores = os.cpu_count() or 1
    if threads > 1 and load >= max(1.0, 0.5 * cores):
        return (f"the machine is busy (load average {load:.1f} on {cores} CPUs) before the benchmark starts: "
                f"{threads}-thread timings stall whenever another process holds a core; stop that work, or "
                "compare per-core speed with --threads 1")
    return None


def _csv_text(rows: list[dict], fieldnames: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: Path, info, rows, train_rows, targets, plot: bool, complete: bool = True) -> list[Path]:
    """bench.csv, bench_train.csv (with training rows), bench.json and, with plot, bench.png; each file
    is replaced whole (files.write_atomic). main() writes them after every case too (complete=False,
    recorded in bench.json), so that a run stopped part way keeps what it measured."""
    from groupnorm.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.csv"]
    write_atomic(out / "bench.csv", _csv_text(rows, list(rows[0]) if rows else ROW_COLS))
    if train_rows:
        write_atomic(out / "bench_train.csv", _csv_text(train_rows, list(train_rows[0])))
        written.append(out / "bench_train.csv")
    write_atomic(out / "bench.json", json.dumps({"machine": info, "complete": complete, "kernels": rows,
                                                 "training": train_rows, "targets": targets}, indent=1))
    written.append(out / "bench.json")
    if plot and rows:
        written.append(_plot(out / "bench.png", rows))
    return written


def _plot(path: Path, rows) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fb = [r for r in rows if r["pass"] == "fwdbwd"]
    labels = [f"{r['shape']} {r['activation'] if r['activation'] != 'none' else ''} {'CL' if r['layout'] == 'channels_last' else 'NC'}"
              for r in fb]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(fb)), 4.5))
    xs = range(len(fb))
    ax.bar([i - 0.2 for i in xs], [r["speedup"] for r in fb], 0.4, label="speedup vs torch.nn.GroupNorm")
    ax.bar([i + 0.2 for i in xs], [1 / r["vs_floor"] for r in fb], 0.4, label="fraction of the memory floor reached")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_title("groupnorm forward+backward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
# glibc serves allocations over its mmap threshold (128 KiB, rising to at most 32 MiB as large
# blocks are freed) with fresh pages and gives freed heap tops back to the OS, so a 50 MiB
# activation page-faults on every allocation; in a VM that can cost more than the kernel itself.
# These settings (read by glibc at process start) keep freed memory in the heap instead.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# tensors of one case alive at once, in units of the input: x, dy, our y and dx, torch's y (and the
# activation's output) and dx, the floor's copy, autograd's saved tensors, with some slack
_LIVE_COPIES = 10


def _shape_arguments_problem(args) -> str | None:
    """What is wrong with --shape/--groups/--activation, or None."""
    if not args.shape:
        if args.groups != 32 or args.activation != "none":
            return "--groups and --activation apply to --shape inputs (the suites set their own); add --shape"
        return None
    if args.quick:
        return "--quick times its own few shapes; drop --quick to time --shape inputs"
    if args.train == "only":
        return "--train only times the training step, not the --shape inputs; drop one of them"
    if args.groups < 1:
        return f"--groups must be >= 1, got {args.groups}"
    for shape in args.shape:
        C = shape[1]
        if C % args.groups:
            divisors = [d for d in (32, 16, 8, 4, 2, 1) if C % d == 0]
            return (f"--groups {args.groups} does not divide the {C} channels of --shape "
                    f"{'x'.join(map(str, shape))}; give a --groups that divides {C} (e.g. {divisors[0]})")
    avail = _available_bytes() if args.device == "cpu" else None
    if avail:
        itemsize = DTYPES[args.dtype].itemsize if args.dtype else 4
        for shape in args.shape:
            need = math.prod(shape) * itemsize * _LIVE_COPIES
            if need > avail:
                return (f"--shape {'x'.join(map(str, shape))} needs about {need / 2**30:.1f} GiB while timed "
                        f"({_LIVE_COPIES} tensors of its size) and {avail / 2**30:.1f} GiB is available; "
                        "give a smaller batch or size")
    return None


def _reexec_with_steady_malloc(argv: list[str]) -> None:
    env = dict(os.environ, **STEADY_MALLOC)
    print("groupnorm bench: restarting with " + " ".join(f"{k}={v}" for k, v in STEADY_MALLOC.items()), flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "groupnorm", *argv], env)


def _run_cases(args, cases, layouts, device, timer, info, rows: list) -> None:
    """Time every case (appending to rows); with --out, the files are rewritten after each one."""
    if args.train == "only":
        return
    for suite, shape, G, act in cases:
        dtype = _case_dtype(args.dtype, suite)
        for layout in layouts:
            if layout == "channels_last" and len(shape) < 3:
                continue
            case_rows = bench_case(shape, G, act, layout, dtype, device, args.backend, timer, args.repeats, args.warmup)
            for r in case_rows:
                r["suite"] = suite
            rows.extend(case_rows)
            fb = case_rows[-1]
            print(f"  {suite:9s} {fb['shape']:>18s} G={G:<3d} {act:4s} {layout:13s} fwd+bwd {fb['ours_ms']:9.3f} ms"
                  f"  torch {fb['torch_ms']:9.3f} ms  {fb['speedup']:5.2f}x  floor {fb['vs_floor']:5.2f}x"
                  f"  [{fb['backend']}]", flush=True)
            if args.out is not None:
                write_outputs(args.out, info, rows, [], summarize(rows, []), plot=False, complete=False)


def _error(message: str) -> int:
    """Say what is wrong (one line, argparse's form) and give the exit status of a usage error."""
    print(f"groupnorm bench: error: {message}", file=sys.stderr)
    return 2


def _backend_problem(backend: str, device: str, kinds) -> str | None:
    """What keeps --backend from timing inputs of these (dtype, activation) kinds on device, or None."""
    from groupnorm import backends

    try:
        chosen = backends.get(backend)
    except ValueError as exc:
        return f"--backend: {exc}"
    reason = chosen.available()
    if reason is not None:
        return f"--backend {backend} is unavailable here: {reason}; leave --backend out to time the automatic choice"
    for dtype, act in dict.fromkeys(kinds):
        x = torch.zeros(1, 2, 1, device=device, dtype=dtype)
        if not chosen.supports(x, act):
            usable = [n for n in backends.names()
                      if backends.get(n).available() is None and backends.get(n).supports(x, act)]
            return (f"--backend {backend} does not support {str(dtype).replace('torch.', '')} input on {device}"
                    f"{'' if act == 'none' else ' with ' + act}; choose one of {', '.join(usable)} "
                    "or leave --backend out")
    return None


def _case_dtype(dtype_name: str | None, suite: str) -> torch.dtype:
    return DTYPES[dtype_name] if dtype_name else (torch.bfloat16 if suite == "gpu" else torch.float32)


def _cases_line(cases, layouts) -> str:
    """What is about to be timed, e.g. 'timing 12 resnet shapes, 1 --shape input; layouts contiguous and channels_last'."""
    counts = {}
    for suite, *_ in cases:
        counts[suite] = counts.get(suite, 0) + 1
    plural = lambda n: "s" if n > 1 else ""  # noqa: E731
    parts = [f"{n} --shape input{plural(n)}" if suite == "custom" else f"{n} {suite} shape{plural(n)}"
             for suite, n in counts.items()]
    return f"timing {', '.join(parts)}; layout{plural(len(layouts))} {' and '.join(layouts)}"


def main(args) -> int:
    device = args.device
    if getattr(args, "steady_malloc", False) and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        _reexec_with_steady_malloc(getattr(args, "_argv", None) or sys.argv[1:])  # does not return
    if device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda was given but no CUDA GPU is visible")
    if args.plot and args.out is None:
        return _error("--plot needs --out DIR to write the PNG into")
    if args.repeats < 1 or args.warmup < 0:
        return _error("--repeats must be >= 1 and --warmup >= 0")
    shape_problem = _shape_arguments_problem(args)
    if shape_problem:
        return _error(shape_problem)
    if args.train is None:
        args.train = "no" if args.shape else "yes"
    if device == "cpu" and not args.quick and args.suite and "gpu" in args.suite:
        return _error("the gpu suite is for --device cuda (SD/SDXL shapes of up to 256 MiB in bfloat16, "
                      f"sized for a GPU); on the CPU choose from {', '.join(CPU_SUITES)}")

    if args.quick:
        cases = [("quick", *c) for c in QUICK]
    else:
        names = args.suite or ([] if args.shape else ["gpu"] if device == "cuda" else list(CPU_SUITES))
        if "all" in names:
            names = list(CPU_SUITES) + (["gpu"] if device == "cuda" else [])
        cases = [(name, *c) for name in names for c in SUITES[name]]
        cases += [("custom", shape, args.groups, args.activation) for shape in dict.fromkeys(args.shape or ())]
    if args.train == "only":  # the training step alone: no kernel cases
        cases = []
    if args.backend == "auto":
        args.backend = None
    if args.backend is not None:
        kinds = [(_case_dtype(args.dtype, suite), act) for suite, _, _, act in cases]
        problem = _backend_problem(args.backend, device, kinds)
        if problem:
            return _error(problem)
    if args.out is not None:  # before minutes of timing, not after; the last check, as it creates the folder
        from groupnorm.files import make_output_dir, output_dir_problem

        problem = output_dir_problem(args.out)
        if problem:
            return _error(f"cannot write results to --out {args.out} ({problem}); give a directory you can write to")
        problem = make_output_dir(args.out)
        if problem:
            return _error(f"cannot create --out {args.out} ({problem}); give a directory you can write to")
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:  # pragma: no cover
            pass

    layouts = ["contiguous", "channels_last"] if args.layouts == "both" else [args.layouts]
    timer = Timer(device)
    info = machine_info(device)
    print(f"groupnorm bench on {info['cpu']} ({info['cpu_count']} CPUs)"
          + (f", {info.get('gpu')}" if device == "cuda" else "")
          + f"; torch {info['torch']}, numba {info.get('numba')}"
          + (f", native fast lane {info.get('native_fast_lane')}" if device == "cpu" else "")
          + (f", malloc {'steady' if info['malloc'] != 'default' else 'default (see --steady-malloc)'}" if device == "cpu" else "")
          + f"; {args.repeats} interleaved rounds, medians", flush=True)
    if cases:
        print(_cases_line(cases, layouts), flush=True)
    busy = busy_warning(torch.get_num_threads()) if device == "cpu" else None
    if busy:
        print(f"groupnorm bench: warning: {busy}", file=sys.stderr, flush=True)

    rows, train_rows = [], []
    try:
        _run_cases(args, cases, layouts, device, timer, info, rows)
        if args.train != "no":
            train_rows = bench_training(device, timer, max(3, args.repeats // 2 if args.quick else args.repeats),
                                        args.warmup, args.quick, layouts)
    except KeyboardInterrupt:
        kept = ""
        if args.out is not None and rows:
            write_outputs(args.out, info, rows, [], summarize(rows, []), plot=False, complete=False)
            kept = f"; the {len(rows) // 3} cases (shape and layout) timed so far are in {args.out}"
        print(f"\ngroupnorm bench: interrupted{kept}", file=sys.stderr)
        return 130

    targets = summarize(rows, train_rows)
    if rows:
        print("\nkernels (median ms per call; speedup = torch / ours; vs_floor = ours / copy floor)")
        print(_fmt_table(rows, ROW_COLS, ROW_FMTS))
    if train_rows:
        print("\ntraining step (forward, backward, SGD)")
        print(_fmt_table(train_rows, TRAIN_COLS, TRAIN_FMTS))
    if targets:
        print("\ntargets (the goals this project set its CPU kernels against torch.nn.GroupNorm; BENCHMARKS.md)")
        for t in targets:
            print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['detail']}")
    if args.out is not None:
        for p in write_outputs(args.out, info, rows, train_rows, targets, args.plot):
            print(f"wrote {p}")
    return 0
