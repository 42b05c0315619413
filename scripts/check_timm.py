"""Check groupnorm against real timm models (needs timm, and hence torchvision, installed).

    python scripts/check_timm.py

1. ``norm_layer=groupnorm.norm_layer(8, ...)`` in timm model constructors: the model must load the
   state_dict of the same model built with timm's own GroupNorm / GroupNormAct and give the same
   output (eval mode), i.e. every activation timm's norm+act layers apply is applied here too.
2. ``convert_batchnorm`` on timm's BatchNorm models (BatchNormAct2d included): batch-independent
   afterwards, and forward+backward run.

The test suite cannot import timm here (timm imports torchvision, which has no wheel for this torch),
so tests/test_layers.py::test_factory_answers_timms_norm_act_calls replays timm's calls instead.
"""

import functools
import sys

import torch

import groupnorm


def main() -> int:
    import timm
    from timm.layers import GroupNorm as TimmGroupNorm
    from timm.layers import GroupNormAct

    print(f"timm {timm.__version__}, torch {torch.__version__}")
    failures = 0
    # (model, our factory, timm's reference norm layer)
    cases = [
        ("resnet18", groupnorm.norm_layer(8), functools.partial(TimmGroupNorm, num_groups=8)),
        ("resnetv2_50x1_bit", groupnorm.norm_layer(8, activation="relu"), functools.partial(GroupNormAct, num_groups=8)),
        ("regnetx_002", groupnorm.norm_layer(8, activation="relu"), functools.partial(GroupNormAct, num_groups=8)),
        ("cspresnet50", groupnorm.norm_layer(8, act_layer=torch.nn.LeakyReLU), functools.partial(GroupNormAct, num_groups=8)),
        ("vovnet39a", groupnorm.norm_layer(8, activation="relu"), functools.partial(GroupNormAct, num_groups=8)),
        ("efficientnet_b0", groupnorm.norm_layer(8, activation="silu"), functools.partial(GroupNormAct, num_groups=8)),
    ]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, ours, theirs in cases:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False, num_classes=10, norm_layer=theirs).eval()
        model = timm.create_model(name, pretrained=False, num_classes=10, norm_layer=ours).eval()
        model.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            diff = (ref(x) - model(x)).abs().max().item()
        n = sum(isinstance(m, groupnorm.GroupNorm) for m in model.modules())
        ok = diff < 1e-4 and n > 0
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} norm_layer  {name:<20} {n:>3} groupnorm layers, max |diff| vs timm {diff:.1e}")
    for name in ["regnetx_002", "cspresnet50", "resnetv2_50d", "efficientnet_b0", "mobilenetv3_small_100", "resnet18"]:
        torch.manual_seed(0)
        model = groupnorm.convert_batchnorm(timm.create_model(name, pretrained=False, num_classes=10),
                                            num_groups=8, policy="divisor")
        report = groupnorm.check_batch_independence(model.train(), torch.randn(4, 3, 64, 64))
        inp = x.clone().requires_grad_()
        model(inp).sum().backward()
        ok = report.ok and bool(torch.isfinite(inp.grad).all())
        failures += not ok
        n = sum(isinstance(m, groupnorm.GroupNorm) for m in model.modules())
        print(f"{'ok ' if ok else 'BAD'} convert     {name:<20} {n:>3} groupnorm layers, batch-independent: {report.ok}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
