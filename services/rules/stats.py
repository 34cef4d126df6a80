"""Experiment statistics: conversion rates, uplift, significance and a careful verdict.

Pure: `math` and `statistics` only. The unit of analysis is the user (assignment is per user,
so users are the independent units; several entries of one user are not). Each arm is
`(users, conversions)`: users who entered the campaign in that group, and how many of them
converted (docs/experiments.md says which conversions count).

- Rate: `conversions / users` with a Wilson score interval (Wilson 1927; Newcombe 1998a,
  method 3), which behaves at 0% and 100% where the normal (Wald) interval collapses.
- Uplift of a variant over the baseline (control): absolute (percentage points) and relative,
  with Newcombe's hybrid score interval for the difference (Newcombe 1998b, method 10).
- p-value: two-sided two-proportion z-test with the pooled standard error (equivalent to
  Pearson's chi-square on the 2x2 table without continuity correction). When an expected cell
  count is below 5 the normal approximation is poor, and Fisher's exact test (two-sided,
  summing the tables no more likely than the observed one) is used instead.
- Several variants against one control are several tests: p-values are Holm-adjusted.
- Verdict: better / worse only when the adjusted p-value is below alpha AND the data pass a
  minimum (users per arm, conversions in the comparison); "no difference" only when the sample
  had 80% power to detect the minimum effect; otherwise "not enough data yet", with the users
  per arm still needed from the standard sample-size formula for two proportions (Fleiss,
  Levin & Paik, "Statistical Methods for Rates and Proportions", without continuity
  correction).

The minimum conversions are counted over the comparison (both arms together), not per arm: a
variant that stops conversions altogether (a broken link) never reaches a per-arm minimum, yet
with enough users it is clearly worse.

These are fixed-horizon tests. Looking at the stats every day and stopping at the first
p < 0.05 makes false winners far more likely than 5%: decide the sample size up front (the
verdict says how many users that is) and read the verdict when it is reached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist
from typing import Final

ALPHA: Final = 0.05
POWER: Final = 0.80
CONFIDENCE: Final = 0.95
MIN_USERS_PER_ARM: Final = 100
MIN_CONVERSIONS: Final = 20
RELATIVE_MINIMUM_EFFECT: Final = 0.10
ABSOLUTE_MINIMUM_EFFECT: Final = 0.005
FISHER_MIN_EXPECTED: Final = 5.0

_NORMAL: Final = NormalDist()


def _z(confidence: float) -> float:
    """The two-sided critical value: 1.959964 for 95%."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"invalid counts: {successes} of {trials}")


# --------------------------------------------------------------------------------------------
# Rates and intervals
# --------------------------------------------------------------------------------------------


def wilson_interval(
    successes: int, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 1) when there are no trials."""
    _check_counts(successes, trials)
    if trials == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def difference_interval(
    x1: int, n1: int, x2: int, n2: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Newcombe's hybrid score interval for `x1/n1 - x2/n2` (both arms need trials)."""
    if n1 == 0 or n2 == 0:
        raise ValueError("both arms need at least one trial")
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, confidence)
    l2, u2 = wilson_interval(x2, n2, confidence)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestResult:
    """A two-sided test of equal proportions: `method` is `z` or `fisher` (`z` None then)."""

    __test__ = False  # not a pytest class

    method: str
    p_value: float
    z: float | None = None


def z_test(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Two-proportion z-test, pooled standard error, two-sided. p = 1 when nobody or everybody
    converted (no variation to test)."""
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    if n1 == 0 or n2 == 0:
        raise ValueError("both arms need at least one trial")
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return TestResult("z", 1.0, 0.0)
    z = (x1 / n1 - x2 / n2) / se
    return TestResult("z", min(1.0, math.erfc(abs(z) / math.sqrt(2))), z)


def fisher_exact(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Fisher's exact test of the 2x2 table [[x1, n1-x1], [x2, n2-x2]], two-sided: the sum of
    the probabilities of all tables with the same margins that are no more likely than the
    observed one (the convention of R's fisher.test and SciPy)."""
    _check_counts(x1, n1)
    _check_counts(x2, n2)
    total, converted = n1 + n2, x1 + x2
    low, high = max(0, converted - n2), min(converted, n1)

    def log_pmf(k: int) -> float:
        return _log_comb(converted, k) + _log_comb(total - converted, n1 - k) - _log_comb(total, n1)

    observed = log_pmf(x1)
    # Relative tolerance for tables as likely as the observed one (floating-point ties).
    cutoff = observed + math.log1p(1e-7)
    p = math.fsum(math.exp(log_pmf(k)) for k in range(low, high + 1) if log_pmf(k) <= cutoff)
    return TestResult("fisher", min(1.0, p))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """The z-test, or Fisher's exact test when an expected cell count is below 5."""
    pooled = (x1 + x2) / (n1 + n2)
    smallest = min(n1, n2) * min(pooled, 1 - pooled)
    if smallest < FISHER_MIN_EXPECTED:
        return fisher_exact(x1, n1, x2, n2)
    return z_test(x1, n1, x2, n2)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (controls the family-wise error
    rate of several variant-versus-control comparisons)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def sample_size_per_arm(p1: float, p2: float, *, alpha: float = ALPHA, power: float = POWER) -> int:
    """Users per arm for a two-sided test at `alpha` to detect `p1` vs `p2` with `power`:
    ((z(1 - alpha/2) * sqrt(2 * pm * (1 - pm)) + z(power) * sqrt(p1 * (1 - p1) + p2 * (1 - p2)))
    / (p1 - p2))^2 with pm = (p1 + p2) / 2, rounded up."""
    if not (0 <= p1 <= 1 and 0 <= p2 <= 1) or p1 == p2:
        raise ValueError("need two different proportions in [0, 1]")
    z_alpha = _NORMAL.inv_cdf(1 - alpha / 2)
    z_power = _NORMAL.inv_cdf(power)
    mean = (p1 + p2) / 2
    root = z_alpha * math.sqrt(2 * mean * (1 - mean)) + z_power * math.sqrt(
        p1 * (1 - p1) + p2 * (1 - p2)
    )
    return math.ceil(round((root / (p1 - p2)) ** 2, 9))


# --------------------------------------------------------------------------------------------
# Reports and verdicts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arm:
    """The counts of one group: users who entered, users who converted."""

    name: str
    users: int
    conversions: int

    def __post_init__(self) -> None:
        _check_counts(self.conversions, self.users)


@dataclass(frozen=True, slots=True)
class ArmStats:
    """One arm's conversion rate (None without users) and its Wilson interval."""

    name: str
    users: int
    conversions: int
    rate: float | None
    interval: tuple[float, float]


class VerdictKind(StrEnum):
    """What the data support about one variant versus the baseline."""

    NO_DATA = "no_data"
    NOT_ENOUGH_DATA = "not_enough_data"
    BETTER = "better"
    WORSE = "worse"
    NO_DIFFERENCE = "no_difference"


@dataclass(frozen=True, slots=True)
class Verdict:
    """`text` is plain language; `users_needed_per_arm` (more users per arm) and
    `target_difference` (absolute) are set when the verdict is `not_enough_data`."""

    kind: VerdictKind
    text: str
    users_needed_per_arm: int | None = None
    target_difference: float | None = None


@dataclass(frozen=True, slots=True)
class Comparison:
    """A variant against the baseline. Uplifts and intervals are None when an arm is empty;
    `relative_uplift` also when the baseline rate is 0."""

    variant: str
    baseline: str
    absolute_uplift: float | None
    relative_uplift: float | None
    difference_interval: tuple[float, float] | None
    test: TestResult | None
    adjusted_p_value: float | None
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Report:
    """Every arm (baseline first) and every variant's comparison with the baseline."""

    arms: tuple[ArmStats, ...]
    comparisons: tuple[Comparison, ...]


def arm_stats(arm: Arm, confidence: float = CONFIDENCE) -> ArmStats:
    """The arm's rate and interval."""
    rate = arm.conversions / arm.users if arm.users else None
    return ArmStats(
        arm.name, arm.users, arm.conversions, rate, wilson_interval(arm.conversions, arm.users)
    )


def analyze(
    baseline: Arm,
    variants: Sequence[Arm],
    *,
    alpha: float = ALPHA,
    power: float = POWER,
    min_users: int = MIN_USERS_PER_ARM,
    min_conversions: int = MIN_CONVERSIONS,
    minimum_effect: float | None = None,
) -> Report:
    """Compare every variant with `baseline` (the control; for an experiment without control,
    the first variant). `minimum_effect` is the smallest absolute difference worth detecting
    (default: 10% of the baseline rate, at least half a point). Users still needed are planned
    at `alpha / comparisons` (Bonferroni), matching the Holm-adjusted p-values they will meet."""
    tests = [
        two_proportion_test(v.conversions, v.users, baseline.conversions, baseline.users)
        if v.users and baseline.users
        else None
        for v in variants
    ]
    tested = [t.p_value for t in tests if t is not None]
    adjusted = iter(holm_adjust(tested))
    comparisons = []
    for variant, test in zip(variants, tests, strict=True):
        adjusted_p = next(adjusted) if test is not None else None
        comparisons.append(
            _compare(
                variant,
                baseline,
                test,
                adjusted_p,
                alpha=alpha,
                planning_alpha=alpha / max(1, len(tested)),
                power=power,
                min_users=min_users,
                min_conversions=min_conversions,
                minimum_effect=minimum_effect,
            )
        )
    return Report(
        arms=tuple(arm_stats(arm) for arm in (baseline, *variants)),
        comparisons=tuple(comparisons),
    )


def _compare(
    variant: Arm,
    baseline: Arm,
    test: TestResult | None,
    adjusted_p: float | None,
    *,
    alpha: float,
    planning_alpha: float,
    power: float,
    min_users: int,
    min_conversions: int,
    minimum_effect: float | None,
) -> Comparison:
    if test is None or adjusted_p is None:
        empty = baseline.name if not baseline.users else variant.name
        verdict = Verdict(VerdictKind.NO_DATA, f"no users in {empty} yet")
        return Comparison(variant.name, baseline.name, None, None, None, None, None, verdict)
    base = baseline.conversions / baseline.users
    uplift = variant.conversions / variant.users - base
    relative = uplift / base if base > 0 else None
    if minimum_effect is None:
        minimum_effect = max(RELATIVE_MINIMUM_EFFECT * base, ABSOLUTE_MINIMUM_EFFECT)
    if not 0 < minimum_effect <= 1:
        raise ValueError("minimum_effect must be in (0, 1]")
    return Comparison(
        variant=variant.name,
        baseline=baseline.name,
        absolute_uplift=uplift,
        relative_uplift=relative,
        difference_interval=difference_interval(
            variant.conversions, variant.users, baseline.conversions, baseline.users
        ),
        test=test,
        adjusted_p_value=adjusted_p,
        verdict=_verdict(
            variant,
            baseline,
            relative,
            adjusted_p,
            alpha=alpha,
            planning_alpha=planning_alpha,
            power=power,
            min_users=min_users,
            min_conversions=min_conversions,
            minimum_effect=minimum_effect,
        ),
    )


def _verdict(
    variant: Arm,
    baseline: Arm,
    relative: float | None,
    p: float,
    *,
    alpha: float,
    planning_alpha: float,
    power: float,
    min_users: int,
    min_conversions: int,
    minimum_effect: float,
) -> Verdict:
    base = baseline.conversions / baseline.users
    rate = variant.conversions / variant.users
    uplift = rate - base
    users = min(variant.users, baseline.users)
    conversions = variant.conversions + baseline.conversions
    relative_text = "" if relative is None else f", {relative * 100:+.1f}%"
    figures = f"{_pct(rate)} vs {_pct(base)}, {_points(uplift)}{relative_text}, {_p(p)}"
    direction = "better" if uplift > 0 else "worse"
    if p < alpha:
        if users >= min_users and conversions >= min_conversions:
            return Verdict(
                VerdictKind.BETTER if uplift > 0 else VerdictKind.WORSE,
                f"{variant.name} converts {direction} than {baseline.name} ({figures})",
            )
        return Verdict(
            VerdictKind.NOT_ENOUGH_DATA,
            f"not enough data yet: {variant.name} looks {direction} ({figures}), but a verdict "
            f"needs at least {min_users} users per arm and {min_conversions} conversions "
            f"(now {users} and {conversions})",
        )
    # Not significant: either this sample could not have found the difference, or it could.
    targets = (abs(uplift), minimum_effect) if abs(uplift) > minimum_effect else (minimum_effect,)
    for target in targets:
        needed = _users_needed(base, target, alpha=planning_alpha, power=power)
        if needed > users:
            return Verdict(
                VerdictKind.NOT_ENOUGH_DATA,
                f"not enough data yet: need about {needed - users:,} more users per arm for a "
                f"{target * 100:.1f}-point difference ({figures})",
                users_needed_per_arm=needed - users,
                target_difference=target,
            )
    if users < min_users:
        return Verdict(
            VerdictKind.NOT_ENOUGH_DATA,
            f"not enough data yet: {users} users per arm, a verdict needs {min_users} ({figures})",
            users_needed_per_arm=min_users - users,
            target_difference=minimum_effect,
        )
    return Verdict(
        VerdictKind.NO_DIFFERENCE,
        f"no significant difference between {variant.name} and {baseline.name} ({figures}); "
        f"with {users:,} users per arm a difference of {minimum_effect * 100:.1f} points "
        f"would have been found {power:.0%} of the time",
    )


def _users_needed(base: float, difference: float, *, alpha: float, power: float) -> int:
    """Users per arm to detect `difference` from `base` (upwards, or downwards when up would
    leave [0, 1])."""
    other = base + difference if base + difference <= 1 else base - difference
    return sample_size_per_arm(base, min(max(other, 0.0), 1.0), alpha=alpha, power=power)


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def _points(difference: float) -> str:
    return f"{difference * 100:+.1f} points"


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"
