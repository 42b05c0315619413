"""Every bad input gets a clear error that names the problem (and the fix), never a wrong answer."""

import pytest
import torch

from groupnorm import GroupNorm, group_norm

X = torch.randn(2, 8, 4, 4)


@pytest.fixture(scope="module", autouse=True)
def _fast_lane_loaded():
    """One good call first, which loads the compiled fast lane where it is available (as any earlier
    test would): every bad call below then meets its C++ argument checks too, whatever the test order
    (run alone, this file used to test the Python checks only)."""
    group_norm(torch.randn(2, 4, 3), 2)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: group_norm(torch.randn(8), 2), ValueError, r"at least 2 dimensions.*unsqueeze\(0\) makes it \(1, 8\)"),
        # a scalar needs more than a batch dimension: the shape to give, not unsqueeze(0)
        (lambda: group_norm(torch.tensor(1.0), 1), ValueError,
         r"shape \(N, C, \*\) with at least 2 dimensions .*got a 0-d tensor .*e\.g\. shape \(8, 32\)[^u]*$"),
        (lambda: group_norm(torch.randn(2, 0, 3), 1), ValueError, r"^the input has no channels: shape \(2, 0, 3\) has C = 0"),
        (lambda: group_norm(torch.randn(2, 0), 0), ValueError, r"^the input has no channels"),
        (lambda: group_norm(torch.ones(2, 8, 3, dtype=torch.int64), 2), TypeError, r"torch.int64.*float\(\)"),
        (lambda: group_norm(torch.ones(2, 8, 3, dtype=torch.bool), 2), TypeError, "torch.bool"),
        (lambda: group_norm(torch.ones(2, 8, dtype=torch.complex64), 2), TypeError, "complex64"),
        (lambda: group_norm([1.0, 2.0], 1), TypeError, "Tensor input"),
        (lambda: group_norm(X, 3), ValueError, r"not divisible by num_groups=3.*\[1, 2, 4, 8\]"),
        (lambda: group_norm(X, 0), ValueError, r"num_groups must be in \[1, C=8\]"),
        (lambda: group_norm(X, 16), ValueError, r"num_groups must be in \[1, C=8\]"),
        (lambda: group_norm(X, 2.0), TypeError, "num_groups must be an int"),
        (lambda: group_norm(X, True), TypeError, "num_groups must be an int, got bool"),
        (lambda: group_norm(X, 2, torch.ones(4)), ValueError, r"weight must have shape \(8,\).*got \(4,\)"),
        (lambda: group_norm(X, 2, None, torch.ones(8, 1)), ValueError, r"bias must have shape \(8,\)"),
        (lambda: group_norm(X, 2, [1.0] * 8), TypeError, "weight must be a Tensor or None, got list"),
        (lambda: group_norm(X, 2, torch.ones(8, dtype=torch.float64)), TypeError, r"float64 but the input is torch.float32"),
        (lambda: group_norm(X.half(), 2, torch.ones(8, dtype=torch.bfloat16)), TypeError, "bfloat16"),
        # float32 parameters are for half input only, not for float64
        (lambda: group_norm(X.double(), 2, torch.ones(8)), TypeError, r"float32 but the input is torch.float64"),
        (lambda: group_norm(X, 2, torch.ones(8, device="meta")), ValueError, "meta but the input is on cpu"),
        (lambda: group_norm(X, 2, eps=0.0), ValueError, "eps must be a positive"),
        (lambda: group_norm(X, 2, eps=-1e-5), ValueError, "eps must be a positive"),
        (lambda: group_norm(X, 2, eps=float("nan")), ValueError, "eps must be a positive"),
        (lambda: group_norm(X, 2, eps=True), ValueError, "eps must be a positive"),  # as GroupNorm and StdConv
        (lambda: group_norm(X, 2, eps=torch.tensor(1e-5)), TypeError, r"eps must be a Python number, got a Tensor.*float\(eps\)"),
        (lambda: GroupNorm(2, 8, eps=torch.tensor(1e-5)), TypeError, r"eps must be a Python number, got a Tensor"),
        (lambda: group_norm(X, 2, activation="tanh"), ValueError, "activation must be None or one of"),
        (lambda: group_norm(X, 2, backend="cudnn"), ValueError, "unknown groupnorm backend 'cudnn'"),
        (lambda: GroupNorm(3, 8), ValueError, r"num_channels=8 is not divisible by num_groups=3"),
        (lambda: GroupNorm(0, 8), ValueError, r"num_groups must be in \[1, num_channels=8\]"),
        (lambda: GroupNorm(16, 8), ValueError, r"num_groups must be in \[1, num_channels=8\]"),
        (lambda: GroupNorm(2, 8, group_size=4), ValueError, "exactly one of num_groups and group_size"),
        (lambda: GroupNorm(None, 8), ValueError, "exactly one of num_groups and group_size"),
        (lambda: GroupNorm(2), TypeError, "needs num_channels"),
        (lambda: GroupNorm(2, 8, eps=0), ValueError, "eps must be a positive"),
        (lambda: GroupNorm(2, 8)(torch.randn(2, 6, 3)), ValueError, "6 channels"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_half_input_with_float32_parameters_is_allowed():
    y = group_norm(X.bfloat16(), 2, torch.ones(8), torch.zeros(8))
    assert y.dtype == torch.bfloat16


def test_bad_input_loses_nothing():
    """A failed call leaves the layer's parameters and the input untouched."""
    m = GroupNorm(2, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6, 3)
    x0 = x.clone()
    with pytest.raises(ValueError):
        m(x)
    assert torch.equal(x, x0) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("num_groups, weight, match", [
    (3, None, r"not divisible by num_groups=3"),
    (16, None, r"num_groups must be in \[1, C=8\]"),
    (2, torch.ones(4), r"weight must have shape \(8,\)"),
])
def test_the_registered_op_checks_what_a_traced_or_scripted_program_hands_it(num_groups, weight, match):
    """torch.ops.groupnorm.forward is what compiled, traced and scripted programs call, with inputs
    group_norm() never checked (a scripted layer fed another channel count): it must refuse a group
    count that does not divide C, not run the kernels on it (they trust the shapes: a wrong answer)."""
    with pytest.raises(ValueError, match=match):
        torch.ops.groupnorm.forward(X, weight, None, num_groups, 1e-5, "none", "")
