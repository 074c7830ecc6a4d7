"""Bad splats and bad images at the public entries: a clear error, or a counted restart; never a
splat that silently vanishes, never a fit of garbage."""

import math
import re

import pytest
import torch

from gsclip_lib.errors import InputError
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import fit_splats
from gsclip_lib.splats.initialization import init_grid
from gsclip_lib.splats.render import render_splats

SIZE = 12


def _with(splats: Splats, field: str, value: float, column: int = 0) -> Splats:
    tensors = {name: getattr(splats, name).clone() for name in ("positions", "cholesky", "colours")}
    tensors[field][1, 3, column] = value
    return Splats(tensors["positions"], tensors["cholesky"], tensors["colours"], splats.valid)


@pytest.mark.parametrize("backend", ["dense", "windowed", "triton", "triton_tiled"])
@pytest.mark.parametrize(
    "field, value, column, problem",
    [
        ("positions", math.nan, 0, "non-finite centre"),
        ("positions", math.inf, 1, "non-finite centre"),
        ("positions", 1e12, 0, "centre beyond 2^24 pixels"),
        ("cholesky", math.nan, 1, "non-finite Cholesky factor"),
        ("cholesky", 0.0, 0, "zero Cholesky diagonal"),
        ("cholesky", 0.0, 2, "zero Cholesky diagonal"),
        ("colours", math.nan, 0, "non-finite colour"),
    ],
)
def test_a_valid_splat_that_cannot_be_rendered_is_an_error(random_splats, backend, field, value, column, problem):
    splats = random_splats(2, 6, 1, height=SIZE, width=SIZE)
    with pytest.raises(InputError, match=re.escape(f"1 valid splat(s) with a {problem} (first: image 1, slot 3)")):
        render_splats(_with(splats, field, value, column), SIZE, SIZE, backend=backend)
    # The same values in an invalid slot are inert, as masked slots always are.
    masked = _with(splats, field, value, column)
    masked = masked.with_valid(masked.valid.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(False)))
    assert torch.isfinite(render_splats(masked, SIZE, SIZE, backend=backend)).all()


def test_mixed_dtypes_are_named(random_splats):
    splats = random_splats(1, 4, 3, height=SIZE, width=SIZE)
    mixed = Splats(splats.positions, splats.cholesky, splats.colours.double(), splats.valid)
    with pytest.raises(InputError, match="share one dtype: positions torch.float32, cholesky torch.float32, colours torch.float64"):
        render_splats(mixed, SIZE, SIZE)


def test_the_triton_backend_names_the_device_it_needs(random_splats, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    splats = random_splats(1, 4, 1, height=SIZE, width=SIZE)
    for backend in ("triton", "triton_tiled"):
        with pytest.raises(InputError, match=f"the {backend} backend needs CUDA tensors, these are on cpu"):
            render_splats(splats, SIZE, SIZE, backend=backend)


def test_images_out_of_range_are_refused_with_the_range_found(defaults):
    images = torch.rand(2, 1, SIZE, SIZE) * 255
    with pytest.raises(InputError, match=r"images must lie in \[0, 1\]; these hold values from .* \(0-255 data: divide by 255\)"):
        fit_splats(images, 6, defaults.fit_settings(iterations=2))
    with pytest.raises(InputError, match=r"images must lie in \[0, 1\]"):
        init_grid(torch.full((1, 1, SIZE, SIZE), -0.5), 6)


def test_half_precision_images_are_fitted_in_single_precision(defaults):
    images = torch.rand(3, 1, SIZE, SIZE)
    settings = defaults.fit_settings(iterations=10, backend="dense")
    full = fit_splats(images, 8, settings, progress=False)
    half = fit_splats(images.half(), 8, settings, progress=False)
    assert half.splats.positions.dtype == torch.float32 and not half.dropped and not half.retried
    assert torch.isfinite(half.psnr).all() and (half.psnr - full.psnr).abs().max() < 0.5


def test_a_fit_whose_splats_turn_non_finite_is_restarted_then_dropped_not_rendered(defaults):
    images = torch.rand(3, 1, SIZE, SIZE)
    start = init_grid(images, 9)
    broken = _with(Splats(start.positions.clone(), start.cholesky, start.colours, start.valid), "positions", math.nan)
    result = fit_splats(images, 9, defaults.fit_settings(iterations=4, backend="dense", max_retries=1),
                        initial=broken, progress=False)
    assert result.dropped == [1] and math.isnan(float(result.psnr[1]))
    assert not result.splats.valid[1].any() and torch.isfinite(result.psnr[[0, 2]]).all()
