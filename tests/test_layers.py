"""The GroupNorm layer as a drop-in for torch.nn.GroupNorm, and the norm_layer factory."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import GroupNorm, norm_layer


def test_state_dict_round_trip_with_torch():
    ours = GroupNorm(8, 32)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs = nn.GroupNorm(8, 32)
    theirs.load_state_dict(ours.state_dict())  # strict: same keys
    back = GroupNorm(8, 32)
    back.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 32, 5, 5)
    torch.testing.assert_close(back(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert not GroupNorm(8, 32, affine=False).state_dict()


def test_same_attributes_as_torch():
    ours, theirs = GroupNorm(4, 16, eps=1e-6, affine=False), nn.GroupNorm(4, 16, eps=1e-6, affine=False)
    for attr in ("num_groups", "num_channels", "eps", "affine", "weight", "bias"):
        assert getattr(ours, attr) == getattr(theirs, attr)


def test_group_size_and_policy_show_in_repr():
    m = GroupNorm(num_channels=64, group_size=16)
    assert m.num_groups == 4 and "group_size=16" in repr(m)
    m = GroupNorm(32, 48, policy="divisor")
    assert m.num_groups == 24
    assert "GroupNorm(24, 48" in repr(m) and "requested_groups=32" in repr(m) and "'divisor'" in repr(m)
    with pytest.raises(ValueError, match="group counts that work"):
        GroupNorm(32, 48)


def test_activation_is_fused_and_matches_modules():
    x = torch.randn(2, 16, 6, 6)
    for act, module in (("relu", nn.ReLU()), ("silu", nn.SiLU()), ("gelu", nn.GELU())):
        m = GroupNorm(4, 16, activation=act)
        torch.testing.assert_close(m(x), module(nn.GroupNorm(4, 16)(x)), atol=1e-5, rtol=1e-5)
        assert f"activation={act!r}" in repr(m)
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(4, 16, activation="tanh")


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_channels=16.*12 channels"):
        GroupNorm(4, 16)(torch.randn(2, 12, 3))


def test_device_dtype_and_training_step():
    m = GroupNorm(2, 8, dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = (m(x) - 1).pow(2).mean()
    loss.backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    opt.step()
    assert (m(x) - 1).pow(2).mean().item() < loss.item()


def test_norm_layer_factory_like_torchvision_and_timm():
    make = norm_layer(32)
    m = make(256)
    assert isinstance(m, GroupNorm) and m.num_groups == 32 and m.num_channels == 256
    assert make(128, eps=1e-6).eps == 1e-6  # timm passes overrides as keywords
    by_size = norm_layer(group_size=16)
    assert by_size(64).num_groups == 4 and by_size(256).num_groups == 16
    relaxed = norm_layer(32, policy="divisor", min_group_size=4)
    assert relaxed(48).num_groups == 12 and relaxed(16).num_groups == 4
    # the relaxed policy keeps convert_batchnorm's guard against one channel per group (Instance Norm)
    assert norm_layer(32, policy="divisor")(16).num_groups == 8
    assert GroupNorm(32, 16, policy="divisor").num_groups == 8
    assert norm_layer(32, policy="divisor", min_group_size=1)(16).num_groups == 16
    assert norm_layer(16)(16).num_groups == 16  # strict: an exact request stands
    assert pickle.loads(pickle.dumps(make))(64).num_groups == 32
    assert "num_groups=32" in repr(make)
    with pytest.raises(ValueError, match="group counts that work"):
        make(48)


def test_factory_passes_timms_check_and_ignores_batchnorm_arguments():
    import functools
    import types

    make = norm_layer(group_size=8)
    # timm's get_norm_layer accepts types, strings, plain functions and partials, and re-binds partials
    assert isinstance(make, (type, str, types.FunctionType, functools.partial))
    rebound = functools.partial(make.func, **make.keywords)
    assert rebound(64).num_groups == 8
    m = make(64, momentum=0.1, track_running_stats=True)  # what BN-era ResNet code passes
    assert isinstance(m, GroupNorm) and m.num_groups == 8
    with pytest.raises(ValueError, match="not both"):
        norm_layer(8, group_size=16)
    assert norm_layer()(64).num_groups == 32


def test_factory_answers_timms_norm_act_calls():
    """What timm's get_norm_act_layer / ConvNormAct / EfficientNet blocks / ResNetV2 do with a
    function-type norm layer: unbind the partial, rebind its keywords, call it with apply_act (and
    act_kwargs, drop_layer) or with inplace=True alone, never with act_layer (checked against timm
    1.0.31's create_norm_act.py, conv_bn_act.py and _efficientnet_blocks.py)."""
    import functools

    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5)
    ref = F.group_norm(x, 4)

    def timm_rebind(factory):
        return functools.partial(factory.func, **factory.keywords)

    relu = timm_rebind(norm_layer(4, activation="relu"))
    assert relu(16).activation == "relu" and relu(16, apply_act=True, act_kwargs=None).activation == "relu"
    assert relu(16, apply_act=False).activation is None  # ResNetV2's norm3 / ConvNormAct(apply_act=False)
    torch.testing.assert_close(relu(16, apply_act=True)(x), F.relu(ref))
    torch.testing.assert_close(relu(16, apply_act=False)(x), ref)

    # no activation in the factory: timm's apply_act=True would silently lose the model's activation
    plain = timm_rebind(norm_layer(4))
    for norm_act_call in (dict(apply_act=True, act_kwargs=None), dict(inplace=True), dict(act_kwargs=None),
                          dict(drop_layer=None)):
        with pytest.raises(TypeError, match="activation='relu'"):
            plain(16, **norm_act_call)
    assert plain(16, apply_act=False).activation is None and plain(16).activation is None
    none = timm_rebind(norm_layer(4, activation="none"))
    assert none(16, apply_act=True, act_kwargs={"negative_slope": 0.1}).activation is None
    silu = timm_rebind(norm_layer(4, activation="silu"))
    assert silu(16, inplace=True).activation == "silu"  # EfficientNet's bn1/bn2
    with pytest.raises(ValueError, match="cannot be applied to the fused activation"):
        silu(16, apply_act=True, act_kwargs={"negative_slope": 0.1})
    m = relu(16, apply_act=True, device="meta", dtype=torch.float64)
    assert m.weight.device.type == "meta" and m.weight.dtype == torch.float64

    # act_layer (bound by the user, or passed by a caller that names it): fused when GroupNorm can
    assert plain(16, apply_act=True, act_layer=nn.SiLU).activation == "silu"
    assert plain(16, act_layer="swish").activation == "silu"
    with pytest.raises(ValueError, match="get_act_layer"):
        plain(16, act_layer="hard_swish")
    with pytest.raises(ValueError, match="leave the factory's activation unset"):
        relu(16, act_layer=nn.SiLU)
    leaky = timm_rebind(norm_layer(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}))
    layer = leaky(16, apply_act=True, act_kwargs=None)
    assert type(layer).__name__ == "GroupNormAct" and layer.activation is None
    torch.testing.assert_close(layer(x), F.leaky_relu(ref, 0.2))
    assert type(leaky(16, apply_act=False)) is GroupNorm

    # drop_layer runs between the norm and the activation, so the activation is not fused
    dropped = relu(16, apply_act=True, drop_layer=functools.partial(nn.Dropout, 0.5))
    assert [n for n, _ in dropped.named_children()] == ["drop", "act"] and dropped.activation is None
    torch.testing.assert_close(dropped.eval()(x), F.relu(ref))
    dropped.train()
    torch.manual_seed(1)
    y = dropped(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, F.relu(F.dropout(ref, 0.5)))
    assert {k for k in dropped.state_dict()} == {"weight", "bias"}
    no_act = relu(16, apply_act=False, drop_layer=nn.Dropout)
    assert [n for n, _ in no_act.named_children()] == ["drop"] and no_act.activation is None

    swish = timm_rebind(norm_layer(4, act_layer="swish", act_kwargs={"inplace": True}))
    assert swish(16, apply_act=True, act_kwargs=None).activation == "silu"
    for bad, error in (("hard_swish", ValueError), (42, TypeError)):  # checked when the factory is made
        with pytest.raises(error, match="act_layer"):
            norm_layer(4, act_layer=bad)

    with pytest.raises(TypeError, match="not both"):
        norm_layer(4, activation="relu", act_layer=nn.ReLU)
    with pytest.raises(TypeError, match="act_kwargs needs act_layer"):
        norm_layer(4, act_kwargs={"inplace": True})


def test_positional_device_dtype_and_isinstance_like_torch():
    m = GroupNorm(4, 16, 1e-5, True, None, torch.float64)
    assert m.weight.dtype == torch.float64
    assert isinstance(m, nn.GroupNorm)
    assert "group_size=32 (used: 24)" in repr(GroupNorm(num_channels=48, group_size=32, policy="divisor"))
    with pytest.raises(ValueError, match="eps must be a positive finite"):
        GroupNorm(2, 4, eps=float("inf"))


def test_fx_symbolic_trace():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GroupNorm(2, 8, activation="relu"))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x))


def test_module_deepcopy_and_pickle():
    m = GroupNorm(4, 16, activation="silu")
    m2 = pickle.loads(pickle.dumps(copy.deepcopy(m)))
    x = torch.randn(2, 16, 3)
    torch.testing.assert_close(m(x), m2(x))


def test_layer_in_a_real_network_matches_torch():
    torch.manual_seed(0)

    def net(norm):
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), norm(32), nn.ReLU(), nn.Conv2d(32, 10, 1))

    ours = net(lambda c: GroupNorm(8, c))
    theirs = net(lambda c: nn.GroupNorm(8, c))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    ours = ours.to(memory_format=torch.channels_last)
    y1, y2 = ours(x), theirs(x.contiguous())
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (n, p1), p2 in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-3, rtol=1e-3, msg=n)


def test_stdconv_keeps_conv_state_dict_keys():
    conv = nn.Conv2d(4, 8, 3, bias=True)
    std = groupnorm.StdConv2d.from_conv(conv)
    assert list(std.state_dict()) == list(conv.state_dict())
    assert torch.equal(std.weight, conv.weight) and torch.equal(std.bias, conv.bias)
    w = conv.weight.double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    w_hat = (w - mean) / torch.sqrt(var + 1e-6)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(std.double()(x), F.conv2d(x, w_hat, conv.bias.double()))


def test_norm_layer_checks_its_request_up_front_and_takes_batchnorm_call_forms():
    for kwargs, match in [(dict(policy="bad"), "unknown group policy"), (dict(activation="swish"), "activation"),
                          (dict(eps=0), "eps"), (dict(num_groups=0), "num_groups must be a positive int"),
                          (dict(group_size=2, min_group_size=0), "min_group_size")]:
        with pytest.raises(ValueError, match=match):
            norm_layer(**kwargs)
    make = norm_layer(32)
    assert make(num_features=64).num_channels == 64  # BatchNorm's keyword
    layer = make(64, 1e-3, 0.1, True, True)  # BatchNorm's positional order: eps, momentum, affine, track_running_stats
    assert layer.eps == 1e-3 and layer.affine
    with pytest.raises(ValueError, match="policy='divisor'"):
        make(24)  # fewer channels than groups: the message names the policy that would take it
    with pytest.raises(TypeError, match="channel count once"):
        make()


def test_stdconv_rejects_eps_that_is_not_a_positive_finite_number():
    for bad in (0.0, -1e-6, float("inf"), float("nan"), True, "1e-5"):
        with pytest.raises(ValueError, match="positive finite"):
            groupnorm.StdConv2d(4, 4, 3, eps=bad)


def test_bias_false_and_numpy_integers_like_torch():
    import numpy as np

    layer = GroupNorm(4, 8, bias=False)  # torch's keyword-only bias
    assert layer.bias is None and layer.weight is not None and "bias=False" in repr(layer)
    layer.load_state_dict(torch.nn.GroupNorm(4, 8, bias=False).state_dict())
    x = torch.randn(2, 8, 5, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    assert norm_layer(4)(8, bias=False).bias is None
    assert repr(GroupNorm(4, 8)) == repr(torch.nn.GroupNorm(4, 8))
    m = GroupNorm(np.int64(4), np.int64(8))
    assert (m.num_groups, m.num_channels) == (4, 8) and type(m.num_channels) is int


def test_torch_jit_script_runs_the_registered_op_and_loads_in_a_fresh_process(tmp_path):
    """Found in review: torch.jit.script(GroupNorm) failed ("builtin cannot be used as a value"),
    while torch.nn.GroupNorm scripts. Scripted, the layer calls groupnorm::forward."""
    from helpers import run_fresh

    from groupnorm.layers import GroupNormAct

    torch.manual_seed(28)
    kept = norm_layer(2, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})(8)  # GroupNormAct
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), GroupNorm(4, 8, activation="silu"),
                                GroupNorm(2, 8, affine=False), kept)
    eager = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    assert "groupnorm::forward" in "".join(str(m.inlined_graph) for m in scripted.children())
    assert [type(m) for m in model] == [torch.nn.Conv2d, GroupNorm, GroupNorm, GroupNormAct]  # eager model untouched
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y, ref = scripted(x), eager(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    torch.save({"x": x.detach(), "y": ref.detach()}, tmp_path / "io.pt")
    code = (f"import torch, groupnorm\nm = torch.jit.load({str(path)!r})\nio = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "torch.testing.assert_close(m(io['x']), io['y'])\nprint('LOADED')\n")
    run_fresh(code, "LOADED")


def test_weight_norm_and_parametrize_on_the_layer():
    """The layer reads its Parameters straight from _parameters when it can; old-style weight_norm
    moves `weight` out of that dict (recomputed by a pre-hook) and parametrize swaps the class in:
    both must still see their weight."""
    import warnings

    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wn = torch.nn.utils.weight_norm(GroupNorm(4, 16), name="weight", dim=0)
    with torch.no_grad():
        wn.weight_g.mul_(3.0)
        wn.bias.add_(1.0)
    y = wn(x)
    torch.testing.assert_close(y, F.group_norm(x, 4, wn.weight, wn.bias))
    y.sum().backward()
    assert wn.weight_g.grad is not None and wn.weight_v.grad is not None

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    pm = GroupNorm(4, 16, activation="relu")
    parametrize.register_parametrization(pm, "weight", Double())
    torch.testing.assert_close(pm(x), F.relu(F.group_norm(x, 4, 2 * pm.parametrizations.weight.original, pm.bias)))


def test_tanh_gelu_is_not_fused_as_exact_gelu():
    """GELU(approximate="tanh") is another function (~1e-3 off the exact one): the factory keeps it as
    its own module instead of fusing "gelu"."""
    import functools

    from groupnorm.layers import fused_activation

    assert fused_activation(nn.GELU(approximate="tanh")) is None and fused_activation(nn.GELU()) == "gelu"
    layer = norm_layer(4, act_layer=functools.partial(nn.GELU, approximate="tanh"))(16)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(layer(x), F.gelu(F.group_norm(x, 4), approximate="tanh"))


def test_stdconv_from_conv_keeps_padding_mode_frozen_weight_and_eval_mode():
    from groupnorm.layers import StdConv2d, standardize_weight

    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").eval()
    conv.weight.requires_grad_(False)
    std = StdConv2d.from_conv(conv)
    assert std.padding_mode == "reflect" and not std.training
    assert not std.weight.requires_grad and std.bias.requires_grad
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), standardize_weight(conv.weight, 1e-6), conv.bias)
    torch.testing.assert_close(std(x), expected)


def test_activation_none_is_stored_as_none():
    """GroupNorm(..., activation="none") is a plain GroupNorm: activation None, torch's repr."""
    from groupnorm import GroupNorm

    m = GroupNorm(2, 4, activation="none")
    assert m.activation is None
    assert repr(m) == repr(GroupNorm(2, 4)) == repr(nn.GroupNorm(2, 4))


def test_factory_call_forms_it_refuses_or_takes():
    """A call the factory cannot read is an error, not a silent guess: a fifth BatchNorm positional
    argument, or the channel count given twice. timm's act_kwargs={'inplace': True} is fine with a
    fused activation (in-place means nothing there), and act_layer names are not case-sensitive."""
    make = norm_layer(4)
    with pytest.raises(TypeError, match="at most 5 positional arguments"):
        make(16, 1e-3, 0.1, True, True, "extra")
    with pytest.raises(TypeError, match="channel count once"):
        make(16, num_features=16)
    relu = norm_layer(4, activation="relu")
    assert relu(16, apply_act=True, act_kwargs={"inplace": True}).activation == "relu"
    assert make(16, act_layer="SiLU").activation == "silu" and make(16, act_layer="ReLU").activation == "relu"


def test_factory_passes_affine_and_eps_to_every_layer():
    layer = norm_layer(4, affine=False, eps=1e-3)(16)
    assert not layer.affine and layer.weight is None and layer.bias is None and layer.eps == 1e-3
    x = torch.randn(2, 16, 5)
    torch.testing.assert_close(layer(x), F.group_norm(x, 4, eps=1e-3))
