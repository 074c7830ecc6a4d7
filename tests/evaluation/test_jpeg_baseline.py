"""Tests of the JPEG-at-the-same-bytes baseline (gsclip_lib/evaluation/jpeg_baseline.py) on real photos."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data, transform

from gsclip_lib.splats.codec import payload_bytes
from gsclip_lib.evaluation.jpeg_baseline import (
    MAX_QUALITY,
    encode_jpeg,
    jpeg_at_budget,
    jpeg_psnr_at_budget,
)

PHOTOS = ("astronaut", "chelsea", "coffee")
# The paper's four splat levels on a 224x224x3 image: 3.00x, 5.88x, 10.45x, 23.52x.
SPLAT_BUDGETS = tuple(payload_bytes(count, 3) for count in (3136, 1600, 900, 400))


def photo_224(name: str) -> np.ndarray:  # uint8 [224, 224, 3]
    resized = transform.resize(getattr(data, name)(), (224, 224), anti_aliasing=True)
    return (resized * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: photo_224(name) for name in PHOTOS}


def test_budgets_are_the_paper_levels() -> None:
    assert SPLAT_BUDGETS == (50176, 25600, 14400, 6400)
    assert [round(150528 / budget, 2) for budget in SPLAT_BUDGETS] == [3.0, 5.88, 10.45, 23.52]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("budget", SPLAT_BUDGETS)
def test_jpeg_fits_budget_and_next_quality_does_not(
    photos: dict[str, np.ndarray], name: str, budget: int
) -> None:
    image = photos[name]
    result = jpeg_at_budget(image, budget)
    assert result.fits_budget and result.quality is not None
    assert result.num_bytes <= budget
    assert result.decoded.shape == image.shape and result.decoded.dtype == np.uint8
    # num_bytes is the real, complete file at the chosen quality.
    assert result.num_bytes == len(encode_jpeg(image, result.quality))
    if result.quality < MAX_QUALITY:
        assert len(encode_jpeg(image, result.quality + 1)) > budget


@pytest.mark.parametrize("name", PHOTOS)
def test_psnr_grows_with_budget(photos: dict[str, np.ndarray], name: str) -> None:
    results = [jpeg_psnr_at_budget(photos[name], budget) for budget in SPLAT_BUDGETS]
    psnrs = [psnr for psnr, _ in results]
    qualities = [result.quality for _, result in results]
    # Budgets shrink along the list; so must quality and PSNR (equal when both hit the top quality).
    assert qualities == sorted(qualities, reverse=True)
    assert psnrs == sorted(psnrs, reverse=True)
    assert psnrs[0] > psnrs[-1] + 5.0
    # A JPEG of a real photo at these sizes lands in a sane band, not at 0 or infinity.
    assert 25.0 < psnrs[-1] < psnrs[0] < 50.0


def test_psnr_matches_a_direct_computation(photos: dict[str, np.ndarray]) -> None:
    image = photos["coffee"]
    psnr, result = jpeg_psnr_at_budget(image, 6400)
    mse = np.mean((image / 255.0 - result.decoded / 255.0) ** 2)
    assert psnr == pytest.approx(-10 * np.log10(mse), abs=1e-9)


@pytest.mark.parametrize("shape", [(224, 224), (224, 224, 1)])
def test_grayscale_is_encoded_as_one_channel(photos: dict[str, np.ndarray], shape: tuple) -> None:
    gray = np.asarray(Image.fromarray(photos["chelsea"]).convert("L")).reshape(shape)
    result = jpeg_at_budget(gray, payload_bytes(400, 1))  # 400 gray splats: 12 bytes each
    assert result.fits_budget and result.num_bytes <= 4800
    assert result.decoded.shape == shape
    with Image.open(io.BytesIO(encode_jpeg(gray, result.quality))) as picture:
        assert picture.mode == "L"
    psnr, _ = jpeg_psnr_at_budget(gray, 4800)
    assert psnr > 25.0


def test_too_small_budget_is_reported_not_hidden(photos: dict[str, np.ndarray]) -> None:
    result = jpeg_at_budget(photos["astronaut"], 100)
    assert not result.fits_budget
    assert result.quality is None
    assert result.num_bytes > 100
    assert result.num_bytes == len(encode_jpeg(photos["astronaut"], 1))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((3, 8, 8), dtype=np.uint8), "channels last"),
    ],
)
def test_bad_images_are_refused(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jpeg_at_budget(image, 1000)


def test_bad_budget_is_refused(photos: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        jpeg_at_budget(photos["coffee"], 0)
