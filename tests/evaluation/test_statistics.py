"""Intervals and paired tests of zero-shot accuracies (gsclip_lib/evaluation/statistics.py)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from gsclip_lib.evaluation.statistics import (
    ALPHA,
    Interval,
    RatioEstimate,
    accuracy_interval,
    compare_paired,
    compare_to_reference,
    format_p_value,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_bootstrap_ratio,
    verdict_phrase,
)

Z95 = NormalDist().inv_cdf(0.975)


def ones(k: int, n: int) -> list[int]:
    """A 0/1 vector of length n with k ones first."""
    return [1] * k + [0] * (n - k)


def paired(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bool vectors whose paired 2x2 table has the given counts (images shuffled)."""
    a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, dtype=bool)
    order = np.random.default_rng(123).permutation(a.size)
    return a[order], b[order]


def binomial_tail_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p from integer binomial sums, to check the float implementation."""
    m, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)


# --------------------------------------------------------------------------------------------------
# Wilson


def test_wilson_hand_computed() -> None:
    # 83/100: centre (0.83 + z^2/200) / (1 + z^2/100) = 0.81779,
    # half-width z sqrt(0.83 * 0.17 / 100 + z^2 / 40000) / (1 + z^2/100) = 0.07327
    got = accuracy_interval(ones(83, 100))
    assert got.estimate == pytest.approx(0.83)
    assert got.low == pytest.approx(0.74452, abs=5e-5)
    assert got.high == pytest.approx(0.89106, abs=5e-5)
    # Newcombe (1998a), Statistics in Medicine 17:857, Table II, method 3 (Wilson score)
    for k, n, low, high in [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                            (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]:
        got = accuracy_interval(ones(k, n))
        assert (got.low, got.high) == pytest.approx((low, high), abs=6e-5), (k, n)


def test_wilson_limits_solve_the_score_equation() -> None:
    # The Wilson limits are the two p with |k/n - p| = z sqrt(p (1 - p) / n).
    for k, n, confidence in [(3, 10, 0.95), (50, 60, 0.9), (997, 1000, 0.99), (1, 2, 0.5)]:
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        got = accuracy_interval(ones(k, n), confidence)
        for p in (got.low, got.high):
            assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)


def test_wilson_edges_types_and_levels() -> None:
    assert accuracy_interval(ones(0, 20)).low == 0.0
    assert accuracy_interval(ones(20, 20)).high == 1.0
    as_ints = accuracy_interval(ones(7, 9))
    assert accuracy_interval([bool(v) for v in ones(7, 9)]) == as_ints
    assert accuracy_interval(np.array(ones(7, 9), dtype=np.float32)) == as_ints
    narrow, wide = accuracy_interval(ones(7, 9), 0.8), accuracy_interval(ones(7, 9), 0.99)
    assert wide.low < narrow.low < narrow.estimate < narrow.high < wide.high
    assert Interval(0.5, 0.25, 0.75).as_percent() == Interval(50.0, 25.0, 75.0)


# --------------------------------------------------------------------------------------------------
# McNemar


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact_p(0, 6) == pytest.approx(0.03125, rel=1e-12)  # 2 / 2^6
    assert mcnemar_exact_p(6, 0) == pytest.approx(0.03125, rel=1e-12)
    assert mcnemar_exact_p(3, 7) == pytest.approx(0.34375, rel=1e-12)  # 2 * 176 / 1024
    assert mcnemar_exact_p(7, 3) == pytest.approx(0.34375, rel=1e-12)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(4, 5) == 1.0
    assert mcnemar_exact_p(0, 1) == 1.0


def test_mcnemar_matches_integer_binomial_sums() -> None:
    for a_only, b_only in [(1, 9), (12, 30), (100, 140), (450, 520), (2000, 2150), (5, 400)]:
        assert mcnemar_exact_p(a_only, b_only) == pytest.approx(
            binomial_tail_p(a_only, b_only), rel=1e-8
        ), (a_only, b_only)


# --------------------------------------------------------------------------------------------------
# compare_paired: counts, verdicts, the interval


def test_verdicts_in_both_directions_and_no_difference() -> None:
    a, b = paired(both=700, a_only=40, b_only=10, neither=250)
    above = compare_paired(a, b)
    assert (above.images, above.a_only, above.b_only) == (1000, 40, 10)
    assert above.test == "McNemar's exact test"
    assert above.difference.estimate == pytest.approx(0.03)
    assert above.p_value == pytest.approx(binomial_tail_p(40, 10), rel=1e-9)
    assert above.verdict == "above"
    assert above.difference.low > 0

    below = compare_paired(b, a)
    assert (below.a_only, below.b_only, below.verdict) == (10, 40, "below")
    assert below.difference.high < 0
    assert below.difference.estimate == pytest.approx(-0.03)

    a, b = paired(both=700, a_only=20, b_only=20, neither=260)
    same = compare_paired(a, b)
    assert same.p_value == 1.0
    assert same.verdict == "no difference detectable with 1,000 images"
    assert same.difference.low < 0 < same.difference.high


def test_newcombe_published_example() -> None:
    # Cavo et al. 2012, complete response before / after consolidation therapy, as worked in
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8:
    # table [[59, 6], [16, 80]], Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046).
    got = newcombe_paired_interval(both=59, a_only=6, b_only=16, neither=80, z=Z95)
    assert got.estimate == pytest.approx(-10 / 161)
    assert (got.low, got.high) == pytest.approx((-0.1186, -0.0046), abs=6e-5)
    # Borderline: the interval just excludes 0, the (conservative) exact test does not reject.
    comparison = compare_paired(*paired(59, 6, 16, 80))
    assert comparison.difference == got
    assert comparison.p_value == pytest.approx(0.0525, abs=1e-4)
    assert comparison.verdict == "no difference detectable with 161 images"


def test_newcombe_properties() -> None:
    tables = [(59, 6, 16, 80), (0, 5, 0, 0), (0, 0, 7, 0), (10, 0, 0, 0), (3, 4, 0, 1),
              (500, 30, 12, 458), (1, 1, 1, 1), (0, 9, 1, 0)]
    for table in tables:
        got = newcombe_paired_interval(*table, z=Z95)
        assert -1.0 <= got.low <= got.estimate <= got.high <= 1.0, table
    # narrows as n grows (the same proportions, 10x and 100x the images)
    widths = [newcombe_paired_interval(30 * s, 12 * s, 8 * s, 50 * s, z=Z95) for s in (1, 10, 100)]
    spans = [w.high - w.low for w in widths]
    assert spans[0] > spans[1] > spans[2] > 0
    assert spans[1] / spans[2] == pytest.approx(math.sqrt(10), rel=0.05)
    # includes 0 when a_only == b_only, excludes it when the exact test is clearly significant
    for table in [(100, 7, 7, 86), (0, 3, 3, 0), (40, 0, 0, 60), (900, 60, 60, 980)]:
        got = newcombe_paired_interval(*table, z=Z95)
        assert got.low < 0 < got.high or got.low == got.high == 0.0, table
    for table in [(50, 20, 2, 28), (900, 20, 70, 1010), (0, 12, 0, 0)]:
        got = newcombe_paired_interval(*table, z=Z95)
        assert mcnemar_exact_p(table[1], table[2]) < 0.001
        assert not got.low <= 0 <= got.high, table


def test_interval_agrees_with_the_test_except_near_alpha() -> None:
    disagreements = 0
    for n in (60, 400, 3000):
        for both_share in (0.2, 0.8):
            for a_only in range(0, 40, 3):
                for b_only in range(0, 40, 2):
                    both = int(both_share * (n - a_only - b_only))
                    neither = n - a_only - b_only - both
                    result = compare_paired(*paired(both, a_only, b_only, neither))
                    excludes_zero = result.difference.low > 0 or result.difference.high < 0
                    if (result.p_value < ALPHA) != excludes_zero:
                        disagreements += 1
                        assert 0.02 < result.p_value < 0.1, (n, both, a_only, b_only)
                    if result.verdict == "above":
                        assert result.difference.high > 0
    assert disagreements > 0  # the two procedures do differ at the boundary


def test_alpha_sets_the_verdict_and_the_level() -> None:
    a, b = paired(59, 6, 16, 80)
    at_ten = compare_paired(a, b, alpha=0.10)
    assert at_ten.verdict == "below"  # p = 0.052
    assert at_ten.confidence == pytest.approx(0.90)
    at_five = compare_paired(a, b)
    assert at_ten.difference.high < at_five.difference.high
    assert at_ten.describe().startswith("-6.2 points (90 % CI ")


# --------------------------------------------------------------------------------------------------
# Words


def test_describe_format() -> None:
    text = compare_paired(*paired(59, 6, 16, 80)).describe()
    assert text == (
        "-6.2 points (95 % CI -11.9 to -0.5; McNemar's exact test p = 0.052, 161 paired images)"
    )
    text = compare_paired(*paired(700, 40, 10, 250)).describe(digits=2)
    assert text.startswith("+3.00 points (95 % CI +")
    assert "p < 0.001, 1,000 paired images)" in text
    text = compare_paired(*paired(700, 20, 20, 260)).describe()
    assert text.startswith("+0.0 points (95 % CI -")
    assert "McNemar's exact test p = 1.0, 1,000 paired images" in text


def test_format_p_value() -> None:
    assert format_p_value(0.0123) == "p = 0.012"
    assert format_p_value(0.03125) == "p = 0.031"
    assert format_p_value(0.34375) == "p = 0.34"
    assert format_p_value(0.5) == "p = 0.50"
    assert format_p_value(0.0996) == "p = 0.10"
    assert format_p_value(0.001) == "p = 0.0010"
    assert format_p_value(0.00099) == "p < 0.001"
    assert format_p_value(0.0) == "p < 0.001"
    assert format_p_value(1.0) == "p = 1.0"


def test_verdict_phrase() -> None:
    assert verdict_phrase("above", "the thumbnail") == "above the thumbnail"
    assert verdict_phrase("below", "the RGB tower") == "below the RGB tower"
    assert (
        verdict_phrase("no difference detectable with 1,000 images", "the thumbnail")
        == "no difference from the thumbnail detectable with 1,000 images"
    )
    assert verdict_phrase("no difference detectable", "the paper") == (
        "no difference from the paper detectable"
    )
    with pytest.raises(ValueError, match="unknown verdict"):
        verdict_phrase("better", "the paper")


# --------------------------------------------------------------------------------------------------
# Bootstrap of a ratio


def test_bootstrap_deterministic_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.random(1000) < 0.72, rng.random(1000) < 0.61
    first = paired_bootstrap_ratio(a, b, seed=3)
    assert first == paired_bootstrap_ratio(a, b, seed=3)
    assert first != paired_bootstrap_ratio(a, b, seed=4)
    assert first.estimate == pytest.approx(a.mean() / b.mean())
    assert first.low < first.estimate < first.high
    assert (first.resamples, first.seed, first.dropped) == (2000, 3, 0)
    narrow = paired_bootstrap_ratio(a, b, seed=3, confidence=0.5)
    assert first.low < narrow.low < narrow.high < first.high


def test_bootstrap_coverage_on_simulated_data() -> None:
    # cells (both, a only, b only, neither) with probabilities (0.5, 0.2, 0.1, 0.2): ratio 0.7/0.6
    rng = np.random.default_rng(2024)
    truth, covered, datasets = 0.7 / 0.6, 0, 200
    for i in range(datasets):
        cells = rng.choice(4, size=300, p=[0.5, 0.2, 0.1, 0.2])
        a, b = np.isin(cells, (0, 1)), np.isin(cells, (0, 2))
        estimate = paired_bootstrap_ratio(a, b, resamples=400, seed=i)
        covered += estimate.low <= truth <= estimate.high
    assert 0.88 <= covered / datasets <= 0.99


def test_bootstrap_drops_resamples_without_a_denominator() -> None:
    a, b = [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]  # P(no b in a resample) = 0.8^5 = 0.33
    estimate = paired_bootstrap_ratio(a, b, resamples=300, seed=0)
    assert 50 < estimate.dropped < 150
    outcomes = []
    for seed in range(30):  # with one resample, it is dropped a third of the time: too many
        try:
            outcomes.append(paired_bootstrap_ratio(a, b, resamples=1, seed=seed).dropped)
        except ValueError as error:
            assert "1 of 1 bootstrap resamples have mean(correct_b) == 0" in str(error)
            outcomes.append(None)
    assert None in outcomes and 0 in outcomes
    with pytest.raises(ValueError, match=r"mean\(correct_b\) is 0"):
        paired_bootstrap_ratio([1, 0, 1], [0, 0, 0])


def test_compare_to_reference() -> None:
    ours = RatioEstimate(estimate=0.95, low=0.91, high=0.99, resamples=2000, seed=0)
    assert compare_to_reference(ours, 0.85) == "above"
    assert compare_to_reference(ours, 1.02) == "below"
    assert compare_to_reference(ours, 0.93) == "no difference detectable"
    assert compare_to_reference(ours, 0.91) == "no difference detectable"


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="correct is empty"):
        accuracy_interval([])
    with pytest.raises(ValueError, match="found 2 at index 1"):
        accuracy_interval([1, 2, 0])
    with pytest.raises(ValueError, match="found nan at index 2"):
        accuracy_interval(np.array([1.0, 0.0, np.nan]))
    with pytest.raises(ValueError, match="dtype"):
        accuracy_interval(["right", "wrong"])
    with pytest.raises(ValueError, match="1-D"):
        accuracy_interval(np.ones((2, 3)))
    for confidence in (1.5, 0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
            accuracy_interval([1, 0], confidence)
    with pytest.raises(ValueError, match="correct_a has 3 entries, correct_b has 2"):
        compare_paired([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="correct_b is empty"):
        compare_paired([1], [])
    with pytest.raises(ValueError, match="correct_b must hold only 0/1"):
        compare_paired([1, 0], [1, 2])
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1, got 0.0"):
        compare_paired([1, 0], [1, 0], alpha=0.0)
    with pytest.raises(ValueError, match="correct_a has 3 entries, correct_b has 2"):
        paired_bootstrap_ratio([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        paired_bootstrap_ratio([1, 0], [1, 1], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ratio([1, 0], [1, 1], confidence=1.5)


def test_mean_difference_interval_verdict_and_words():
    from gsclip_lib.evaluation.statistics import mean_difference

    rng = np.random.default_rng(0)
    ahead = mean_difference(rng.normal(0.3, 1.0, 1000))
    assert ahead.low < ahead.estimate < ahead.high and ahead.verdict == "above" and ahead.p_value < 1e-6
    half_width = 1.959964 * np.std(rng.normal(0.3, 1.0, 1000), ddof=1) / np.sqrt(1000)
    assert ahead.high - ahead.low == pytest.approx(2 * half_width, rel=0.15)
    behind = mean_difference(rng.normal(-0.3, 1.0, 1000))
    assert behind.verdict == "below" and behind.high < 0
    level = mean_difference(np.array([0.1, -0.1] * 50 + [np.nan]))  # the NaN is dropped
    assert level.images == 100 and level.verdict == "no difference detectable with 100 images"
    assert level.describe("dB").startswith("+0.00 dB (95 % CI -0.02 to +0.02; paired z-test p = 1.0, 100 images)")
    with pytest.raises(ValueError, match="at least 2 finite"):
        mean_difference([1.0, np.inf])
