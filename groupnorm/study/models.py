"""ResNets with an injected normalization, and BatchNorm with per-worker statistics.

``make_norm(name, ...)`` turns a norm name into a factory ``norm(num_channels) -> nn.Module``;
``build_model(...)`` builds a ResNet whose every normalization comes from that factory (and
whose convolutions are weight-standardized for ``gn+ws``).

Norms:

* ``bn``      BatchNorm with per-worker statistics: the batch holds ``workers`` chunks, one per
              (virtual) worker, and each chunk is normalized with its own mean and variance, as
              on unsynchronized GPUs. Under DDP each process holds one chunk: workers = 1.
* ``syncbn``  BatchNorm over all workers' images: plain BN on the whole batch in one process,
              ``torch.nn.SyncBatchNorm`` under DDP on GPUs, ``AllReduceBatchNorm2d`` under DDP on
              CPUs (where SyncBatchNorm refuses to run).
* ``gn``      GroupNorm (our op), G = ``groups`` but never fewer than ``min_group_channels``
              channels per group, so narrow layers do not turn into Instance Norm.
* ``ln``      GroupNorm with one group.
* ``in``      GroupNorm with one channel per group.
* ``gn+ws``   ``gn`` after weight-standardized convolutions (``groupnorm.StdConv2d``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from groupnorm import GroupNorm, StdConv2d, resolve_groups

NORMS = ("bn", "syncbn", "gn", "ln", "in", "gn+ws")
MODELS = ("resnet-small", "resnet18", "resnet50")
BATCH_NORMS = ("bn", "syncbn")


class WorkerBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per worker chunk of the batch.

    The batch of ``workers * n`` images is read as ``workers`` consecutive chunks of ``n``
    (chunk k = worker k), each normalized with its own statistics. The running statistics are
    updated with the average over workers of the chunk mean and of the chunk's unbiased
    variance (what averaging the workers' running buffers would give). In eval mode the running
    statistics are used, exactly as ``nn.BatchNorm2d``. With ``workers=1`` this is ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, workers: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.workers = int(workers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.workers == 1:
            return super().forward(x)
        b, c, h, w = x.shape
        if b % self.workers:
            raise ValueError(f"batch of {b} images does not split into {self.workers} workers")
        W, n = self.workers, b // self.workers
        # (W, n, C, H, W') -> (n, W*C, H, W'): ATen's fused batch norm then takes the statistics of
        # each (worker, channel) over (n, H, W'), i.e. each worker's own BN, in one kernel each way
        xw = x.reshape(W, n, c, h, w).transpose(0, 1).reshape(n, W * c, h, w)
        rm = self.running_mean.repeat(W) if self.track_running_stats else None
        rv = self.running_var.repeat(W) if self.track_running_stats else None
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        weight = self.weight.repeat(W) if self.affine else None
        bias = self.bias.repeat(W) if self.affine else None
        y = F.batch_norm(xw, rm, rv, weight, bias, training=True, momentum=m, eps=self.eps)
        if self.track_running_stats:
            with torch.no_grad():  # the EMA is linear: averaging the workers' buffers = one EMA of the averages
                self.running_mean.copy_(rm.view(W, c).mean(0))
                self.running_var.copy_(rv.view(W, c).mean(0))
                self.num_batches_tracked += 1
        return y.reshape(n, W, c, h, w).transpose(0, 1).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", workers={self.workers}"


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all ranks, differentiable: every rank's loss depends on every
    rank's input, so the gradient is the sum of the ranks' gradients (an all-reduce again).
    What ``torch.distributed.nn.functional.all_reduce`` did before torch deprecated it."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Synchronized BatchNorm for CPU processes under DDP (gloo).

    ``torch.nn.SyncBatchNorm`` refuses modules that are not on a GPU, so on the CPU the
    statistics over all workers are taken with differentiable all-reduces (:class:`_AllReduceSum`):
    the mean first, then the centered sum of squares. Running statistics are updated from the
    global statistics, identically on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        all_reduce = _AllReduceSum.apply
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        b, c, h, w = x.shape
        count = b * h * w * dist.get_world_size()
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        centered = x - mean.view(1, c, 1, 1)
        var = all_reduce(centered.square().sum(dim=(0, 2, 3))) / count
        y = centered * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.lerp_(mean, m)
            self.running_var.lerp_(var * (count / max(count - 1, 1)), m)
            self.num_batches_tracked += 1
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def gn_groups(channels: int, groups: int, min_group_channels: int) -> int:
    """G for GN: ``groups``, lowered (to a divisor of C) until each group has >= min_group_channels."""
    return resolve_groups(channels, groups, policy="divisor", min_group_size=min_group_channels)


def make_norm(
    name: str,
    *,
    workers: int = 1,
    distributed: bool = False,
    groups: int = 32,
    min_group_channels: int = 8,
) -> Callable[[int], nn.Module]:
    """A factory ``norm(num_channels)`` for the norm ``name`` (see the module docstring)."""
    if name == "bn":
        return lambda c: WorkerBatchNorm2d(c, workers=1 if distributed else workers)
    if name == "syncbn":
        if not distributed:
            return lambda c: nn.BatchNorm2d(c)  # one process holds every worker's images
        return (lambda c: nn.SyncBatchNorm(c)) if torch.cuda.is_available() else (lambda c: AllReduceBatchNorm2d(c))
    if name in ("gn", "gn+ws"):
        return lambda c: GroupNorm(gn_groups(c, groups, min_group_channels), c)
    if name == "ln":
        return lambda c: GroupNorm(1, c)
    if name == "in":
        return lambda c: GroupNorm(c, c)
    raise ValueError(f"unknown norm {name!r}; choose from {', '.join(NORMS)}")


def make_conv(name: str) -> type[nn.Conv2d]:
    return StdConv2d if name == "gn+ws" else nn.Conv2d


# ----------------------------------------------------------------------------- blocks

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, norm, conv):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.last_norm = self.bn2
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm, conv):
        super().__init__()
        cout = planes * 4
        self.conv1 = conv(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, cout, 1, bias=False)
        self.bn3 = norm(cout)
        self.last_norm = self.bn3
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, linear classifier.

    ``small_stem`` (3x3 conv, stride ``stem_stride`` 1 or 2; a 4x4 "patchify" conv for stride 4)
    suits 28-32 px images; otherwise the ImageNet stem (7x7 stride 2 + max pool) is used.
    """

    def __init__(self, block, blocks_per_stage, widths, in_channels, num_classes, norm, conv, small_stem=True,
                 stem_stride=1):
        super().__init__()
        stem_width = widths[0] if block is BasicBlock else 64
        if small_stem and stem_stride == 4:  # patchify: 4x4 convolution, stride 4 (28 px -> 7x7 maps)
            self.stem = nn.Sequential(conv(in_channels, stem_width, 4, 4, 0, bias=False), norm(stem_width), nn.ReLU())
        elif small_stem:
            self.stem = nn.Sequential(conv(in_channels, stem_width, 3, stem_stride, 1, bias=False), norm(stem_width),
                                      nn.ReLU())
        else:
            self.stem = nn.Sequential(
                conv(in_channels, stem_width, 7, 2, 3, bias=False), norm(stem_width), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        layers, cin = [], stem_width
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, width, stride, norm, conv))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """He init for convolutions; norms gamma = 1, beta = 0, except gamma = 0 for the last
        norm of each residual block (each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif getattr(m, "weight", None) is not None and isinstance(m, (nn.modules.batchnorm._NormBase, GroupNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_norm.weight)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(
    name: str,
    norm_name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    workers: int = 1,
    distributed: bool = False,
    width: int = 32,
    blocks: int = 1,
    stem_stride: int = 1,
    groups: int = 32,
    min_group_channels: int = 8,
) -> ResNet:
    """Build model ``name`` with norm ``norm_name``.

    ``resnet-small``: 3 stages of ``blocks`` basic blocks, widths ``width, 2*width, 4*width``
    (a CIFAR-style ResNet-(6*blocks+2)), after a 3x3 stem of stride ``stem_stride`` (2 halves the
    resolution, and the cost, from the start); ``resnet18`` / ``resnet50``: the ImageNet layouts
    (the 3x3 stem is kept for images of 32 px or less).
    """
    norm = make_norm(norm_name, workers=workers, distributed=distributed, groups=groups,
                     min_group_channels=min_group_channels)
    conv = make_conv(norm_name)
    if name == "resnet-small":
        return ResNet(BasicBlock, [blocks] * 3, [width, 2 * width, 4 * width], in_channels, num_classes, norm, conv,
                      stem_stride=stem_stride)
    small = image_size <= 32
    if name == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes, norm, conv, small)
    if name == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], in_channels, num_classes, norm, conv, small)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every normalization layer, in forward order."""
    kinds = (nn.modules.batchnorm._NormBase, GroupNorm, nn.GroupNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
