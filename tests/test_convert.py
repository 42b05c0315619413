"""convert_batchnorm, StdConv and check_batch_independence on small models (fast unit tests)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import GroupNorm, StdConv1d, StdConv2d, StdConv3d, check_batch_independence, convert_batchnorm
from groupnorm.convert import GroupNormAct, batch_coupled_layers
from archs import BatchNormAct2d, conv1d_net, conv3d_net, mlp_bn1d


def small_cnn(width=48, bn=nn.BatchNorm2d):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), bn(width), nn.ReLU(),
        nn.Conv2d(width, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def randomize_bn(model):
    """Non-trivial affine parameters and running statistics, so that copies can be told apart."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g))
    return model


# ============================================================================ StdConv
def std_weight_f64(w: torch.Tensor, eps: float) -> torch.Tensor:
    """The documented formula in float64: biased variance over (in/groups, *kernel) per filter,
    eps inside the square root."""
    w = w.double()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / flat.shape[1]
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


@pytest.mark.parametrize("cls,conv,shape", [
    (StdConv1d, F.conv1d, (2, 8, 11)),
    (StdConv2d, F.conv2d, (2, 8, 9, 7)),
    (StdConv3d, F.conv3d, (2, 8, 5, 4, 6)),
])
@pytest.mark.parametrize("groups", [1, 4])
def test_stdconv_matches_float64_formula(cls, conv, shape, groups):
    torch.manual_seed(0)
    eps = 1e-3  # large enough that a wrong eps placement shows
    layer = cls(8, 12, 3, padding=1, groups=groups, bias=True, eps=eps)
    with torch.no_grad():  # per-filter variance about eps, with a mean to remove
        layer.weight.normal_(0.3, 0.03)
    x = torch.randn(shape)
    w64 = std_weight_f64(layer.weight, eps)
    expected = conv(x.double(), w64, layer.bias.double(), padding=1, groups=groups)
    out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    # the alternatives other implementations use are measurably different here
    flat = layer.weight.double().reshape(12, -1)
    unbiased = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, keepdim=True) + eps)
    outside = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, correction=0, keepdim=True) + eps)
    for other in (unbiased, outside):
        alt = conv(x.double(), other.reshape(layer.weight.shape), layer.bias.double(), padding=1, groups=groups)
        assert (alt - expected).abs().max() > 1e-2


@pytest.mark.parametrize("cls,base", [(StdConv1d, nn.Conv1d), (StdConv2d, nn.Conv2d), (StdConv3d, nn.Conv3d)])
def test_stdconv_is_a_drop_in_conv(cls, base):
    ref = base(4, 6, 3, stride=2, bias=False)
    layer = cls(4, 6, 3, stride=2, bias=False)
    assert isinstance(layer, base)
    assert list(layer.state_dict()) == list(ref.state_dict())
    layer.load_state_dict(ref.state_dict())
    assert torch.equal(layer.weight, ref.weight)


# ============================================================================ convert_batchnorm: layers
@pytest.mark.parametrize("bn_cls,x_shape", [
    (nn.BatchNorm1d, (4, 64)),
    (nn.BatchNorm1d, (4, 64, 10)),
    (nn.BatchNorm2d, (4, 64, 5, 6)),
    (nn.BatchNorm3d, (4, 64, 3, 4, 5)),
])
def test_each_batchnorm_becomes_the_equivalent_groupnorm(bn_cls, x_shape):
    bn = randomize_bn(nn.Sequential(bn_cls(64, eps=1e-3)))[0]
    model = nn.Sequential(bn)
    model = convert_batchnorm(model, 32)
    gn = model[0]
    assert type(gn) is GroupNorm and (gn.num_groups, gn.num_channels, gn.eps, gn.affine) == (32, 64, 1e-3, True)
    assert gn.weight is bn.weight and gn.bias is bn.bias  # the same Parameters: bitwise, optimizer-safe
    x = torch.randn(x_shape)
    torch.testing.assert_close(gn(x), F.group_norm(x, 32, bn.weight, bn.bias, 1e-3), atol=1e-5, rtol=1e-5)


def test_root_batchnorm_is_replaced_and_returned():
    bn = nn.BatchNorm2d(64)
    out = convert_batchnorm(bn)
    assert type(out) is GroupNorm and out.weight is bn.weight
    assert convert_batchnorm(nn.BatchNorm2d(64, eps=1e-3), eps=1e-6).eps == 1e-6  # one eps for all, if asked


def test_sync_and_lazy_batchnorm():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small_cnn())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 2
    model = convert_batchnorm(model)
    assert [type(m) for m in model if isinstance(m, GroupNorm)] == [GroupNorm, GroupNorm]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)

    lazy = nn.Sequential(nn.Conv2d(3, 48, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d at '1' has not seen data.*forward pass"):
        convert_batchnorm(lazy)
    assert isinstance(lazy[1], nn.LazyBatchNorm2d)  # untouched
    lazy(torch.randn(2, 3, 8, 8))  # materializes: the layer becomes a BatchNorm2d
    lazy = convert_batchnorm(lazy)
    assert type(lazy[1]) is GroupNorm and lazy[1].num_channels == 48


def test_affine_free_frozen_eval_dtype_and_sharing_are_kept():
    free = nn.BatchNorm2d(32, affine=False)
    frozen = nn.BatchNorm2d(64).double()
    frozen.weight.requires_grad_(False)
    frozen.bias.requires_grad_(False)
    frozen.eval()
    shared = nn.BatchNorm2d(16)
    model = nn.ModuleDict(dict(free=free, frozen=frozen, a=shared, b=nn.Sequential(shared)))
    model.train()
    frozen.eval()
    out = convert_batchnorm(model)
    assert out is model
    assert out["free"].affine is False and out["free"].weight is None
    f = out["frozen"]
    assert f.weight.dtype == torch.float64 and not f.weight.requires_grad and not f.bias.requires_grad
    assert f.training is False and out["free"].training is True
    assert out["a"] is out["b"][0]  # a module shared in two places stays one module
    x = torch.randn(2, 64, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(f(x), F.group_norm(x, 32, f.weight, f.bias, f.eps))


def test_an_optimizer_built_before_the_conversion_keeps_working():
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = convert_batchnorm(model)
    before = model[1].weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)


def test_norm_act_subclass_keeps_its_activation():
    """timm's BatchNormAct2d: a lone ReLU/SiLU is fused, anything else is kept as a child."""
    model = nn.Sequential(BatchNormAct2d(64), BatchNormAct2d(64, act_layer=nn.SiLU),
                          BatchNormAct2d(64, act_layer=lambda inplace: nn.LeakyReLU(0.2, inplace)))
    randomize_bn(model)
    ref = copy.deepcopy(model)
    model = convert_batchnorm(model)
    assert (type(model[0]), model[0].activation) == (GroupNorm, "relu")
    assert (type(model[1]), model[1].activation) == (GroupNorm, "silu")
    assert type(model[2]) is GroupNormAct and isinstance(model[2].act, nn.LeakyReLU)
    assert set(model.state_dict()) == {f"{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    x = torch.randn(2, 64, 4, 4)
    for new, old, act in zip(model, ref, (F.relu, F.silu, lambda t: F.leaky_relu(t, 0.2))):
        torch.testing.assert_close(new(x), act(F.group_norm(x, 32, old.weight, old.bias, old.eps)), atol=1e-5, rtol=1e-5)


def test_non_batchnorm_parameters_and_buffers_are_bitwise_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(small_cnn(), nn.LayerNorm(4), nn.InstanceNorm1d(4, affine=True, track_running_stats=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    model = convert_batchnorm(model)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("0.1.") or k.startswith("0.4."):  # the BatchNorms: only weight/bias survive
            if k.endswith(("weight", "bias")):
                assert torch.equal(after[k], v)
            else:
                assert k not in after
        else:
            assert torch.equal(after[k], v) and after[k].dtype == v.dtype, k
    assert {n: id(p) for n, p in model.named_parameters()} == ids


# ============================================================================ convert_batchnorm: group policy
@pytest.mark.parametrize("kwargs,expected", [
    (dict(), {48: 24, 16: 8, 64: 32}),                          # divisor, at least 2 channels per group
    (dict(min_group_size=1), {48: 24, 16: 16, 64: 32}),         # one channel per group only when asked
    (dict(policy="gcd"), {48: 16, 16: 8, 64: 32}),              # Opacus' rule, min 2 channels
    (dict(group_size=16), {48: 3, 16: 1, 64: 4}),               # channels per group instead
    (dict(num_groups=8, min_group_size=4), {48: 8, 16: 4, 64: 8}),
])
def test_group_policy_per_layer(kwargs, expected):
    model = nn.ModuleDict({str(c): nn.BatchNorm2d(c) for c in expected})
    model, summary = convert_batchnorm(model, return_summary=True, **kwargs)
    assert {int(n): model[n].num_groups for n in model} == expected
    assert {r.num_channels: r.num_groups for r in summary} == expected
    for r in summary:
        assert r.num_groups == groupnorm.resolve_groups(
            r.num_channels, kwargs.get("num_groups", None if "group_size" in kwargs else 32),
            group_size=kwargs.get("group_size"), policy=kwargs.get("policy", "divisor"),
            min_group_size=kwargs.get("min_group_size", 2))


def test_strict_policy_error_names_the_layer_and_leaves_the_model_alone():
    model = small_cnn(width=48)
    with pytest.raises(ValueError, match=r"BatchNorm2d at '1' \(48 channels\).*not divisible.*policy='divisor'"):
        convert_batchnorm(model, 32, policy="strict")
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.BatchNorm2d)
    assert type(convert_batchnorm(model, 16, policy="strict")[1]) is GroupNorm


@pytest.mark.parametrize("call,error,match", [
    (lambda: convert_batchnorm({"w": torch.ones(1)}), TypeError, r"expects a torch.nn.Module, got builtins.dict.*state_dict"),
    (lambda: convert_batchnorm(torch.ones(3)), TypeError, "expects a torch.nn.Module"),
    (lambda: convert_batchnorm(small_cnn(), 8, group_size=4), ValueError, "not both"),
    (lambda: convert_batchnorm(small_cnn(), 32, group_size=16), ValueError, "not both"),  # 32 given is 32 asked
    (lambda: convert_batchnorm(small_cnn(), 0), ValueError, "num_groups must be a positive int"),
    (lambda: convert_batchnorm(small_cnn(), policy="nearest"), ValueError, "unknown group policy 'nearest'"),
    (lambda: convert_batchnorm(small_cnn(), eps=-1.0), ValueError, "eps must be a positive number"),
    (lambda: convert_batchnorm(nn.Sequential(nn.BatchNorm2d(8, eps=0.0))), ValueError, r"eps=0.0.*pass eps=1e-5"),
    (lambda: convert_batchnorm(nn.BatchNorm2d(16), group_size=32, policy="strict"), ValueError, r"group_size must be in \[1, num_channels=16\]"),
])
def test_bad_inputs_get_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_summary_is_returned_logged_and_printed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="groupnorm.convert"):
        model, summary = convert_batchnorm(small_cnn(), return_summary=True, verbose=True)
    assert [(r.name, r.old_type, r.num_channels, r.num_groups, r.group_size) for r in summary] == [
        ("1", "BatchNorm2d", 48, 24, 2), ("4", "BatchNorm2d", 16, 8, 2)]
    assert "1: BatchNorm2d(48) -> GroupNorm(24 groups of 2" in caplog.text
    printed = capsys.readouterr().out
    assert printed.startswith("converted 2 BatchNorm layer(s)") and "48   24" in printed
    assert str(summary) in printed
    header, row = printed.splitlines()[1:3]  # columns line up under short layer names too
    assert header.index("was") == row.index("BatchNorm2d") and header.index("affine") == row.index("True")


def test_weight_standardization_swaps_convs_and_keeps_their_weights():
    model = nn.Sequential(conv1d_net(), nn.Unflatten(1, (1, 2)))
    net3 = conv3d_net()
    deconv = nn.ConvTranspose2d(3, 3, 2)
    both = nn.ModuleList([model, net3, deconv])
    convs = {n: m for n, m in both.named_modules() if type(m) in (nn.Conv1d, nn.Conv3d)}
    both, summary = convert_batchnorm(both, weight_standardization=True, return_summary=True)
    assert len(summary.convs()) == len(convs) == 4 and len(summary.norms()) == 4
    assert all(r.eps == 1e-6 and r.num_groups is None for r in summary.convs())
    modules = dict(both.named_modules())
    for n, old in convs.items():
        new = modules[n]
        assert type(new) is {nn.Conv1d: StdConv1d, nn.Conv3d: StdConv3d}[type(old)]
        assert new.weight is old.weight and new.bias is old.bias
        assert (new.stride, new.padding, new.groups) == (old.stride, old.padding, old.groups)
    assert type(both[2]) is nn.ConvTranspose2d  # transposed convs are left alone
    conv = both[0][0][3]  # Conv1d(32, 32, 3, groups=4)
    x = torch.randn(2, 32, 9)
    w = std_weight_f64(conv.weight, conv.eps).float()
    torch.testing.assert_close(conv(x), F.conv1d(x, w, conv.bias, padding=1, groups=4), atol=1e-5, rtol=1e-5)


# ============================================================================ check_batch_independence
class BatchMeanCentering(nn.Module):
    """A custom layer that couples samples without being a BatchNorm: x - x.mean(0)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class NoisyLayer(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


def test_batch_independence_names_the_coupled_layers():
    torch.manual_seed(0)
    model = nn.Sequential(small_cnn(width=16), BatchMeanCentering())
    randomize_bn(model)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    report = check_batch_independence(model, x)
    assert not report.ok
    assert report.offenders == ["0.1", "0.4", "1"]
    assert report["0.1"].alone > 0.1 and report["1"].offender and not report["0.2"].offender
    assert not report["0.2"].ok  # the ReLU after the first BatchNorm moves too, but only downstream
    assert [c[0] for c in report.coupled_layers] == ["0.1", "0.4"]
    text = str(report)
    assert "FAILED" in text and "0.1 (BatchNorm2d)" in text and "1 (BatchMeanCentering)" in text
    # the model is as it was: eval mode, running statistics, RNG
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)

    eval_report = check_batch_independence(model[0], x, train=False)
    assert eval_report.ok, str(eval_report)
    assert "inactive in this mode" in str(eval_report)

    converted = convert_batchnorm(copy.deepcopy(model[0]))
    report = check_batch_independence(converted, x)
    assert report.ok and not report.offenders and report.coupled_layers == []
    assert "OK" in str(report) and len(report.rows) == len(list(converted.modules()))
    assert max(r.deviation for r in report.rows) < 1e-4


def test_batch_independence_on_1d_3d_and_tuple_inputs():
    torch.manual_seed(0)
    mlp = mlp_bn1d()
    report = check_batch_independence(mlp, torch.randn(3, 12))
    assert not report.ok and report.offenders == ["1", "4"]  # found by re-running each on its own inputs
    assert report["1"].offender and report["4"].offender
    with pytest.warns(UserWarning, match="as wide as a Linear layer's output"):  # (N, C) features, 2 per group
        mlp = convert_batchnorm(mlp)
    assert check_batch_independence(mlp, torch.randn(3, 12)).ok

    net = conv3d_net()
    assert not check_batch_independence(net, torch.randn(2, 1, 6, 6, 6)).ok
    assert check_batch_independence(convert_batchnorm(net, 8), torch.randn(2, 1, 6, 6, 6)).ok

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = convert_batchnorm(conv1d_net())

        def forward(self, x, scale):
            return self.net(x) * scale

    assert check_batch_independence(TwoInputs(), (torch.randn(3, 4, 10), torch.rand(3, 1))).ok


def test_batch_independence_single_sample_failure_and_randomness():
    # BatchNorm1d on (N, C) cannot even run on one sample in training
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    report = check_batch_independence(model, torch.randn(4, 4))
    assert not report.ok and "fails on sample 0 alone (raised in '1')" in str(report)
    assert report.offenders == ["1"]

    # torch Dropout is switched off; other random layers are reported, not mistaken for coupling
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU())
    report = check_batch_independence(drop, torch.randn(4, 4))
    assert report.ok and "Dropout" in str(report) and drop[1].training
    report = check_batch_independence(nn.Sequential(nn.Linear(4, 4), NoisyLayer()), torch.randn(4, 4))
    assert not report.ok and "random layer" in str(report) and "'1' (NoisyLayer)" in str(report)

    # identical samples hide BatchNorm's coupling from the dynamic check; the static scan still fails it
    same = torch.randn(1, 3, 8, 8).expand(4, -1, -1, -1)
    report = check_batch_independence(small_cnn(), same)
    assert not report.ok and "all samples are identical" in str(report)


def test_batch_independence_bad_inputs():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        check_batch_independence(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        check_batch_independence(nn.Linear(3, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        check_batch_independence(nn.Linear(3, 3), (torch.randn(2, 3), torch.randn(3, 3)))
    with pytest.raises(TypeError, match="tensor or a tuple/list of tensors"):
        check_batch_independence(nn.Linear(3, 3), [1, 2])


def test_batch_independence_one_tolerance_takes_the_other_default_and_bad_ones_are_refused():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(3, 4)
    report = check_batch_independence(model, x, atol=1e-4)
    assert (report.atol, report.rtol) == (1e-4, None) and report.ok
    assert "<= 0.0001 + 0.001*max|ref| (rtol per dtype, shown for float32)" in str(report)
    report = check_batch_independence(model, x, rtol=1e-2)
    assert (report.atol, report.rtol) == (None, 1e-2)
    assert "<= 1e-05 + 0.01*max|ref| (atol per dtype, shown for float32)" in str(report)
    report = check_batch_independence(model, x, atol=0, rtol=0.5)
    assert "<= 0 + 0.5*max|ref|):" in str(report)
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"atol must be a finite number >= 0"):
            check_batch_independence(model, x, atol=bad)
    with pytest.raises(ValueError, match=r"rtol must be a finite number >= 0 .*got -1"):
        check_batch_independence(model, x, rtol=-1)
    for bad in ("1e-4", True, torch.tensor(1e-4)):
        with pytest.raises(TypeError, match=r"rtol must be a number >= 0"):
            check_batch_independence(model, x, rtol=bad)


def test_static_scan_modes():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False), nn.GroupNorm(2, 4))
    assert [(n, a) for n, _, a, _ in batch_coupled_layers(model, train=True)] == [("0", True), ("1", True)]
    assert [(n, a) for n, _, a, _ in batch_coupled_layers(model, train=False)] == [("0", False), ("1", True)]


# ============================================================================ Opacus grad sampler
@pytest.mark.parametrize("layer", [
    GroupNorm(4, 8),
    GroupNorm(4, 8, activation="silu"),
    GroupNorm(4, 8, activation="gelu"),
    "norm_act",
])
def test_opacus_per_sample_grads_equal_single_sample_grads(layer):
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    torch.manual_seed(0)
    if layer == "norm_act":
        layer = convert_batchnorm(BatchNormAct2d(8, act_layer=lambda inplace: nn.LeakyReLU(0.1, inplace)), 4)
        assert layer.act.inplace
        assert type(layer) is GroupNormAct
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 8, 5, 5)
    dy = torch.randn(3, 8, 5, 5)
    grads = per_sample_grads(layer, [x], dy)
    _assert_each_sample_matches(layer, x, dy, grads)
    assert math.isfinite(float(grads[layer.weight].sum()))


def test_opacus_expanded_weights_mode_trains_a_gn_model():
    """Opacus' grad_sample_mode="ew" (torch's ExpandedWeights) and "functorch" next to its default
    hooks: the same per-sample gradients of the GN layer's gamma and beta."""
    opacus = pytest.importorskip("opacus")
    grads = {}
    for mode in ("hooks", "functorch", "ew"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), GroupNorm(4, 8, activation="silu"), nn.Flatten(), nn.Linear(8 * 36, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0]))
        loader = torch.utils.data.DataLoader(data, batch_size=3)
        private, optimizer, loader = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode,
        )
        x, y = next(iter(loader))
        F.cross_entropy(private(x), y).backward()
        grads[mode] = [model[1].weight.grad_sample.clone(), model[1].bias.grad_sample.clone()]
        assert grads[mode][0].shape == (3, 8)
        optimizer.step()
    for mode in ("functorch", "ew"):
        for got, exp in zip(grads[mode], grads["hooks"]):
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)


def test_opacus_per_sample_grads_of_a_weight_standardized_conv():
    """GN+WS under Opacus: hooks (Opacus' default) and functorch give StdConv2d's true per-sample
    gradients (those of the raw weight, through the standardization); ExpandedWeights ("ew") cannot,
    and say so."""
    opacus = pytest.importorskip("opacus")
    for mode in ("hooks", "functorch", "ew"):
        torch.manual_seed(0)
        bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
        model = convert_batchnorm(bn, weight_standardization=True)
        assert type(model[0]) is StdConv2d
        data = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0]))
        private, _, loader = opacus.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode, loss_reduction="sum",
        )
        x, y = next(iter(loader))
        if mode == "ew":
            with pytest.raises(RuntimeError, match="StdConv2d cannot run under torch's ExpandedWeights.*'hooks'"):
                private(x)
            continue
        F.cross_entropy(private(x), y, reduction="sum").backward()
        got = model[0].weight.grad_sample.clone()
        for i in range(4):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
            torch.testing.assert_close(got[i], model[0].weight.grad, atol=1e-5, rtol=1e-4)


# ============================================================================ found by the session-6 review
def test_a_module_registered_twice_under_one_parent_is_converted_in_every_slot():
    bn = nn.BatchNorm2d(8)
    conv = nn.Conv2d(8, 8, 1)
    model = convert_batchnorm(nn.Sequential(conv, bn, nn.ReLU(), conv, bn), weight_standardization=True)
    assert [type(m).__name__ for m in model] == ["StdConv2d", "GroupNorm", "ReLU", "StdConv2d", "GroupNorm"]
    assert model[0] is model[3] and model[1] is model[4]  # still shared, now as the new layers
    shared = convert_batchnorm(nn.ModuleList([nn.BatchNorm2d(8)] * 3))
    assert all(type(m) is GroupNorm for m in shared) and shared[0] is shared[2]


def test_weight_norm_and_parametrized_layers_are_refused_before_any_change():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.BatchNorm2d(8), torch.nn.utils.weight_norm(nn.Conv2d(8, 8, 3)), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"Conv2d at '1' .*remove_weight_norm"):
        convert_batchnorm(model, weight_standardization=True)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]  # nothing half-converted
    assert type(convert_batchnorm(model)[0]) is GroupNorm  # without WS the conv is not touched

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    bn = nn.BatchNorm2d(8)
    parametrize.register_parametrization(bn, "weight", Double())
    model = nn.Sequential(nn.BatchNorm2d(8), bn)
    with pytest.raises(ValueError, match=r"at '1' has parametrized tensors \(weight\).*remove_parametrizations"):
        convert_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d

    # a conv under torch.nn.utils.parametrizations (a generated ParametrizedConv2d subclass) is refused too
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3))
    model = nn.Sequential(nn.BatchNorm2d(8), conv)
    with pytest.raises(ValueError, match=r"ParametrizedConv2d at '1' has parametrized tensors \(weight\)"):
        convert_batchnorm(model, weight_standardization=True)
    assert type(model[0]) is nn.BatchNorm2d and model[1] is conv
    assert type(convert_batchnorm(model)[0]) is GroupNorm and model[1] is conv  # without WS: untouched


def test_weight_standardization_names_the_conv_subclasses_it_leaves_plain():
    class SamePadConv(nn.Conv2d):  # e.g. timm's Conv2dSame: its own forward
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), SamePadConv(8, 8, 3), StdConv2d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"left 1 convolution subclass\(es\) plain \('2' \(.*SamePadConv\)\)"):
        convert_batchnorm(model, num_groups=4, weight_standardization=True)
    assert [type(m) for m in model] == [StdConv2d, GroupNorm, SamePadConv, StdConv2d]


def test_weight_standardization_leaves_one_weight_filters_plain_and_says_so():
    model = nn.Sequential(nn.Conv1d(1, 8, 1), nn.BatchNorm1d(8), nn.Conv1d(8, 8, 3))
    with pytest.warns(UserWarning, match=r"skipped 1 convolution\(s\) with one weight per filter \('0'\)"):
        convert_batchnorm(model, num_groups=4, weight_standardization=True)
    assert type(model[0]) is nn.Conv1d and type(model[2]) is StdConv1d
    with pytest.raises(ValueError, match="one weight per output filter"):
        StdConv2d(4, 4, 1, groups=4)  # depthwise 1x1: standardized, every weight would be 0


def test_batchnorm1d_with_few_channels_per_group_warns_about_feature_inputs():
    with pytest.warns(UserWarning, match=r"BatchNorm1d layer\(s\) '1' \(64 channels, 2 per group\).*group_size=C"):
        convert_batchnorm(nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64)))
    head = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64))
    convert_batchnorm(head, group_size=64)  # the fix the warning gives: one group, no warning
    assert head[1].num_groups == 1


def test_batch_independence_leaves_the_callers_batch_alone():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x.sub_(0.5).mul_(2))

    x = torch.randn(4, 3, 8, 8)
    before = x.clone()
    report = check_batch_independence(InPlace(), x)
    assert report.ok, str(report)
    assert torch.equal(x, before)


def test_batch_independence_skips_outputs_whose_dim0_is_not_the_batch():
    class SeqFirst(nn.Module):  # an RNN fed (L, N, H); with L == N its dim 0 looks like the batch
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(8, 8)

        def forward(self, x):
            return self.rnn(x.transpose(0, 1))[0].transpose(0, 1)

    assert check_batch_independence(SeqFirst(), torch.randn(4, 4, 8)).ok
    bn_after = nn.Sequential(SeqFirst(), nn.Flatten(), nn.BatchNorm1d(32))
    assert not check_batch_independence(bn_after, torch.randn(4, 4, 8)).ok  # real coupling is still found


def test_opacus_refuses_a_dropout_child_it_would_resample():
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    layer = convert_batchnorm(BatchNormAct2d(8, act_layer=lambda inplace: nn.LeakyReLU(0.1, inplace),
                                             drop_layer=lambda: nn.Dropout(0.5)), 4)
    assert type(layer) is GroupNormAct and isinstance(layer.drop, nn.Dropout)
    x = torch.randn(3, 8, 5, 5)
    with pytest.raises(RuntimeError, match=r"Dropout\(p=0.5\) would draw a different mask"):
        per_sample_grads(layer, [x], torch.randn(3, 8, 5, 5))
    layer.eval()  # no mask in eval: allowed
    assert per_sample_grads(layer, [x], torch.randn(3, 8, 5, 5))[layer.weight].shape == (3, 8)


def test_opacus_per_sample_grads_without_a_bias():
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    torch.manual_seed(29)
    layer = GroupNorm(2, 4, activation="relu", bias=False)
    with torch.no_grad():
        layer.weight.normal_()
    x, dy = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    grads = per_sample_grads(layer, [x], dy)
    assert set(grads) == {layer.weight}
    for i in range(3):
        layer.zero_grad()
        layer(x[i:i + 1]).backward(dy[i:i + 1])
        torch.testing.assert_close(grads[layer.weight][i], layer.weight.grad, atol=1e-5, rtol=1e-4)


def test_opacus_per_sample_grads_skip_a_frozen_weight():
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    layer = GroupNorm(2, 8)
    layer.weight.requires_grad_(False)
    assert set(per_sample_grads(layer, [torch.randn(3, 8, 4)], torch.randn(3, 8, 4))) == {layer.bias}

def test_weight_standardization_keeps_dilation_padding_mode_and_eval_mode():
    from groupnorm.layers import standardize_weight

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode="circular"), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 4, 9, 9)
    conv = model[0]
    convert_batchnorm(model, 4, weight_standardization=True)
    new = model[0]
    assert isinstance(new, StdConv2d) and new.weight is conv.weight
    assert new.dilation == (2, 2) and new.padding_mode == "circular" and not new.training
    expected = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="circular"), standardize_weight(conv.weight, 1e-6), conv.bias,
                        dilation=2)
    torch.testing.assert_close(new(x), expected)


def test_frozen_batchnorm_by_name_is_not_batch_coupled():
    class FrozenBatchNorm2d(nn.Module):  # torchvision's name: fixed statistics, per sample
        def forward(self, x):
            return x

    assert batch_coupled_layers(nn.Sequential(FrozenBatchNorm2d())) == []


def test_batch_independence_sees_position_nan_and_shape_coupling():
    """Couplings BatchNorm does not show: an output that depends on the sample's place in the batch
    (only the shuffled run sees it), a statistic that is NaN for a sample alone, an output whose
    shape follows the batch size."""
    class AddIndex(nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1)

    class BatchStd(nn.Module):
        def forward(self, x):
            return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True)

    class Tile(nn.Module):
        def forward(self, x):
            return x.repeat(1, x.shape[0])

    x = torch.randn(4, 3)
    r = check_batch_independence(nn.Sequential(AddIndex()), x)
    assert not r.ok and r["0"].shuffled >= 0.5, r["0"]
    assert not check_batch_independence(BatchStd(), x).ok
    assert not check_batch_independence(Tile(), x).ok
    assert check_batch_independence(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), x).ok  # the control


def test_instance_norm_warning_only_when_not_asked_for(caplog):
    with caplog.at_level(logging.WARNING, logger="groupnorm.convert"):
        convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 4, min_group_size=1)
    assert "Instance Norm" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="groupnorm.convert"):
        convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 4, policy="strict")
    assert "Instance Norm" in caplog.text


def test_conversion_summary_rows():
    """The summary says what each layer became: affine as the BatchNorm's, convolutions with the
    StdConv's eps (not NaN)."""
    import math

    from groupnorm import convert_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32, affine=False), nn.BatchNorm2d(32))
    _, summary = convert_batchnorm(model, weight_standardization=True, return_summary=True)
    norms = {r.name: r for r in summary.norms()}
    assert norms["1"].affine is False and norms["2"].affine is True
    (conv,) = summary.convs()
    assert conv.name == "0" and not math.isnan(conv.eps) and conv.eps == model[0].eps == 1e-6


def test_opacus_grad_sampler_is_registered_for_both_layer_types():
    """Importing groupnorm.opacus_support registers per_sample_grads for GroupNormAct too (else Opacus
    falls back to torch.func for it, which cannot refuse a dropout child it would resample)."""
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModule

    from groupnorm.opacus_support import per_sample_grads

    assert GradSampleModule.GRAD_SAMPLERS[GroupNorm] is per_sample_grads
    assert GradSampleModule.GRAD_SAMPLERS[GroupNormAct] is per_sample_grads


def test_opacus_per_sample_grads_take_a_rate_zero_dropout_and_skip_a_frozen_bias():
    """A Dropout child with p=0 draws no mask (the refusal's own advice is to set the rate to 0), so it
    is accepted in training mode; a frozen bias gets no per-sample gradient, as a frozen weight."""
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    torch.manual_seed(30)
    layer = convert_batchnorm(BatchNormAct2d(8, act_layer=lambda inplace: nn.LeakyReLU(0.1, inplace),
                                             drop_layer=lambda: nn.Dropout(0.0)), 4).train()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x, dy = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    grads = per_sample_grads(layer, [x], dy)
    _assert_each_sample_matches(layer, x, dy, grads)
    layer.bias.requires_grad_(False)
    assert set(per_sample_grads(layer, [x], dy)) == {layer.weight}


def test_opacus_per_sample_grads_have_the_parameters_dtype_under_mixed_precision():
    """bfloat16 activations and gradients (autocast) with float32 parameters: the per-sample gradients
    are float32 like the parameters they belong to (Opacus adds them to p.grad-shaped buffers)."""
    pytest.importorskip("opacus")
    from groupnorm.opacus_support import per_sample_grads

    torch.manual_seed(31)
    layer = GroupNorm(2, 8)
    x, dy = torch.randn(3, 8, 6, dtype=torch.bfloat16), torch.randn(3, 8, 6, dtype=torch.bfloat16)
    grads = per_sample_grads(layer, [x], dy)
    assert grads[layer.weight].dtype == grads[layer.bias].dtype == torch.float32
    xhat = F.group_norm(x.double(), 2)
    torch.testing.assert_close(grads[layer.weight].double(), (xhat * dy.double()).sum(2), atol=0.1, rtol=0.02)
    torch.testing.assert_close(grads[layer.bias].double(), dy.double().sum(2), atol=0.1, rtol=0.02)


def _assert_each_sample_matches(layer, x, dy, grads):
    """grads (per-sample weight and bias gradients) equal one backward pass per sample."""
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i:i + 1]).backward(dy[i:i + 1])
        torch.testing.assert_close(grads[layer.weight][i], layer.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[layer.bias][i], layer.bias.grad, atol=1e-5, rtol=1e-4)
