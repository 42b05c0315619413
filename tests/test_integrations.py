"""Real clients: a torchvision-style ResNet-50 and a timm-style ResNet-D, converted to GN and used
the way their users use them (training, state_dict, torch.compile, Opacus)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import GroupNorm, StdConv2d, check_batch_independence, convert_batchnorm
from groupnorm.groups import resolve_groups
from archs import BatchNormAct2d, TimmResNetD, resnet50

BN_ONLY = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def resnet():
    """(the BatchNorm ResNet-50, its GN conversion, the conversion summary)."""
    torch.manual_seed(0)
    bn = resnet50(num_classes=10)
    gn, summary = convert_batchnorm(copy.deepcopy(bn), return_summary=True)
    return bn, gn, summary


def sgd_losses(model, x, y, steps=3, lr=0.003):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def no_inplace(model):
    """Opacus' backward hooks forbid in-place activations on a hooked layer's output."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


# ============================================================================ torchvision-style ResNet-50
def test_resnet50_converts_in_one_call(resnet):
    bn, gn, summary = resnet
    bn_names = [n for n, m in bn.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == 53 and [r.name for r in summary] == bn_names
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    modules = dict(gn.named_modules())
    for r in summary:  # G per layer follows the documented policy: divisor, <= 32, >= 2 channels per group
        layer = modules[r.name]
        assert type(layer) is GroupNorm and layer.num_channels == r.num_channels
        assert layer.num_groups == r.num_groups == resolve_groups(r.num_channels, 32, policy="divisor", min_group_size=2)
        assert layer.num_groups == 32  # every ResNet-50 width divides by 32: the paper's setting throughout
    # every parameter kept bitwise; only BatchNorm's running statistics are gone
    before, after = bn.state_dict(), gn.state_dict()
    assert set(after) == {k for k in before if not k.endswith(BN_ONLY)}
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in after)
    assert sum(p.numel() for p in gn.parameters()) == sum(p.numel() for p in bn.parameters()) == 23_528_522
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert gn.eval()(x).shape == bn.eval()(x).shape == (2, 10)
    # per-layer G for a channels-per-group request: 64 -> 4 groups ... 2048 -> 128
    _, by_size = convert_batchnorm(resnet50(num_classes=10), group_size=16, return_summary=True)
    assert {(r.num_channels, r.num_groups) for r in by_size} == {(c, c // 16) for c in (64, 128, 256, 512, 1024, 2048)}
    assert "layer4.2.bn3" in str(by_size)


def test_resnet50_batch_independence_before_and_after(resnet):
    bn, gn, _ = resnet
    x = torch.randn(2, 3, 48, 48)  # layer4 at 2 x 2: BatchNorm can still run on one sample
    before = check_batch_independence(bn, x)
    bn_names = [n for n, m in bn.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert not before.ok and before.offenders == bn_names
    assert "53 module(s) couple samples themselves" in str(before) and "layer1.0.bn1 (BatchNorm2d)" in str(before)
    after = check_batch_independence(gn, x)
    assert after.ok, str(after)
    assert after.coupled_layers == [] and max(r.deviation for r in after.rows) < 1e-3


def test_resnet50_trains_and_round_trips_its_state_dict(resnet):
    _, gn, _ = resnet
    model = copy.deepcopy(gn)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = sgd_losses(model, x, y)
    assert losses[-1] < losses[0], losses
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = convert_batchnorm(resnet50(num_classes=10))
    fresh.load_state_dict(torch.load(buffer), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def _compile_and_compare(block, backend):
    block = copy.deepcopy(block)
    block.zero_grad(set_to_none=True)
    compiled_src = copy.deepcopy(block)
    compiled = torch.compile(compiled_src, fullgraph=True, backend=backend)  # fullgraph: no graph breaks
    x = torch.randn(2, 256, 8, 8)
    y_eager, y_comp = block(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, atol=1e-4, rtol=1e-4)
    y_eager.square().mean().backward()
    y_comp.square().mean().backward()
    for (name, p1), p2 in zip(block.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.fixture(scope="module")
def gn_ws_block(resnet):
    """ResNet-50's first stage-2 block (downsample included), converted with weight standardization."""
    block = convert_batchnorm(copy.deepcopy(resnet[1].layer2[0]), weight_standardization=True)
    assert type(block.conv2) is StdConv2d and type(block.downsample[0]) is StdConv2d
    return block


def test_compile_captures_a_converted_gn_ws_bottleneck(gn_ws_block):
    """Dynamo + AOT autograd, forward and backward, without code generation (seconds)."""
    _compile_and_compare(gn_ws_block, "aot_eager")


@pytest.mark.slow
def test_compile_inductor_runs_a_converted_gn_ws_bottleneck(gn_ws_block):
    """The default backend generates C++ for every kernel: about a minute on a cold cache here,
    seconds on a warm one; all of ResNet-50 takes several minutes."""
    _compile_and_compare(gn_ws_block, "inductor")


def test_opacus_validates_and_trains_the_converted_resnet50(resnet):
    opacus = pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    import groupnorm.opacus_support  # noqa: F401  (per-sample gradients for GroupNorm)

    bn, gn, _ = resnet
    from opacus.validators.errors import ShouldReplaceModuleError

    errors = ModuleValidator.validate(bn.train(), strict=False)
    assert len(errors) == 53 and all(isinstance(e, ShouldReplaceModuleError) for e in errors)  # one per BatchNorm
    assert ModuleValidator.validate(gn.train(), strict=False) == []

    torch.manual_seed(0)
    model = no_inplace(copy.deepcopy(gn)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = opacus.PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )
    x, y = next(iter(loader))
    loss = F.cross_entropy(private(x), y)
    loss.backward()
    norm = model.layer1[0].bn1
    assert norm.weight.grad_sample.shape == (2, 64) and norm.bias.grad_sample.shape == (2, 64)
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")


# ============================================================================ timm-style ResNet-D
def native_gn_resnet_d():
    """The same net built natively with GN through the norm_layer hooks, the way timm users do."""
    norm = groupnorm.norm_layer(32, policy="divisor", min_group_size=2)
    return TimmResNetD(norm_layer=norm, norm_act_layer=lambda c, act_layer: norm(c, activation="relu"))


def test_timm_style_resnet_d_converts_like_a_native_gn_model():
    torch.manual_seed(0)
    bn = TimmResNetD()
    x = torch.randn(3, 3, 64, 64)
    bn_report = check_batch_independence(bn, x)
    assert not bn_report.ok and "head.bn" in bn_report.offenders  # the BatchNormAct2d subclass too
    bn_names = [n for n, m in bn.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c[0] for c in bn_report.coupled_layers] == bn_names and len(bn_names) == 20
    # the last norm of each block starts at gamma = 0 (zero_init_last): its output is then the constant
    # beta, so only the static scan can name it; the other 17 are caught running
    zero_gamma = {f"layer{i}.0.bn3" for i in range(1, 5)}
    assert bn_report.offenders == [n for n in bn_names if n not in zero_gamma]

    gn, summary = convert_batchnorm(copy.deepcopy(bn), return_summary=True)
    by_name = {r.name: (r.num_channels, r.num_groups) for r in summary}
    assert by_name["conv1.1"] == (24, 12)  # narrow stem: 2 channels per group, not Instance Norm
    assert by_name["bn1"] == (48, 24) and by_name["layer1.0.bn1"] == (16, 8) and by_name["head.bn"] == (256, 32)
    assert gn.head.bn.activation == "relu" and type(gn.head.bn) is GroupNorm
    assert check_batch_independence(gn, x).ok

    native = native_gn_resnet_d()
    assert [(n, m.num_groups) for n, m in native.named_modules() if isinstance(m, GroupNorm)] == [
        (r.name, r.num_groups) for r in summary]
    native.load_state_dict(gn.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(native.eval()(x), gn.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("ws", [False, True], ids=["gn", "gn+ws"])
def test_timm_style_resnet_d_trains_after_conversion(ws):
    torch.manual_seed(0)
    bn = TimmResNetD(norm_act_layer=lambda c, act_layer: BatchNormAct2d(c, act_layer=nn.SiLU))
    model = convert_batchnorm(bn, weight_standardization=ws)
    assert model.head.bn.activation == "silu"
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = sgd_losses(model, x, y, steps=5, lr=0.05)
    assert losses[-1] < losses[0], losses
