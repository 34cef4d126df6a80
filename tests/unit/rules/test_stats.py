"""Experiment statistics against published values and independent formulas, edge cases, and
verdicts that wait for the data."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from statistics import NormalDist

import pytest

from services.rules.stats import (
    Arm,
    VerdictKind,
    analyze,
    arm_stats,
    difference_interval,
    fisher_exact,
    holm_adjust,
    sample_size_per_arm,
    two_proportion_test,
    wilson_interval,
    z_test,
)

Z95 = NormalDist().inv_cdf(0.975)

# ------------------------------------------------------------------------------------ intervals


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med
        # 17:857-872, Table I, method 3 (Wilson score).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombes_table(
    successes: int, trials: int, low: float, high: float
) -> None:
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_solves_the_score_equation() -> None:
    """The bounds are the roots of (p - x)^2 = z^2 x (1 - x) / n, solved independently here."""
    for successes, trials in [(3, 17), (50, 100), (999, 1000), (1, 100_000)]:
        p = successes / trials
        k = Z95 * Z95 / trials
        a, b, c = 1 + k, -(2 * p + k), p * p
        root = math.sqrt(b * b - 4 * a * c)
        assert wilson_interval(successes, trials) == pytest.approx(
            (((-b - root) / (2 * a)), ((-b + root) / (2 * a))), rel=1e-9
        )


def test_wilson_interval_edge_cases() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no data: anything is possible
    low, high = wilson_interval(20, 20)  # all converted: mirror image of 0 of 20
    assert high == 1.0
    assert low == pytest.approx(1 - 0.1611, abs=5e-5)
    assert wilson_interval(0, 20)[0] == 0.0
    with pytest.raises(ValueError, match="invalid counts"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="invalid counts"):
        wilson_interval(-1, 4)


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "low", "high"),
    [
        # Newcombe (1998), "Interval estimation for the difference between independent
        # proportions", Stat Med 17:873-890, Table II, method 10 (hybrid score).
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (0, 10, 0, 20, -0.1611, 0.2775),
    ],
)
def test_difference_interval_matches_newcombes_table(
    x1: int, n1: int, x2: int, n2: int, low: float, high: float
) -> None:
    assert difference_interval(x1, n1, x2, n2) == pytest.approx((low, high), abs=5e-5)


# ------------------------------------------------------------------------------------ tests


def test_z_test_by_hand_and_as_pearsons_chi_square() -> None:
    # 30/100 vs 45/100: pooled 0.375, SE = sqrt(0.375 * 0.625 * 2 / 100) = 0.0684653.
    result = z_test(30, 100, 45, 100)
    assert result.method == "z"
    assert result.z == pytest.approx(-0.15 / math.sqrt(0.375 * 0.625 * 0.02), rel=1e-12)
    assert result.z == pytest.approx(-2.19089, abs=1e-5)
    assert result.p_value == pytest.approx(2 * (1 - NormalDist().cdf(2.1908902)), rel=1e-6)
    assert result.p_value == pytest.approx(0.02846, abs=1e-5)
    # z^2 is Pearson's chi-square of the 2x2 table (no continuity correction).
    table = [[30, 70], [45, 55]]
    rows = [sum(r) for r in table]
    cols = [sum(c) for c in zip(*table, strict=True)]
    chi2 = sum(
        (table[i][j] - rows[i] * cols[j] / 200) ** 2 / (rows[i] * cols[j] / 200)
        for i in range(2)
        for j in range(2)
    )
    assert result.z is not None
    assert result.z**2 == pytest.approx(chi2, rel=1e-12)


def test_z_test_without_variation_has_p_one() -> None:
    assert z_test(0, 500, 0, 500).p_value == 1.0  # nobody converted
    assert z_test(500, 500, 300, 300).p_value == 1.0  # everybody converted
    with pytest.raises(ValueError, match="at least one trial"):
        z_test(0, 0, 1, 10)


def _fisher_by_enumeration(x1: int, n1: int, x2: int, n2: int) -> Fraction:
    """Exact rational two-sided Fisher p-value, independent of the implementation."""
    total, converted = n1 + n2, x1 + x2

    def pmf(k: int) -> Fraction:
        return Fraction(
            math.comb(converted, k) * math.comb(total - converted, n1 - k),
            math.comb(total, n1),
        )

    observed = pmf(x1)
    support = range(max(0, converted - n2), min(converted, n1) + 1)
    return sum((pmf(k) for k in support if pmf(k) <= observed), Fraction(0))


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "expected"),
    [
        (3, 4, 1, 4, 34 / 70),  # Fisher's lady tasting tea: 0.4857
        (8, 10, 1, 6, 0.034965034965),  # SciPy's fisher_exact example [[8, 2], [1, 5]]
        (0, 12, 5, 12, None),
        (1, 40, 9, 35, None),
        (7, 7, 0, 3, None),
    ],
)
def test_fisher_exact_matches_exact_enumeration(
    x1: int, n1: int, x2: int, n2: int, expected: float | None
) -> None:
    result = fisher_exact(x1, n1, x2, n2)
    assert result.method == "fisher"
    exact = float(_fisher_by_enumeration(x1, n1, x2, n2))
    assert result.p_value == pytest.approx(exact, rel=1e-9)
    if expected is not None:
        assert result.p_value == pytest.approx(expected, rel=1e-9)


def test_fisher_exact_edge_cases() -> None:
    assert fisher_exact(0, 10, 0, 10).p_value == pytest.approx(1.0)
    assert fisher_exact(10, 10, 10, 10).p_value == pytest.approx(1.0)
    assert fisher_exact(0, 0, 3, 10).p_value == pytest.approx(1.0)


def test_small_expected_counts_switch_to_fishers_exact_test() -> None:
    assert two_proportion_test(1, 40, 6, 40).method == "fisher"  # expected conversions 3.5
    assert two_proportion_test(100, 1000, 130, 1000).method == "z"
    assert two_proportion_test(995, 1000, 999, 1000).method == "fisher"  # few non-conversions


def test_holm_adjustment_by_hand() -> None:
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> kept monotone at 0.06.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5]) == [0.5]
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]
    assert holm_adjust([]) == []


# ------------------------------------------------------------------------------------ power


def _power(p1: float, p2: float, n: int, alpha: float = 0.05) -> float:
    """Normal-approximation power of the pooled two-sided test with n users per arm."""
    normal = NormalDist()
    mean = (p1 + p2) / 2
    spread = math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    z_alpha = normal.inv_cdf(1 - alpha / 2)
    return normal.cdf(
        (abs(p1 - p2) * math.sqrt(n) - z_alpha * math.sqrt(2 * mean * (1 - mean))) / spread
    )


def test_sample_size_matches_the_textbook_value() -> None:
    # 10% vs 15%, alpha 0.05 two-sided, power 0.8: 686 per group (Fleiss, Levin & Paik's
    # formula without continuity correction; 685.6 rounded up).
    assert sample_size_per_arm(0.10, 0.15) == 686
    assert sample_size_per_arm(0.15, 0.10) == 686


@pytest.mark.parametrize(("p1", "p2"), [(0.10, 0.15), (0.5, 0.6), (0.02, 0.025), (0.0, 0.01)])
def test_sample_size_is_the_smallest_with_80_percent_power(p1: float, p2: float) -> None:
    n = sample_size_per_arm(p1, p2)
    assert _power(p1, p2, n) >= 0.8 - 1e-9
    assert _power(p1, p2, n - 1) < 0.8


def test_sample_size_needs_two_different_proportions() -> None:
    with pytest.raises(ValueError, match="different"):
        sample_size_per_arm(0.1, 0.1)
    with pytest.raises(ValueError, match="different"):
        sample_size_per_arm(0.1, 1.2)


# ------------------------------------------------------------------------------------ verdicts


def test_arm_stats_give_rate_and_interval() -> None:
    stats = arm_stats(Arm("control", 263, 81))
    assert stats.rate == pytest.approx(81 / 263)
    assert stats.interval == pytest.approx((0.2553, 0.3662), abs=5e-5)
    empty = arm_stats(Arm("control", 0, 0))
    assert empty.rate is None
    assert empty.interval == (0.0, 1.0)
    with pytest.raises(ValueError, match="invalid counts"):
        Arm("x", 3, 4)


def test_a_clear_winner_is_declared_with_its_uplift() -> None:
    report = analyze(Arm("control", 5000, 500), [Arm("wait-1h", 5000, 650)])
    (comparison,) = report.comparisons
    assert comparison.absolute_uplift == pytest.approx(0.03)
    assert comparison.relative_uplift == pytest.approx(0.30)
    assert comparison.test is not None
    assert comparison.test.method == "z"
    assert comparison.adjusted_p_value == comparison.test.p_value < 0.001
    assert comparison.difference_interval is not None
    low, high = comparison.difference_interval
    assert 0 < low < 0.03 < high
    assert comparison.verdict.kind is VerdictKind.BETTER
    assert comparison.verdict.text == (
        "wait-1h converts better than control (13.0% vs 10.0%, +3.0 points, +30.0%, p < 0.001)"
    )
    assert [arm.name for arm in report.arms] == ["control", "wait-1h"]


def test_a_variant_that_kills_conversions_is_declared_worse() -> None:
    """No per-arm conversion minimum: zero conversions with enough users is a result."""
    (comparison,) = analyze(Arm("control", 1000, 100), [Arm("broken", 1000, 0)]).comparisons
    assert comparison.verdict.kind is VerdictKind.WORSE
    assert comparison.relative_uplift == pytest.approx(-1.0)
    assert comparison.verdict.text.startswith("broken converts worse than control (0.0% vs 10.0%")


def test_no_winner_before_the_sample_supports_it() -> None:
    # 13% vs 10% with 1000 users per arm: p = 0.035 alone, but not powered... and with a
    # second variant the Holm-adjusted p is above 0.05.
    report = analyze(
        Arm("control", 1000, 100), [Arm("wait-1h", 1000, 130), Arm("wait-24h", 1000, 101)]
    )
    first, second = report.comparisons
    assert first.test is not None
    assert first.test.p_value < 0.05
    assert first.adjusted_p_value is not None
    assert first.adjusted_p_value > 0.05
    assert first.verdict.kind is VerdictKind.NOT_ENOUGH_DATA
    # Planned at alpha / 2 for two comparisons, 10% -> 13%: n per arm minus the 1000 we have.
    needed = sample_size_per_arm(0.10, 0.13, alpha=0.025) - 1000
    assert first.verdict.users_needed_per_arm == needed
    assert first.verdict.target_difference == pytest.approx(0.03)
    assert first.verdict.text.startswith(
        f"not enough data yet: need about {needed:,} more users per arm for a 3.0-point "
        "difference (13.0% vs 10.0%, +3.0 points, +30.0%, p = 0."
    )
    # A tiny observed difference asks for the sample of the minimum effect (1 point here).
    assert second.verdict.kind is VerdictKind.NOT_ENOUGH_DATA
    assert second.verdict.target_difference == pytest.approx(0.01)
    assert second.verdict.users_needed_per_arm == (
        sample_size_per_arm(0.10, 0.11, alpha=0.025) - 1000
    )


def test_significance_with_too_little_data_is_not_a_verdict() -> None:
    (comparison,) = analyze(Arm("control", 40, 0), [Arm("b", 40, 8)]).comparisons
    assert comparison.test is not None
    assert comparison.test.method == "fisher"
    assert comparison.test.p_value < 0.05
    assert comparison.verdict.kind is VerdictKind.NOT_ENOUGH_DATA
    assert "looks better" in comparison.verdict.text
    assert "needs at least 100 users per arm and 20 conversions (now 40 and 8)" in (
        comparison.verdict.text
    )


def test_a_powered_sample_without_a_difference_says_so() -> None:
    (comparison,) = analyze(Arm("control", 20_000, 2000), [Arm("b", 20_000, 2010)]).comparisons
    assert sample_size_per_arm(0.10, 0.11) < 20_000
    assert comparison.verdict.kind is VerdictKind.NO_DIFFERENCE
    assert comparison.verdict.text.endswith(
        "with 20,000 users per arm a difference of 1.0 points would have been found 80% of the time"
    )


def test_empty_arms_have_no_data() -> None:
    report = analyze(Arm("control", 0, 0), [Arm("a", 50, 5), Arm("b", 0, 0)])
    assert [c.verdict.kind for c in report.comparisons] == [VerdictKind.NO_DATA] * 2
    assert report.comparisons[0].verdict.text == "no users in control yet"
    assert report.comparisons[0].absolute_uplift is None
    assert report.comparisons[0].test is None
    (only,) = analyze(Arm("control", 10, 1), [Arm("b", 0, 0)]).comparisons
    assert only.verdict.text == "no users in b yet"


def test_zero_conversions_everywhere_asks_for_more_users() -> None:
    (comparison,) = analyze(Arm("control", 500, 0), [Arm("a", 500, 0)]).comparisons
    assert comparison.relative_uplift is None  # no baseline rate to be relative to
    assert comparison.absolute_uplift == 0
    assert comparison.adjusted_p_value == 1.0
    assert comparison.verdict.kind is VerdictKind.NOT_ENOUGH_DATA
    assert comparison.verdict.target_difference == pytest.approx(0.005)  # the absolute floor


def test_everyone_converting_everywhere_is_no_difference_once_powered() -> None:
    (comparison,) = analyze(Arm("control", 5000, 5000), [Arm("a", 5000, 5000)]).comparisons
    assert comparison.adjusted_p_value == 1.0
    assert comparison.verdict.kind is VerdictKind.NO_DIFFERENCE  # 100% vs 90% is easy to see


def test_minimum_effect_must_be_a_proportion() -> None:
    with pytest.raises(ValueError, match="minimum_effect"):
        analyze(Arm("control", 100, 10), [Arm("a", 100, 10)], minimum_effect=0)


# ------------------------------------------------------------------------------------ simulation


def _simulate(rng: random.Random, rate: float, users: int) -> int:
    return sum(1 for _ in range(users) if rng.random() < rate)


def test_a_planted_difference_is_recovered() -> None:
    rng = random.Random(6)
    control = Arm("control", 4000, _simulate(rng, 0.10, 4000))
    variant = Arm("wait-1h", 4000, _simulate(rng, 0.14, 4000))
    (comparison,) = analyze(control, [variant]).comparisons
    assert comparison.verdict.kind is VerdictKind.BETTER
    assert comparison.difference_interval is not None
    low, high = comparison.difference_interval
    assert low < 0.04 < high


def test_the_false_positive_rate_of_a_a_tests_is_about_alpha() -> None:
    rng = random.Random(42)
    runs, users = 1000, 400
    positives = sum(
        1
        for _ in range(runs)
        if two_proportion_test(
            _simulate(rng, 0.2, users), users, _simulate(rng, 0.2, users), users
        ).p_value
        < 0.05
    )
    # Binomial(1000, 0.05): mean 50, sd 6.9.
    assert 30 <= positives <= 70, positives
