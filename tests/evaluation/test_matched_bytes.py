"""Pixel baselines at the splats' byte budgets (gsclip_lib/evaluation/matched_bytes.py), on real photographs."""

import numpy as np
import pytest
import torch
from skimage import color, data, transform

from gsclip_lib.data.image_decoding import images_to_uint8, uint8_to_images
from gsclip_lib.evaluation.jpeg_baseline import encode_jpeg
from gsclip_lib.evaluation.matched_bytes import (
    ByteTally,
    evaluate_matched_bytes,
    matched_bytes_batches,
    matched_bytes_images,
    splat_budget_bytes,
    splat_level_budgets,
    thumbnail_at_budget,
    thumbnail_size,
)
from gsclip_lib.evaluation.zero_shot import EvalBatch

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket")
# The project's levels on 28x28 gray (22, 11, 6, 3 splats) and the paper's on 224x224 RGB.
SMALL_BUDGETS = (36, 72, 132, 264)
PAPER_BUDGETS = (6400, 14400, 25600, 50176)


def photo(name: str, size: int, gray: bool) -> np.ndarray:  # uint8 [size, size, C]
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if gray:
        image = color.rgb2gray(image)[..., None]
    resized = transform.resize(image, (size, size), anti_aliasing=True)
    if resized.max() > 1.0:  # an integer image kept its range
        resized = resized / 255.0
    return (resized * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def gray28() -> np.ndarray:  # [5, 28, 28, 1]
    return np.stack([photo(name, 28, gray=True) for name in PHOTOS])


@pytest.fixture(scope="module")
def rgb64() -> np.ndarray:  # [5, 64, 64, 3]
    return np.stack([photo(name, 64, gray=False) for name in PHOTOS])


def test_budgets_follow_the_codec() -> None:
    assert tuple(splat_level_budgets([3, 6, 11, 22], channels=1).values()) == SMALL_BUDGETS
    assert splat_level_budgets([22, 3], channels=1, accounting="record") == {"N22": 282, "N3": 54}
    assert tuple(splat_budget_bytes(n, 3) for n in (400, 900, 1600, 3136)) == PAPER_BUDGETS
    with pytest.raises(ValueError, match="unknown accounting"):
        splat_budget_bytes(3, 1, accounting="file")


@pytest.mark.parametrize("budget", SMALL_BUDGETS + (282,) + PAPER_BUDGETS)
@pytest.mark.parametrize("which", ["gray28", "rgb64"])
def test_jpeg_never_exceeds_a_budget_it_claims_to_meet(which: str, budget: int, request) -> None:
    images = request.getfixturevalue(which)
    decoded, actual, info = matched_bytes_images(images, budget, "jpeg")
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    fits = info["fits_budget"]
    assert np.all(actual[fits] <= budget)
    for index, image in enumerate(images):
        if fits[index]:
            assert len(encode_jpeg(image, info["quality"][index])) == actual[index]
        else:  # sent at quality 1 and reported at its real size, above the budget
            assert info["quality"][index] is None
            assert actual[index] == len(encode_jpeg(image, 1)) > budget


def test_jpeg_cannot_meet_the_small_budgets(gray28: np.ndarray, rgb64: np.ndarray) -> None:
    """A JPEG file's headers and tables alone take more than 132 bytes: 28x28 gray fits only 264.

    At quality 1 these photos take about 170-190 bytes at 28x28 gray and about 400+ at 64x64 RGB.
    """
    for budget in (36, 72, 132):
        _, actual, info = matched_bytes_images(gray28, budget, "jpeg")
        assert not info["fits_budget"].any() and np.all(actual > 132)
    _, actual, info = matched_bytes_images(gray28, 264, "jpeg")
    assert info["fits_budget"].all() and np.all(actual <= 264)
    for budget in SMALL_BUDGETS:
        assert not matched_bytes_images(rgb64, budget, "jpeg")[2]["fits_budget"].any()
    for budget in PAPER_BUDGETS:  # more than the quality-100 file of a 64x64 photo
        assert matched_bytes_images(rgb64, budget, "jpeg")[2]["quality"] == [100] * len(PHOTOS)


@pytest.mark.parametrize("budget", SMALL_BUDGETS + PAPER_BUDGETS)
@pytest.mark.parametrize("which", ["gray28", "rgb64"])
def test_thumbnail_within_budget_and_original_shape(which: str, budget: int, request) -> None:
    images = request.getfixturevalue(which)
    decoded, actual, info = matched_bytes_images(images, budget, "thumbnail")
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    assert np.all(actual <= budget) and info["fits_budget"].all()
    h, w = info["size"]
    channels = images.shape[3]
    assert np.all(actual == h * w * channels)
    # The largest square that fits: one more pixel per side would not.
    if (h, w) != images.shape[1:3]:
        assert h == w and (h + 1) * (w + 1) * channels > budget
    else:  # the budget holds the whole image: sent as it is
        assert np.array_equal(decoded, images)


def test_thumbnail_sizes() -> None:
    assert [thumbnail_size(28, 28, 1, b) for b in SMALL_BUDGETS] == [(6, 6), (8, 8), (11, 11), (16, 16)]
    assert thumbnail_size(64, 64, 3, 36) == (3, 3)
    assert thumbnail_size(30, 60, 1, 200) == (10, 20)  # aspect kept
    assert thumbnail_size(28, 28, 1, 784) == (28, 28)
    assert thumbnail_size(28, 28, 3, 2) == (1, 1)  # not even one pixel: reported as not fitting
    result = thumbnail_at_budget(np.zeros((28, 28, 3), np.uint8), 2)
    assert not result.fits_budget and result.num_bytes == 3 > result.budget_bytes


def test_thumbnail_error_shrinks_with_budget(gray28: np.ndarray) -> None:
    errors = []
    for budget in SMALL_BUDGETS:
        decoded, _, _ = matched_bytes_images(gray28, budget, "thumbnail")
        errors.append(np.mean((decoded.astype(float) - gray28) ** 2))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2


def test_float_uint8_round_trip(rgb64: np.ndarray) -> None:
    images = uint8_to_images(rgb64)
    assert images.shape == (len(PHOTOS), 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert np.array_equal(images_to_uint8(images), rgb64)


def test_evaluate_matched_bytes_reports_accuracy_and_bytes(gray28: np.ndarray) -> None:
    """Dark vs bright 28x28 photos through an encoder that reads mean brightness."""
    means = np.sort(gray28.reshape(len(PHOTOS), -1).mean(axis=1))
    gap = int(np.argmax(np.diff(means)))
    threshold = float(means[gap] + means[gap + 1]) / 2  # mid-way across the widest gap (~38 levels)
    labels = torch.from_numpy((gray28.reshape(len(PHOTOS), -1).mean(axis=1) > threshold).astype(np.int64))
    images = uint8_to_images(gray28)

    def encode(batch: torch.Tensor) -> torch.Tensor:  # [B, 2]: distance to the threshold either way
        mean = batch.mean(dim=(1, 2, 3)) * 255 - threshold
        return torch.stack([-mean, mean], dim=-1)

    batches = [EvalBatch(images[:3], labels[:3], 1), EvalBatch(images[3:], labels[3:], 0)]
    budgets = splat_level_budgets([3, 22], channels=1)
    rows = evaluate_matched_bytes(encode, batches, torch.eye(2), budgets)
    assert [(row["level"], row["method"]) for row in rows] == [
        ("N3", "jpeg"), ("N3", "thumbnail"), ("N22", "jpeg"), ("N22", "thumbnail")
    ]
    by_key = {(row["level"], row["method"]): row for row in rows}
    for row in rows:
        assert row["images"] == len(PHOTOS) and row["skipped"] == 1
        assert row["top1"] == row["top5"] == 1.0  # every method keeps the mean within a few levels
    assert by_key["N3", "jpeg"]["over_budget_images"] == len(PHOTOS)
    assert by_key["N3", "jpeg"]["mean_bytes"] > 36 and by_key["N3", "jpeg"]["mean_quality"] is None
    assert by_key["N22", "jpeg"]["over_budget_images"] == 0 and by_key["N22", "jpeg"]["max_bytes"] <= 264
    assert by_key["N3", "thumbnail"]["thumbnail_size"] == [6, 6] and by_key["N3", "thumbnail"]["max_bytes"] == 36
    assert by_key["N22", "thumbnail"]["thumbnail_size"] == [16, 16]
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluate_matched_bytes(encode, iter(batches), torch.eye(2), budgets)


def test_matched_bytes_batches_yield_the_decoded_images(rgb64: np.ndarray) -> None:
    images, labels = uint8_to_images(rgb64), torch.arange(len(PHOTOS))
    tally = ByteTally(budget_bytes=300, method="thumbnail")
    batches = [EvalBatch(images[:2], labels[:2], 2), (images[2:], labels[2:])]
    out = list(matched_bytes_batches(batches, 300, "thumbnail", tally))
    expected, actual, _ = matched_bytes_images(rgb64, 300, "thumbnail")
    assert torch.equal(torch.cat([batch.inputs for batch in out]), uint8_to_images(expected))
    assert not torch.equal(torch.cat([batch.inputs for batch in out]), images)  # 10x10 thumbnails
    assert [batch.skipped for batch in out] == [2, 0]
    assert (tally.images, tally.total_bytes, tally.max_bytes, tally.size) == (5, int(actual.sum()), 300, (10, 10))
