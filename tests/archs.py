"""Reference architectures for the conversion tests, written from the published designs.

torchvision and timm do not import beside the pinned torch here, so the two model
families users convert most are rebuilt with the same module names and the same
``norm_layer`` hook:

``resnet50(norm_layer=...)``   torchvision.models.resnet.ResNet with Bottleneck blocks
                               (conv1/bn1/relu/maxpool/layer1..4/avgpool/fc, downsample.0/1),
                               He et al. 2016 with the v1.5 stride on the 3x3 conv.
``TimmResNetD(...)``           timm-style ResNet-D (Bag of Tricks, He et al. 2019): deep stem,
                               average-pool shortcut, ``norm_layer``/``act_layer`` injected, and a
                               ``BatchNormAct2d`` norm+activation layer (timm.layers.norm_act) in
                               the stem and the head.

Only the structure matters to the tests; no pretrained weights are involved.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- torchvision


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # reused three times, as in torchvision
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet, Bottleneck only."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, zero_init_residual=False, groups=1,
                 width_per_group=64, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes, blocks, stride=1):
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                norm_layer(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                             self.dilation, norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                     dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(**kwargs) -> ResNet:
    """torchvision.models.resnet50(weights=None, **kwargs): 53 BatchNorm2d, 25.6 M parameters."""
    return ResNet((3, 4, 6, 3), **kwargs)


# --------------------------------------------------------------------------- timm


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm2d followed by ``drop`` then ``act``.

    A BatchNorm2d subclass whose state_dict keys are BatchNorm2d's, with two extra children.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch_stats, self.momentum or 0.0, self.eps,
        )
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct: conv then a norm+act layer (``conv``, ``bn`` names)."""

    def __init__(self, in_chs, out_chs, kernel_size=1, stride=1, norm_act_layer=BatchNormAct2d, act_layer=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = norm_act_layer(out_chs, act_layer=act_layer)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck: conv/bn/act numbered 1..3, ``norm_layer``/``act_layer`` injected."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        width = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


def downsample_avg(in_chs, out_chs, stride, norm_layer):
    """ResNet-D shortcut: average pool, then a 1x1 conv and a norm."""
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(in_chs, out_chs, 1, 1, bias=False), norm_layer(out_chs))


class TimmResNetD(nn.Module):
    """A small timm-style ResNet-D: ``TimmResNetD(norm_layer=partial(nn.GroupNorm, 8))`` etc.

    Deep stem (3x3 convs, widths ``stem_width``/``stem_width``/``2*stem_width``), average-pool
    shortcuts, Bottleneck stages of ``widths``, and a ConvNormAct head built on BatchNormAct2d.
    The narrow stem (24 channels by default) is where group choices go wrong.
    """

    def __init__(self, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=24, num_classes=10,
                 in_chans=3, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, norm_act_layer=BatchNormAct2d,
                 head_chs=256):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, 2, 1, bias=False),
            norm_layer(stem_width),
            act_layer(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False),
            norm_layer(stem_width),
            act_layer(inplace=True),
            nn.Conv2d(stem_width, 2 * stem_width, 3, 1, 1, bias=False),
        )
        self.bn1 = norm_layer(2 * stem_width)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 2 * stem_width
        stages = []
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                out = planes * TimmBottleneck.expansion
                down = downsample_avg(inplanes, out, stride, norm_layer) if (j == 0 and (stride != 1 or inplanes != out)) else None
                blocks.append(TimmBottleneck(inplanes, planes, stride if j == 0 else 1, down, norm_layer, act_layer))
                inplanes = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = ConvNormAct(inplanes, head_chs, 1, norm_act_layer=norm_act_layer, act_layer=act_layer)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, TimmBottleneck):
                m.zero_init_last()

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.global_pool(self.head(x)).flatten(1))


# --------------------------------------------------------------------------- small 1-D / 3-D nets


def mlp_bn1d(in_features=12, hidden=48, out_features=3) -> nn.Sequential:
    """A tabular MLP with BatchNorm1d on (N, C) inputs."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, out_features),
    )


def conv1d_net(in_channels=4, width=32) -> nn.Sequential:
    """A 1-D conv net (audio / sequence) with BatchNorm1d on (N, C, L) inputs."""
    return nn.Sequential(
        nn.Conv1d(in_channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 3, padding=1, groups=4), nn.BatchNorm1d(width), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 2),
    )


def conv3d_net(in_channels=1, width=16) -> nn.Sequential:
    """A 3-D conv net (video / volumes) with BatchNorm3d."""
    return nn.Sequential(
        nn.Conv3d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU(),
        nn.Conv3d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2 * width, 2),
    )


__all__ = [
    "Bottleneck", "ResNet", "resnet50", "BatchNormAct2d", "ConvNormAct", "TimmBottleneck", "TimmResNetD",
    "mlp_bn1d", "conv1d_net", "conv3d_net", "partial",
]
