"""The tile-culled Triton rasterizer and its torch binning, against the dense PyTorch twin.

The kernels run under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it), so shapes stay
small and odd: image sizes that are not multiples of the tile (13x29, 17x17) and one that is not a
multiple of 16 (28x28), N=37 (not a multiple of any block), B > 1, ~20 % invalid slots. The binning
tests need no Triton at all.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rasterize_torch import rasterize_dense_torch, splat_weights_dense
from kernels.rasterize_triton import rasterize_triton
from kernels.rasterize_triton_tiled import rasterize_triton_tiled
from kernels.tiling import bin_splats_to_tiles, count_evaluations, splat_pixel_boxes, tile_pixel_counts

# Both compute in fp32 and sum in different orders; observed differences are a few 1e-6.
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def splat_tensors(random_splats):
    """``splat_tensors(batch, n, channels, height, width)``: the kernels' four tensors."""

    def make(batch: int, n: int, channels: int, height: int, width: int, seed: int = 0):
        splats = random_splats(
            batch, n, channels, height=height, width=width, shear=0.25, invalid=0.2, seed=seed
        )
        return splats.positions, splats.cholesky, splats.colours, splats.valid

    return make


def grads_through(render, positions, cholesky, colours, valid, height, width, cutoff, cotangent, **options):
    """(image, grad positions, grad cholesky, grad colours) of <render(...), cotangent>."""
    leaves = [t.detach().clone().requires_grad_() for t in (positions, cholesky, colours)]
    image = render(*leaves, valid, height, width, cutoff, **options)
    return (image, *torch.autograd.grad(image, leaves, cotangent))


@pytest.mark.parametrize(
    "batch, n, channels, height, width, tile_size, cutoff",
    [
        (2, 37, 3, 13, 29, 8, 3.0),
        (3, 37, 1, 17, 17, 4, 3.5),
        (2, 37, 3, 28, 28, 16, 2.0),
        (1, 20, 3, 17, 17, 32, 3.5),  # one tile larger than the image
    ],
)
def test_forward_and_backward_match_twin(
    splat_tensors, batch, n, channels, height, width, tile_size, cutoff
) -> None:
    splats = splat_tensors(batch, n, channels, height, width)
    cotangent = torch.randn(batch, channels, height, width)

    ours = grads_through(rasterize_triton_tiled, *splats, height, width, cutoff, cotangent, tile_size=tile_size)
    twin = grads_through(rasterize_dense_torch, *splats, height, width, cutoff, cotangent)

    assert ours[0].shape == (batch, channels, height, width)
    for name, got, expected in zip(["image", "positions", "cholesky", "colours"], ours, twin):
        torch.testing.assert_close(got, expected, **FP32, msg=lambda m: f"{name}: {m}")
    # Not vacuous: the splats reach the image and every kind of gradient is non-zero somewhere.
    assert all(t.abs().max() > 1e-3 for t in ours)


def test_matches_dense_triton_kernel(splat_tensors) -> None:
    splats = splat_tensors(2, 37, 3, 13, 29, seed=1)
    cotangent = torch.randn(2, 3, 13, 29)
    tiled = grads_through(rasterize_triton_tiled, *splats, 13, 29, 3.0, cotangent, tile_size=8)
    dense = grads_through(rasterize_triton, *splats, 13, 29, 3.0, cotangent)
    for got, expected in zip(tiled, dense):
        torch.testing.assert_close(got, expected, **FP32)


def test_infinite_cutoff_runs_the_dense_kernels(splat_tensors) -> None:
    splats = splat_tensors(2, 9, 3, 13, 29)
    tiled = rasterize_triton_tiled(*splats, 13, 29, math.inf, tile_size=8)
    dense = rasterize_triton(*splats, 13, 29, math.inf)
    torch.testing.assert_close(tiled, dense, rtol=0, atol=0)
    torch.testing.assert_close(tiled, rasterize_dense_torch(*splats, 13, 29), **FP32)


def test_runs_are_bit_identical(splat_tensors) -> None:
    splats = splat_tensors(2, 37, 3, 17, 17, seed=2)
    cotangent = torch.randn(2, 3, 17, 17)
    first = grads_through(rasterize_triton_tiled, *splats, 17, 17, 3.5, cotangent, tile_size=8)
    second = grads_through(rasterize_triton_tiled, *splats, 17, 17, 3.5, cotangent, tile_size=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_invalid_splats_are_inert(splat_tensors) -> None:
    positions, cholesky, colours, valid = splat_tensors(2, 37, 3, 13, 29)
    cotangent = torch.randn(2, 3, 13, 29)
    image, g_pos, g_chol, g_col = grads_through(
        rasterize_triton_tiled, positions, cholesky, colours, valid, 13, 29, 3.0, cotangent, tile_size=8
    )
    invalid = ~valid
    assert invalid.sum() >= 1
    for grad in (g_pos, g_chol, g_col):
        assert torch.all(grad[invalid] == 0)

    # Garbage in invalid slots (a zero factor, NaNs) changes nothing, forward or backward.
    garbage = [positions.clone(), cholesky.clone(), colours.clone()]
    garbage[0][invalid] = math.nan
    garbage[1][invalid] = 0.0
    garbage[2][invalid] = math.nan
    again = grads_through(
        rasterize_triton_tiled, *garbage, valid, 13, 29, 3.0, cotangent, tile_size=8
    )
    assert torch.isfinite(again[0]).all()
    for got, expected in zip(again, (image, g_pos, g_chol, g_col)):
        assert torch.equal(got, expected)


def test_no_splats_renders_black(splat_tensors) -> None:
    positions, cholesky, colours, valid = splat_tensors(2, 0, 3, 13, 29)
    image = rasterize_triton_tiled(positions, cholesky, colours, valid, 13, 29, 3.0)
    assert image.shape == (2, 3, 13, 29)
    assert torch.all(image == 0)


def test_rejects_bad_inputs(splat_tensors) -> None:
    positions, cholesky, colours, valid = splat_tensors(2, 5, 3, 13, 29)
    with pytest.raises(ValueError, match="cholesky must be"):
        rasterize_triton_tiled(positions, cholesky[:, :-1], colours, valid, 13, 29, 3.0)
    with pytest.raises(ValueError, match="positions must be"):
        rasterize_triton_tiled(positions[..., :1], cholesky, colours, valid, 13, 29, 3.0)
    with pytest.raises(ValueError, match="valid must be a bool"):
        rasterize_triton_tiled(positions, cholesky, colours, valid.float(), 13, 29, 3.0)
    with pytest.raises(ValueError, match="colours must be a floating"):
        rasterize_triton_tiled(positions, cholesky, colours.long(), valid, 13, 29, 3.0)
    with pytest.raises(ValueError, match="tile_size"):
        rasterize_triton_tiled(positions, cholesky, colours, valid, 13, 29, 3.0, tile_size=12)
    with pytest.raises(ValueError, match="cutoff"):
        rasterize_triton_tiled(positions, cholesky, colours, valid, 13, 29, -1.0)


# The binning alone, in plain torch.


@pytest.mark.parametrize("height, width, tile_size", [(13, 29, 8), (28, 28, 16), (17, 17, 4)])
def test_tile_lists_cover_every_nonzero_pair(random_splats, height, width, tile_size) -> None:
    splats = random_splats(3, 41, 1, height=height, width=width, shear=0.5, invalid=0.2, seed=3)
    cutoff = 3.0
    bins = bin_splats_to_tiles(splats.positions, splats.cholesky, splats.valid, height, width, cutoff, tile_size)
    weights = splat_weights_dense(splats.positions, splats.cholesky, splats.valid, height, width, cutoff)  # [B, N, H, W]

    # listed[b, n, ty, tx]: splat n is on the list of tile (ty, tx) of image b.
    batch, n = splats.valid.shape
    listed = torch.zeros(batch, n, bins.tiles_y, bins.tiles_x, dtype=torch.bool)
    counts = bins.splats_per_tile()
    for b in range(batch):
        for t in range(bins.tiles_per_image):
            start, end = bins.tile_offsets[b * bins.tiles_per_image + t], bins.tile_offsets[b * bins.tiles_per_image + t + 1]
            members = bins.tile_splats[start:end].long()
            assert torch.all(members[1:] > members[:-1]), "lists must be strictly ascending"
            listed[b, members, t // bins.tiles_x, t % bins.tiles_x] = True
    rows = torch.arange(height) // tile_size
    cols = torch.arange(width) // tile_size
    pixel_listed = listed[:, :, rows][:, :, :, cols]  # [B, N, H, W]: the pixel's tile lists the splat
    assert torch.all(pixel_listed[weights > 0]), "a splat-pixel pair with weight is not on the tile's list"

    # The backward's boxes cover every weighted pixel too.
    first_col, first_row, box_cols, box_rows = bins.boxes.long().unbind(-1)
    ys = torch.arange(height)[None, None, :, None]
    xs = torch.arange(width)[None, None, None, :]
    in_box = (
        (xs >= first_col[..., None, None]) & (xs < (first_col + box_cols)[..., None, None])
        & (ys >= first_row[..., None, None]) & (ys < (first_row + box_rows)[..., None, None])
    )
    assert torch.all(in_box[weights > 0])

    # Counts: a tile lists exactly the valid splats whose box meets it (brute force over boxes).
    tile_x0 = torch.arange(bins.tiles_x) * tile_size
    tile_y0 = torch.arange(bins.tiles_y) * tile_size
    meets_x = (first_col[..., None] < tile_x0 + tile_size) & ((first_col + box_cols)[..., None] > tile_x0)
    meets_y = (first_row[..., None] < tile_y0 + tile_size) & ((first_row + box_rows)[..., None] > tile_y0)
    expected = (meets_y[..., :, None] & meets_x[..., None, :] & (box_cols > 0)[..., None, None])
    assert torch.equal(listed, expected)
    assert torch.equal(counts, expected.sum(1))
    assert not listed[~splats.valid].any()
    assert int(bins.tile_offsets[-1]) == int(expected.sum()) == bins.tile_splats.numel()

    evaluations = count_evaluations(bins, n, height, width)
    pixels = tile_pixel_counts(height, width, tile_size)
    assert pixels.sum() == height * width
    assert evaluations["dense_forward"] == batch * n * height * width
    assert evaluations["tiled_forward"] == int((expected.sum(1) * pixels).sum())
    assert evaluations["tiled_backward"] == evaluations["tiled_forward"]  # both walk the tiles' lists
    assert evaluations["box"] == int(in_box.sum())
    # Culling at cutoff 3 on these small images saves work, and the box never exceeds its tiles.
    assert evaluations["box"] <= evaluations["tiled_forward"] < evaluations["dense_forward"]

    # Summing per-pair values over each splat's tiles equals a scatter-add by owner, and a splat on
    # no tile (invalid, or off the image) sums to 0.
    values = torch.randn(bins.tile_splats.numel(), 3, dtype=torch.float64)
    image_of_pair = torch.repeat_interleave(
        torch.arange(batch * bins.tiles_per_image) // bins.tiles_per_image, bins.tile_offsets.diff())
    owner = image_of_pair * n + bins.tile_splats.long()
    expected_sums = torch.zeros(batch * n, 3, dtype=torch.float64).index_add_(0, owner, values)
    assert torch.allclose(bins.sum_over_tiles(values), expected_sums)
    assert torch.equal(bins.tiles_per_splat, torch.bincount(owner, minlength=batch * n))
    with pytest.raises(ValueError, match="one row per"):
        bins.sum_over_tiles(values[1:])


def test_boxes_are_tight_and_handle_degenerate_splats() -> None:
    positions = torch.tensor([[[10.0, 10.0], [10.3, 4.7], [math.nan, 3.0], [-50.0, 5.0], [5.0, 5.0]]])
    cholesky = torch.tensor([[[2.0, 0.0, 1.0], [1.0, -1.5, 0.5], [1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]])
    valid = torch.tensor([[True, True, True, True, False]])
    boxes = splat_pixel_boxes(positions, cholesky, valid, 20, 30, cutoff=2.0)[0].tolist()
    # x half-extent 4: centres 6.5 .. 13.5 -> columns 6..13; y half-extent 2: rows 8..11.
    assert boxes[0] == [6, 8, 8, 4]
    # x half-extent 2: centres 8.3 .. 12.3 -> columns 8..11; y half-extent 2*sqrt(2.5) = 3.162:
    # centres 1.54 .. 7.86 -> rows 2..7.
    assert boxes[1] == [8, 2, 4, 6]
    assert boxes[2] == [0, 0, 0, 0]  # NaN centre: inert, as the dense kernels make it
    assert boxes[3] == [0, 0, 0, 0]  # entirely left of the image
    assert boxes[4] == [0, 0, 0, 0]  # invalid
    everywhere = splat_pixel_boxes(positions, cholesky, valid, 20, 30, cutoff=math.inf)[0].tolist()
    assert everywhere[0] == everywhere[3] == [0, 0, 30, 20]


def test_render_splats_dispatches_to_the_tiled_kernels(random_splats):
    """``backend="triton_tiled"`` (the paper profile's fitter backend) renders what the dense twin does."""
    from gsclip_lib.splats.render import render_splats

    splats = random_splats(2, 9, 3, height=13, width=17)
    tiled = render_splats(splats, 13, 17, backend="triton_tiled", cutoff=3.5)
    dense = render_splats(splats, 13, 17, backend="dense", cutoff=3.5)
    torch.testing.assert_close(tiled, dense, rtol=1e-5, atol=1e-5)
