"""Uncertainty of zero-shot accuracies, and paired comparisons of two classifiers.

Every accuracy in this project is the mean of a 0/1 vector ``correct`` of shape ``[n]``, one entry
per evaluation image (1 = the top-1 prediction was right). Proportions and their differences are
fractions in [0, 1] (or [-1, 1]); :meth:`Interval.as_percent` turns them into percent, and a
difference in percent is reported in *percentage points*.

Three questions, three procedures:

- **How precise is one accuracy?** :func:`accuracy_interval`: the Wilson score interval
  (Wilson 1927), which, unlike the Wald interval ``p +- z sqrt(p(1-p)/n)``, keeps near nominal
  coverage close to 0 and 1 and never leaves [0, 1].
- **Is classifier A better than classifier B on the same images?** :func:`compare_paired`. The two
  vectors are paired (the same image is easy or hard for both), so the two accuracies are correlated
  and intervals or tests for independent samples would be far too wide. Only the discordant images
  carry information about the difference: ``a_only`` (A right, B wrong) and ``b_only`` (B right,
  A wrong). The *test* is McNemar's exact test, a two-sided binomial test of ``a_only`` among
  ``a_only + b_only`` at p = 1/2. The *interval* for ``accuracy(A) - accuracy(B)`` is Newcombe's
  hybrid score ("square-and-add") interval for paired data (Newcombe 1998, Statistics in Medicine
  17:2635, method 10), built from the Wilson intervals of the two accuracies and their estimated
  correlation, the latter with the adjustment used in the method's published worked examples (see
  ``_newcombe_phi``). They are two different procedures: the test is exact and conservative, the
  interval approximate, so in borderline cases (p close to ``alpha``) the interval may exclude 0
  while the test does not reject (seen with p up to about 0.08 at alpha = 0.05), or the reverse.
  The verdict is the test's.
- **Is our ratio (e.g. splat accuracy / RGB accuracy) above or below the paper's number?**
  :func:`paired_bootstrap_ratio` gives a percentile bootstrap interval of ``mean(a) / mean(b)``
  over images (the same resampled images for both vectors), and :func:`compare_to_reference` places
  the paper's number, taken as exact, against it.

Pure Python and numpy: the normal quantile comes from :class:`statistics.NormalDist`, the binomial
tail from :func:`math.lgamma`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from statistics import NormalDist

import numpy as np

from gsclip_lib.errors import positive_int

ALPHA = 0.05  # 95 % intervals, tests at the 5 % level

MCNEMAR_EXACT = "McNemar's exact test"
ABOVE = "above"
BELOW = "below"
NO_DIFFERENCE = "no difference detectable"

# Elements of one bootstrap chunk of resampled indices ([chunk, n] int64, 16 MB at this size).
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000

CorrectVector = Sequence[bool] | Sequence[int] | np.ndarray


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Interval:
    """A proportion or a difference of proportions with a confidence interval, as fractions.

    ``estimate`` lies in ``[low, high]``; all three are fractions (a proportion in [0, 1], a
    difference of proportions in [-1, 1]), not percent.
    """

    estimate: float
    low: float
    high: float

    def as_percent(self) -> Interval:
        """The same interval in percent (or percentage points for a difference): all three x 100."""
        return Interval(100.0 * self.estimate, 100.0 * self.low, 100.0 * self.high)


@dataclass(frozen=True)
class PairedComparison:
    """Classifier A against classifier B on the same ``images`` evaluation images.

    ``difference`` is accuracy(A) - accuracy(B) as a fraction, with Newcombe's paired interval at
    level ``confidence``; ``p_value`` is McNemar's exact two-sided p-value; ``verdict`` says where A
    stands relative to B: ``"above"``, ``"below"`` (the test rejects at ``1 - confidence``) or
    ``"no difference detectable with {images:,} images"``.
    """

    test: str
    images: int
    a_only: int
    b_only: int
    difference: Interval
    p_value: float
    verdict: str
    confidence: float = 1.0 - ALPHA

    def describe(self, digits: int = 1) -> str:
        """One line for a report, in percentage points, e.g. ``"+1.2 points (95 % CI +0.3 to +2.1;
        McNemar's exact test p = 0.012, 1,000 paired images)"``.
        ``digits`` is the number of decimals of the points; p has 2 significant digits, or reads
        ``p < 0.001``.
        """
        points = self.difference.as_percent()
        estimate = _signed(points.estimate, digits)
        low, high = _signed(points.low, digits), _signed(points.high, digits)
        level = f"{100.0 * self.confidence:g} %"
        return (
            f"{estimate} points ({level} CI {low} to {high}; "
            f"{self.test} {format_p_value(self.p_value)}, {self.images:,} paired images)"
        )


@dataclass(frozen=True)
class RatioEstimate:
    """``mean(a) / mean(b)`` with a percentile bootstrap interval ``[low, high]`` (unitless ratio).

    ``resamples`` is the number of bootstrap resamples drawn with ``seed``; ``dropped`` of them had
    ``mean(b) == 0`` (no ratio) and are not in the interval; ``confidence`` is the interval's level.
    """

    estimate: float
    low: float
    high: float
    resamples: int
    seed: int
    dropped: int = 0
    confidence: float = 1.0 - ALPHA


# --------------------------------------------------------------------------------------------------
# One accuracy


def accuracy_interval(correct: CorrectVector, confidence: float = 1.0 - ALPHA) -> Interval:
    """Wilson score interval of the accuracy ``mean(correct)``.

    ``correct``: shape ``[n]``, values 0/1 or False/True, one per image. Returns fractions in
    [0, 1]. Raises ValueError on an empty vector, any other value (2, NaN, ...), or ``confidence``
    outside (0, 1).
    """
    z = _z_value(confidence)
    values = _as_correct(correct, "correct")
    return _wilson(int(values.sum()), values.size, z)


def _wilson(successes: int, n: int, z: float) -> Interval:
    """Wilson score interval of ``successes / n`` for the two-sided normal quantile ``z``."""
    p = successes / n
    scale = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / scale
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


# --------------------------------------------------------------------------------------------------
# Two classifiers on the same images


def compare_paired(
    correct_a: CorrectVector, correct_b: CorrectVector, *, alpha: float = ALPHA
) -> PairedComparison:
    """Classifier A against B on the same images: McNemar's exact test and Newcombe's interval.

    ``correct_a``, ``correct_b``: 0/1 vectors of shape ``[n]``, the same images in the same order.
    The verdict is decided by the test (``p_value < alpha``); the interval is at level
    ``1 - alpha`` and agrees with it except near the boundary (see the module docstring).
    Raises ValueError on empty vectors, vectors of different lengths, values other than 0/1, or
    ``alpha`` outside (0, 1).
    """
    _check_open_unit(alpha, "alpha")
    z = _z_value(1.0 - alpha)
    a, b = _as_pair(correct_a, correct_b)
    both = int(np.count_nonzero(a & b))
    a_only = int(np.count_nonzero(a & ~b))
    b_only = int(np.count_nonzero(~a & b))
    neither = a.size - both - a_only - b_only
    p_value = mcnemar_exact_p(a_only, b_only)
    return PairedComparison(
        test=MCNEMAR_EXACT,
        images=a.size,
        a_only=a_only,
        b_only=b_only,
        difference=newcombe_paired_interval(both, a_only, b_only, neither, z),
        p_value=p_value,
        verdict=_paired_verdict(a_only, b_only, p_value, alpha, a.size),
        confidence=1.0 - alpha,
    )


def _paired_verdict(a_only: int, b_only: int, p_value: float, alpha: float, images: int) -> str:
    """``"above"`` / ``"below"`` (A relative to B) when ``p_value < alpha``, else no difference."""
    if p_value < alpha and a_only > b_only:
        return ABOVE
    if p_value < alpha and b_only > a_only:
        return BELOW
    return f"{NO_DIFFERENCE} with {images:,} images"


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value of the discordant counts (1.0 when there are none).

    Under the null hypothesis each of the ``m = a_only + b_only`` discordant images is A's with
    probability 1/2, so ``p = min(1, 2 P(X <= min(a_only, b_only)))`` for ``X ~ Binomial(m, 1/2)``
    (the doubled tail equals the sum over outcomes no more likely than the observed one, the
    distribution being symmetric). The tail is summed relative to its largest term, in floats, so
    it is fast and accurate (relative error ~1e-10) for any ``m``.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    m, k = a_only + b_only, min(a_only, b_only)
    if 2 * k + 1 >= m:  # the tail holds half the distribution or more (exactly half when m is odd)
        return 1.0
    log_top = math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) - m * math.log(2.0)
    i = np.arange(k, 0, -1, dtype=np.float64)
    # term(i - 1) / term(i) = i / (m - i + 1): terms below the top one, each relative to it
    relative = np.cumprod(i / (m - i + 1.0))
    tail = math.exp(log_top) * (1.0 + float(relative.sum()))
    return min(1.0, 2.0 * tail)


def newcombe_paired_interval(
    both: int, a_only: int, b_only: int, neither: int, z: float
) -> Interval:
    """Newcombe's hybrid score interval for ``p_A - p_B`` from a paired 2x2 table.

    Counts of images: ``both`` right, ``a_only`` (A right, B wrong), ``b_only``, ``neither``;
    ``z`` the two-sided normal quantile (1.96 for 95 %). With the Wilson intervals ``[l_A, u_A]``,
    ``[l_B, u_B]`` of the two accuracies and their correlation ``phi``, the difference
    ``d = p_A - p_B`` gets

        low  = d - sqrt((p_A - l_A)^2 - 2 phi (p_A - l_A)(u_B - p_B) + (u_B - p_B)^2)
        high = d + sqrt((u_A - p_A)^2 - 2 phi (u_A - p_A)(p_B - l_B) + (p_B - l_B)^2)

    clipped to [-1, 1]. ``phi`` is the phi coefficient of the table with Newcombe's adjustment of
    its numerator (see :func:`_newcombe_phi`). Returns fractions.
    """
    n = both + a_only + b_only + neither
    if n <= 0:
        raise ValueError("the paired table is empty")
    wa = _wilson(both + a_only, n, z)
    wb = _wilson(both + b_only, n, z)
    phi = _newcombe_phi(both, a_only, b_only, neither)
    d = wa.estimate - wb.estimate
    down_a, up_a = wa.estimate - wa.low, wa.high - wa.estimate
    down_b, up_b = wb.estimate - wb.low, wb.high - wb.estimate
    delta = math.sqrt(max(0.0, down_a**2 - 2.0 * phi * down_a * up_b + up_b**2))
    epsilon = math.sqrt(max(0.0, up_a**2 - 2.0 * phi * up_a * down_b + down_b**2))
    return Interval(d, max(-1.0, d - delta), min(1.0, d + epsilon))


def _newcombe_phi(both: int, a_only: int, b_only: int, neither: int) -> float:
    """Correlation of the two correctness indicators as Newcombe's paired interval uses it.

    ``phi = N / sqrt(product of the four margins)`` with ``N = both * neither - a_only * b_only``,
    0 when a margin is empty. A positive ``N`` is shrunk towards 0 by ``n / 2`` (and set to 0 when
    it is below ``n / 2``), as in the published worked examples of the method (Newcombe's chapter in
    Altman et al. 2000, Statistics with Confidence; Fagerland, Lydersen & Laake 2017, ch. 8, whose
    Cavo et al. example the tests reproduce); a smaller correlation widens the interval a little
    (with the plain phi coefficient that example's interval would be -0.1174 to -0.0059 instead of
    -0.1186 to -0.0046).
    """
    n = both + a_only + b_only + neither
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    if margins == 0:
        return 0.0
    numerator = both * neither - a_only * b_only
    if numerator > n / 2:
        numerator -= n / 2
    elif numerator >= 0:
        numerator = 0
    return numerator / math.sqrt(margins)


# --------------------------------------------------------------------------------------------------
# A ratio of accuracies against a published number


def paired_bootstrap_ratio(
    correct_a: CorrectVector,
    correct_b: CorrectVector,
    *,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 1.0 - ALPHA,
) -> RatioEstimate:
    """Percentile bootstrap interval of ``mean(a) / mean(b)`` over images.

    ``correct_a``, ``correct_b``: 0/1 vectors of shape ``[n]``, the same images in the same order.
    Each resample draws ``n`` image indices with replacement (the same indices for both vectors),
    from ``numpy.random.default_rng(seed)``, so the result is deterministic for a seed. Resamples
    with ``mean(b) == 0`` have no ratio: they are dropped and counted in ``dropped``; ValueError if
    more than half are, or if ``mean(b) == 0`` on the data themselves.
    """
    positive_int(resamples, "resamples")
    _z_value(confidence)
    a, b = _as_pair(correct_a, correct_b)
    if not b.any():
        raise ValueError("mean(correct_b) is 0: the ratio mean(a) / mean(b) is undefined")
    sums_a, sums_b = _bootstrap_sums(a, b, resamples, seed)
    kept = sums_b > 0
    dropped = resamples - int(kept.sum())
    if 2 * dropped > resamples:
        raise ValueError(
            f"{dropped} of {resamples} bootstrap resamples have mean(correct_b) == 0: "
            "too few correct images in b for a ratio"
        )
    ratios = sums_a[kept] / sums_b[kept]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return RatioEstimate(
        estimate=float(a.sum() / b.sum()),
        low=float(low),
        high=float(high),
        resamples=int(resamples),
        seed=seed,
        dropped=dropped,
        confidence=confidence,
    )


def _bootstrap_sums(
    a: np.ndarray, b: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``a`` and ``b`` (bool ``[n]``) over ``resamples`` shared resamples of the images.

    Returns two int64 arrays of shape ``[resamples]``. Resamples are drawn in chunks of
    ``[chunk, n]`` indices; the chunk size depends only on ``n``, so a seed fixes the result.
    """
    rng = np.random.default_rng(seed)
    n = a.size
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    sums_a = np.empty(resamples, dtype=np.int64)
    sums_b = np.empty(resamples, dtype=np.int64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        sums_a[start:stop] = a64[idx].sum(axis=1)
        sums_b[start:stop] = b64[idx].sum(axis=1)
    return sums_a, sums_b


def compare_to_reference(estimate: RatioEstimate, reference: float) -> str:
    """Our ratio relative to a published one, taken as exact (no uncertainty of its own).

    ``"above"`` when ``reference < estimate.low``, ``"below"`` when ``reference > estimate.high``,
    else ``"no difference detectable"``.
    """
    if not math.isfinite(reference):
        raise ValueError(f"reference must be a finite number, got {reference!r}")
    if reference < estimate.low:
        return ABOVE
    if reference > estimate.high:
        return BELOW
    return NO_DIFFERENCE


# --------------------------------------------------------------------------------------------------
# Words and numbers


def verdict_phrase(verdict: str, what: str) -> str:
    """A verdict in a sentence: ``("above", "the thumbnail") -> "above the thumbnail"``;
    ``("no difference detectable with 1,000 images", "the thumbnail")`` ->
    ``"no difference from the thumbnail detectable with 1,000 images"``.
    """
    if verdict in (ABOVE, BELOW):
        return f"{verdict} {what}"
    if verdict.startswith(NO_DIFFERENCE):
        rest = verdict[len(NO_DIFFERENCE) :]
        return f"no difference from {what} detectable{rest}"
    expected = f"'{ABOVE}', '{BELOW}' or '{NO_DIFFERENCE}...'"
    raise ValueError(f"unknown verdict {verdict!r}: expected {expected}")


def format_p_value(p: float) -> str:
    """``"p = 0.012"``: 2 significant digits (zeros kept: ``"p = 0.50"``), or ``"p < 0.001"``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a p-value lies in [0, 1], got {p!r}")
    if p < 0.001:
        return "p < 0.001"
    rounded = float(f"{p:.2g}")
    decimals = max(0, 1 - math.floor(math.log10(rounded)))
    return f"p = {rounded:.{decimals}f}"


def _signed(value: float, digits: int) -> str:
    """``value`` with an explicit sign and ``digits`` decimals; one that rounds to 0 reads +0.0."""
    rounded = round(value, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{rounded:+.{digits}f}"


# --------------------------------------------------------------------------------------------------
# Checks


def _z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile for ``confidence`` in (0, 1) (1.96 for 0.95)."""
    _check_open_unit(confidence, "confidence")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _check_open_unit(value: float, name: str) -> None:
    """ValueError unless ``value`` is a real number strictly between 0 and 1 (NaN is not)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def _as_correct(values: CorrectVector, name: str) -> np.ndarray:
    """``values`` as a bool vector of shape ``[n]``, n >= 1; ValueError unless all are 0 or 1."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector (one entry per image), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: no evaluation images")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold 0/1 or True/False, got dtype {array.dtype}")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"{name} must hold only 0/1 or True/False, found {array[first].item()!r} "
            f"at index {first}"
        )
    return array.astype(bool)


def _as_pair(correct_a: CorrectVector, correct_b: CorrectVector) -> tuple[np.ndarray, np.ndarray]:
    """Both vectors checked by :func:`_as_correct`, and of the same length (the same images)."""
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.size != b.size:
        raise ValueError(
            f"paired vectors must cover the same images: correct_a has {a.size:,} entries, "
            f"correct_b has {b.size:,}"
        )
    return a, b


# --------------------------------------------------------------------------------------------------
# A mean of paired differences (PSNR of two fits of the same images)


@dataclass(frozen=True)
class MeanDifference:
    """The mean of paired differences (e.g. PSNR of route A minus route B on the same images), with a
    normal-approximation interval and the two-sided z-test of a zero mean. ``verdict`` is ``"above"``,
    ``"below"`` (A relative to B, the test rejects at ``1 - confidence``) or ``"no difference detectable
    with {n:,} images"``."""

    estimate: float
    low: float
    high: float
    p_value: float
    images: int
    verdict: str
    confidence: float = 1.0 - ALPHA

    def describe(self, unit: str, digits: int = 2) -> str:
        """``"+0.30 dB (95 % CI +0.25 to +0.35; paired z-test p < 0.001, 1,000 images)"``."""
        level = f"{100.0 * self.confidence:g} %"
        return (f"{_signed(self.estimate, digits)} {unit} ({level} CI {_signed(self.low, digits)} to "
                f"{_signed(self.high, digits)}; paired z-test {format_p_value(self.p_value)}, {self.images:,} images)")


def mean_difference(differences: Sequence[float] | np.ndarray, *, alpha: float = ALPHA) -> MeanDifference:
    """Mean of ``differences`` ``[n]`` (finite values only; non-finite ones are dropped) with a 95 %
    interval ``mean +- z sd / sqrt(n)`` and the z-test of a zero mean: the large-sample procedure, meant
    for a few hundred paired images or more. Raises ``ValueError`` with fewer than 2 finite values."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    values = np.asarray(differences, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise ValueError(f"a mean difference needs at least 2 finite values, got {values.size}")
    mean, error = float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))
    z = _z_value(1.0 - alpha)
    p_value = 1.0 if error == 0.0 and mean == 0.0 else (
        0.0 if error == 0.0 else 2.0 * (1.0 - NormalDist().cdf(abs(mean) / error)))
    verdict = ("above" if mean > 0 else "below") if p_value < alpha else (
        f"no difference detectable with {values.size:,} images")
    return MeanDifference(mean, mean - z * error, mean + z * error, p_value, int(values.size), verdict, 1.0 - alpha)
