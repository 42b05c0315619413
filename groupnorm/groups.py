"""The group policy: turn (num_channels, num_groups | group_size, policy) into a group count.

``strict``  C must divide exactly; otherwise a ValueError that lists the group counts that work.
``divisor`` the largest divisor of C not above the request (G <= requested groups,
            or channels-per-group <= requested group size).
``gcd``     gcd(C, request), the rule Opacus' fixer uses.

``min_group_size`` keeps narrow layers from silently turning into Instance Norm
(one channel per group): under ``divisor``/``gcd`` the group count is lowered until
every group has at least that many channels.
"""

from __future__ import annotations

import math
import numbers

POLICIES = ("strict", "divisor", "gcd")


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are fine
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_request(num_groups, group_size, policy: str, min_group_size, example: str = "") -> None:
    """Check a per-layer request before any layer exists (convert_batchnorm, norm_layer): one of
    num_groups / group_size, positive ints, a known policy. ``example`` is the call that shows the fix."""
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"give num_groups or group_size, not both (got num_groups={num_groups!r}, group_size={group_size!r})"
            + (f"; e.g. {example}" if example else "")
        )
    if num_groups is None and group_size is None:
        raise ValueError("give num_groups (e.g. 32, the paper's choice) or group_size (e.g. 16 channels per group)")
    for name, value in (("num_groups", num_groups), ("group_size", group_size), ("min_group_size", min_group_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown group policy {policy!r}; choose one of {', '.join(map(repr, POLICIES))}")


def resolve_groups(
    num_channels: int,
    num_groups: int | None = None,
    *,
    group_size: int | None = None,
    policy: str = "strict",
    min_group_size: int = 1,
) -> int:
    """Return the number of groups G for ``num_channels`` channels.

    Exactly one of ``num_groups`` (G) and ``group_size`` (channels per group) is given.
    """
    C = _check_int("num_channels", num_channels)
    if C <= 0:
        raise ValueError(f"num_channels must be positive, got {C}")
    if policy not in POLICIES:
        raise ValueError(f"unknown group policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "give exactly one of num_groups and group_size "
            f"(got num_groups={num_groups!r}, group_size={group_size!r}); "
            "e.g. num_groups=32, or group_size=16 for 16 channels per group"
        )
    min_group_size = _check_int("min_group_size", min_group_size)
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")

    if group_size is not None:
        size = _check_int("group_size", group_size)
        if size > C and policy != "strict":
            return 1  # a group wider than the layer: the whole layer is one group (LayerNorm-like)
        if size <= 0 or size > C:
            raise ValueError(
                f"group_size must be in [1, num_channels={C}], got {size}; "
                f"channel counts per group that divide {C}: {divisors(C)}"
            )
        if C % size == 0:
            return C // size
        if policy == "strict":
            raise ValueError(
                f"num_channels={C} is not divisible by group_size={size}; "
                f"group sizes that work: {divisors(C)}; or pass policy='divisor' "
                "(largest group size below the request) or policy='gcd'"
            )
        size = max(d for d in divisors(C) if d <= size) if policy == "divisor" else math.gcd(C, size)
        size = max(size, min(min_group_size, C))
        while C % size:  # min_group_size may not divide C: take the next divisor up
            size += 1
        return C // size

    G = _check_int("num_groups", num_groups)
    if G <= 0 or (G > C and policy == "strict"):
        raise ValueError(
            f"num_groups must be in [1, num_channels={C}], got {G}; "
            f"group counts that divide {C}: {divisors(C)}"
            + (f"; or pass policy='divisor' (largest divisor of {C} not above {G})" if G > 0 else "")
        )
    if C % G == 0 and C // G >= min_group_size:
        return G
    if policy == "strict":
        if C % G:
            raise ValueError(
                f"num_channels={C} is not divisible by num_groups={G}; "
                f"group counts that work: {divisors(C)}; or pass policy='divisor' "
                f"(largest divisor of {C} not above {G}) or policy='gcd' (gcd({C}, {G}))"
            )
        return G  # strict never overrides an exact request, min_group_size or not
    G = max(d for d in divisors(C) if d <= G) if policy == "divisor" else math.gcd(C, G)
    while G > 1 and C // G < min_group_size:
        G = max(d for d in divisors(C) if d < G)
    return G
