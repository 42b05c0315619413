"""The group policy: strict / divisor / gcd, num_groups or group_size, min_group_size."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from groupnorm.groups import divisors, resolve_groups


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(48) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert divisors(49) == [1, 7, 49]


def test_strict_exact_and_error_names_the_fix():
    assert resolve_groups(64, 32) == 32
    assert resolve_groups(64, group_size=16) == 4
    with pytest.raises(ValueError) as e:
        resolve_groups(48, 32)
    msg = str(e.value)
    assert "48" in msg and "32" in msg and "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]" in msg and "divisor" in msg
    with pytest.raises(ValueError, match="group sizes that work"):
        resolve_groups(48, group_size=5)


def test_divisor_and_gcd():
    assert resolve_groups(48, 32, policy="divisor") == 24
    assert resolve_groups(48, 32, policy="gcd") == 16
    assert resolve_groups(48, group_size=5, policy="divisor") == 12  # size 4
    assert resolve_groups(48, group_size=5, policy="gcd") == 48  # gcd(48, 5) = 1 channel per group
    assert resolve_groups(16, 32, policy="divisor") == 16
    assert resolve_groups(16, 32, policy="divisor", min_group_size=4) == 4
    assert resolve_groups(16, group_size=32, policy="divisor") == 1  # narrow layer, wide group: one group
    with pytest.raises(ValueError, match="group_size must be in"):
        resolve_groups(16, group_size=32)  # strict never guesses


@given(C=st.integers(1, 600), G=st.integers(1, 600), policy=st.sampled_from(["divisor", "gcd"]), m=st.integers(1, 8))
def test_policies_always_give_a_valid_group_count(C, G, policy, m):
    got = resolve_groups(C, G, policy=policy, min_group_size=m)
    assert 1 <= got <= min(C, G) and C % got == 0
    if policy == "gcd" and m == 1:
        assert got == math.gcd(C, G)
    if policy == "divisor" and m == 1:
        assert got == max(d for d in divisors(C) if d <= G)
    if C >= m:
        assert C // got >= m or got == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_channels=64), "exactly one"),
        (dict(num_channels=64, num_groups=8, group_size=8), "exactly one"),
        (dict(num_channels=64, num_groups=0), r"\[1, num_channels=64\]"),
        (dict(num_channels=64, num_groups=128), r"\[1, num_channels=64\]"),
        (dict(num_channels=64, num_groups=-2), r"\[1, num_channels=64\]"),
        (dict(num_channels=0, num_groups=1), "positive"),
        (dict(num_channels=64, num_groups=8, policy="nearest"), "unknown group policy"),
        (dict(num_channels=64, group_size=0), "group_size"),
        (dict(num_channels=64, num_groups=8, min_group_size=0), "min_group_size must be >= 1"),
        (dict(num_channels=64, group_size=8, policy="divisor", min_group_size=0), "min_group_size must be >= 1"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_groups(**kwargs)


def test_types_are_checked():
    with pytest.raises(TypeError, match="num_groups must be an int"):
        resolve_groups(64, 8.0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        resolve_groups(64, True)


def test_group_size_requests_respect_min_group_size():
    """A group size that the policy has to round down is not rounded below min_group_size (7 -> gcd 1
    would be Instance Norm); an exact group size is honoured as asked."""
    from groupnorm import norm_layer

    assert resolve_groups(24, group_size=7, policy="gcd", min_group_size=4) == 6
    assert resolve_groups(24, group_size=7, policy="gcd", min_group_size=1) == 24
    assert resolve_groups(24, group_size=5, policy="divisor", min_group_size=6) == 4
    assert resolve_groups(24, group_size=5, policy="divisor", min_group_size=1) == 6
    assert resolve_groups(24, group_size=1, policy="divisor", min_group_size=4) == 24  # exact: as asked
    assert norm_layer(group_size=7, policy="gcd", min_group_size=4)(24).num_groups == 6


@given(C=st.integers(1, 600), size=st.integers(1, 700), policy=st.sampled_from(["divisor", "gcd"]), m=st.integers(1, 700))
def test_group_size_policies_always_give_a_valid_group_count(C, size, policy, m):
    """The group_size path: G divides C; an exact size is honoured; a size wider than the layer is one
    group; otherwise the policy's size, raised to at least min_group_size (or the whole layer)."""
    got = resolve_groups(C, group_size=size, policy=policy, min_group_size=m)
    assert 1 <= got <= C and C % got == 0
    used = C // got  # channels per group
    if size > C:
        assert got == 1
    elif C % size == 0:
        assert used == size
    else:
        assert used >= min(m, C)
        if m == 1:
            assert used == (max(d for d in divisors(C) if d <= size) if policy == "divisor" else math.gcd(C, size))


def test_group_size_corner_cases():
    assert resolve_groups(16, group_size=32, policy="gcd") == 1  # wider than the layer: one group, as "divisor"
    # gcd(30, 7) = 1 channel, raised to min_group_size 4, which does not divide 30: the next size up, 5
    assert resolve_groups(30, group_size=7, policy="gcd", min_group_size=4) == 6
    # min_group_size above the layer's width: the whole layer is one group
    assert resolve_groups(8, group_size=3, policy="divisor", min_group_size=16) == 1
    assert resolve_groups(8, group_size=3, policy="gcd", min_group_size=9) == 1
