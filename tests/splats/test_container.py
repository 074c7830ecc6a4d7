"""Bad input gets a ValueError that names the problem, before any kernel runs."""

import math

import pytest
import torch

from gsclip_lib.errors import ConfigError
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import fit_splats
from gsclip_lib.splats.initialization import init_grid, initialize_splats
from gsclip_lib.splats.render import render_splats


def _images(batch=2, channels=3, height=12, width=10):
    return torch.rand(batch, channels, height, width)


@pytest.fixture
def quick(defaults):
    """Two iterations of the photo settings: enough to reach every check and the first step."""
    return defaults.photo_fit_settings(iterations=2, log_every=1)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(3, 12, 10), "rank 4"),
        (torch.rand(1, 2, 3, 12, 10), "rank 4"),
        ((torch.rand(2, 3, 12, 10) * 255).to(torch.uint8), "floating point"),
        (torch.rand(2, 12, 10, 3), "channels-last"),
        (torch.rand(2, 7, 12, 10), "channels"),
        (torch.rand(0, 3, 12, 10), "empty batch"),
        (torch.rand(2, 3, 0, 10), "empty"),
        (torch.rand(2, 3, 12, 0), "empty"),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_bad_images_are_named(images, message, quick):
    with pytest.raises(ValueError, match=message):
        fit_splats(images, 4, quick, progress=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels_are_named(bad, quick):
    images = _images()
    images[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or inf pixels \(images at batch index \[1\]\)"):
        fit_splats(images, 4, quick, progress=False)


@pytest.mark.parametrize("count, message", [(0, "positive"), (-3, "positive"), (121, "more splats than pixels")])
def test_bad_splat_counts_are_named(count, message, quick):
    with pytest.raises(ValueError, match=message):
        fit_splats(_images(), count, quick, progress=False)


def test_mismatched_batch_and_channels_are_named(quick):
    images = _images(batch=2)
    with pytest.raises(ValueError, match="mismatched batch: 3 splat sets for 2 images"):
        fit_splats(images, 4, quick, initial=init_grid(_images(batch=3), 4), progress=False)
    with pytest.raises(ValueError, match="wrong channel count: splats have C = 1, images have C = 3"):
        fit_splats(images, 4, quick, initial=init_grid(_images(batch=2, channels=1), 4), progress=False)


def test_splat_tensors_must_agree():
    positions, cholesky, colours = torch.rand(2, 5, 2), torch.rand(2, 5, 3), torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match=r"positions must be \[B, N, 2\]"):
        Splats.from_tensors(torch.rand(2, 5, 3), cholesky, colours)
    with pytest.raises(ValueError, match=r"cholesky must be \[B, N, 3\] = \(2, 5, 3\), got \(2, 4, 3\)"):
        Splats.from_tensors(positions, torch.rand(2, 4, 3), colours)
    with pytest.raises(ValueError, match=r"colours must be \[B, N, C\] with \[B, N\] = \(2, 5\)"):
        Splats.from_tensors(positions, cholesky, torch.rand(3, 5, 3))
    with pytest.raises(ValueError, match="valid must be a bool"):
        Splats(positions, cholesky, colours, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"positions must be \[B, N, 2\], got \(5, 2\)"):
        Splats.from_tensors(torch.rand(5, 2), cholesky, colours)
    with pytest.raises(ValueError, match="colours must be a floating-point tensor"):
        Splats.from_tensors(positions, cholesky, torch.ones(2, 5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="cholesky must be a torch.Tensor"):
        Splats(positions, [[1.0, 0.0, 1.0]], colours, torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "cuda-magic"}, r"backend: Input should be 'auto', 'triton', 'triton_tiled', 'cpu', 'windowed' or 'dense'"),
        ({"init": "kmeans"}, r"init: Input should be 'grid', 'gradient' or 'random'"),
        ({"iterations": -1}, r"iterations: Input should be greater than or equal to 0"),
        ({"lr_positions": 0.0}, r"lr_positions: Input should be greater than 0"),
        ({"cutoff": -1.0}, r"cutoff: Input should be greater than 0"),
        ({"colour_l1": -1e-6}, r"colour_l1: Input should be greater than or equal to 0"),
    ],
)
def test_bad_fit_settings_are_named(defaults, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        defaults.fit_settings(**kwargs)


def test_render_rejects_bad_sizes_and_backends():
    splats = init_grid(_images(), 4)
    with pytest.raises(ValueError, match="height must be a positive int"):
        render_splats(splats, 0, 10)
    with pytest.raises(ValueError, match="unknown render backend"):
        render_splats(splats, 12, 10, backend="opengl")
    with pytest.raises(ValueError, match="unknown splat init"):
        initialize_splats(_images(), 4, "kmeans", seed=0)
