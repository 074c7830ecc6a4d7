"""The windowed CPU rasterizer against its dense PyTorch twin, forward and backward.

``rasterize_windowed_torch`` has two branches (per-splat windows scattered with ``index_add``, and
a dense fallback as batched matrix products) and two execution modes (eager, and through
``torch.compile`` unless ``GSCLIP_COMPILE=0``). Small odd shapes (B=3, N=37, 19x23) test both
branches by forcing the choice; a mid-size case (B=2, N=300, 64x61) checks that the automatic choice
really takes the window branch. The compiled mode costs 10-25 s per new graph on a cold inductor
cache, so it runs on two shape families only (the dense branch at B=3, N=37, C=3 and the window
branch at the mid size); the eager mode covers the rest. The last tests measure the cutoff's error
against the exact sum on a real photograph and check that a splat's window covers its ellipse.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import kernels.rasterize_windowed as windowed
from kernels.rasterize_torch import mahalanobis_sq, pixel_centres, rasterize_dense_torch
from kernels.rasterize_windowed import rasterize_windowed_torch, window_radius_needed

B, N, H, W = 3, 37, 19, 23
MID_B, MID_N, MID_H, MID_W = 2, 300, 64, 61
# Both paths compute in fp32 but sum in different orders (index_add and bmm against einsum, and
# inductor's fused loops); observed differences are below 1e-6 of each tensor's largest entry.
FP32 = dict(rtol=1e-4, atol=1e-4)

EAGER, COMPILED = "0", "1"  # values of GSCLIP_COMPILE


@pytest.fixture
def splat_tensors(random_splats):
    """``splat_tensors(batch, n, channels, height, width, scale)``: rotated, anisotropic splats, some
    past the border, two per image wider than the image, ~20 % invalid, as the kernels' tensors."""

    def make(batch: int, n: int, channels: int, height: int, width: int, scale: tuple[float, float]):
        splats = random_splats(batch, n, channels, height=height, width=width, scale=scale, beyond=0.2, invalid=0.2)
        cholesky, valid = splats.cholesky.clone(), splats.valid.clone()
        # Two splats per image wider than the image itself: the whole-image window class.
        cholesky[:, 1:3] = torch.tensor([[1.3, 0.4, 1.1], [1.6, -0.9, 1.2]]) * max(height, width)
        valid[:, 1:3] = True
        return splats.positions, cholesky, splats.colours, valid

    return make


def grads_through(render, positions, cholesky, colours, valid, height, width, cutoff, cotangent):
    """(image, grad positions, grad cholesky, grad colours) of <render(...), cotangent>."""
    leaves = [t.detach().clone().requires_grad_() for t in (positions, cholesky, colours)]
    image = render(*leaves, valid, height, width, cutoff)
    return (image.detach(), *torch.autograd.grad(image, leaves, cotangent))


def assert_matches_twin(ours: tuple[Tensor, ...], twin: tuple[Tensor, ...]) -> None:
    """Image and gradients equal to fp32 rounding, each relative to its own scale."""
    for name, got, expected in zip(["image", "positions", "cholesky", "colours"], ours, twin):
        assert got.shape == expected.shape, name
        scale = max(expected.abs().max().item(), 1e-6)
        torch.testing.assert_close(
            got, expected, rtol=FP32["rtol"], atol=FP32["atol"] * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def _refuse(*args, **kwargs):
    raise AssertionError("this branch must not run here")


def force_branch(monkeypatch: pytest.MonkeyPatch, branch: str) -> None:
    """Make the windowed path take ``branch`` ("window" or "dense"); fail if it takes the other."""
    if branch == "window":
        monkeypatch.setattr(windowed, "DENSE_FALLBACK_RATIO", math.inf)
        monkeypatch.setattr(windowed._DenseRender, "apply", _refuse)
    else:
        monkeypatch.setattr(windowed, "DENSE_FALLBACK_RATIO", -1.0)
        monkeypatch.setattr(windowed._WindowRender, "apply", _refuse)


# Compiled cases are kept to one shape family per branch; C=1 and other cutoffs run eagerly (C=1 and
# a new cutoff would each specialize a new graph).
SMALL_CASES = [
    pytest.param(EAGER, branch, channels, cutoff, id=f"eager-{branch}-C{channels}-cut{cutoff}")
    for branch in ("window", "dense")
    for channels in (1, 3)
    for cutoff in (3.5, 2.0)
] + [pytest.param(COMPILED, "dense", 3, 3.5, id="compiled-dense-C3-cut3.5")]


@pytest.mark.parametrize("mode, branch, channels, cutoff", SMALL_CASES)
def test_small_odd_shapes_match_twin(
    splat_tensors, monkeypatch: pytest.MonkeyPatch, mode: str, branch: str, channels: int, cutoff: float
) -> None:
    monkeypatch.setenv("GSCLIP_COMPILE", mode)
    force_branch(monkeypatch, branch)
    splats = splat_tensors(B, N, channels, H, W, scale=(0.8, 4.0))
    cotangent = torch.randn(B, channels, H, W)

    ours = grads_through(rasterize_windowed_torch, *splats, H, W, cutoff, cotangent)
    twin = grads_through(rasterize_dense_torch, *splats, H, W, cutoff, cotangent)

    assert_matches_twin(ours, twin)
    # Guards against a vacuous comparison: the cutoff must actually cut something off.
    exact = rasterize_dense_torch(*splats, H, W)
    assert (ours[0] - exact).abs().max() > 1e-3


@pytest.mark.parametrize(
    "mode, channels",
    [
        pytest.param(EAGER, 1, id="eager-C1"),
        pytest.param(EAGER, 3, id="eager-C3"),
        pytest.param(COMPILED, 3, id="compiled-C3"),
    ],
)
def test_infinite_cutoff_is_dense_and_matches_twin(
    splat_tensors, monkeypatch: pytest.MonkeyPatch, mode: str, channels: int
) -> None:
    monkeypatch.setenv("GSCLIP_COMPILE", mode)
    # An untruncated splat covers the whole image, so windows cannot save anything.
    monkeypatch.setattr(windowed._WindowRender, "apply", _refuse)
    splats = splat_tensors(B, N, channels, H, W, scale=(0.8, 4.0))
    cotangent = torch.randn(B, channels, H, W)

    ours = grads_through(rasterize_windowed_torch, *splats, H, W, math.inf, cotangent)
    twin = grads_through(rasterize_dense_torch, *splats, H, W, math.inf, cotangent)

    assert_matches_twin(ours, twin)


@pytest.mark.parametrize(
    "mode, channels, cutoff",
    [
        pytest.param(EAGER, 3, 3.5, id="eager-C3-cut3.5"),
        pytest.param(EAGER, 1, 2.0, id="eager-C1-cut2"),
        pytest.param(COMPILED, 3, 3.5, id="compiled-C3-cut3.5"),
    ],
)
def test_mid_size_takes_window_branch_and_matches_twin(
    splat_tensors, monkeypatch: pytest.MonkeyPatch, mode: str, channels: int, cutoff: float
) -> None:
    monkeypatch.setenv("GSCLIP_COMPILE", mode)
    # The automatic choice is under test here: no forcing, only a trap on the dense branch.
    monkeypatch.setattr(windowed._DenseRender, "apply", _refuse)
    splats = splat_tensors(MID_B, MID_N, channels, MID_H, MID_W, scale=(0.7, 2.5))
    positions, cholesky, colours, valid = splats
    cotangent = torch.randn(MID_B, channels, MID_H, MID_W)

    # Several window classes, including the whole image for the two large splats per image.
    classes = windowed._window_classes(cholesky[valid], MID_H, MID_W, cutoff)
    assert max(MID_H, MID_W) in classes.tolist()
    assert len(torch.unique(classes)) >= 3

    ours = grads_through(rasterize_windowed_torch, *splats, MID_H, MID_W, cutoff, cotangent)
    twin = grads_through(rasterize_dense_torch, *splats, MID_H, MID_W, cutoff, cotangent)

    assert_matches_twin(ours, twin)


def test_window_classes_of_one_splat_match_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    # A class with a single member takes its own code path (padded against compile specialization).
    monkeypatch.setenv("GSCLIP_COMPILE", EAGER)
    force_branch(monkeypatch, "window")
    positions = torch.tensor([[[3.2, 17.9], [12.5, 6.1], [-1.0, 4.0], [20.0, 9.0]]]).repeat(B, 1, 1)
    cholesky = torch.tensor(
        [[[0.5, 0.1, 0.4], [1.9, -0.7, 1.1], [40.0, 5.0, 30.0], [1.0, 0.0, 1.0]]]
    ).repeat(B, 1, 1)
    colours = torch.randn(B, 4, 3)
    valid = torch.tensor(
        [[True, True, True, False], [False, True, False, False], [False, False, False, False]]
    )
    classes = windowed._window_classes(cholesky[valid], H, W, 3.5)
    assert torch.unique(classes[:3]).numel() == 3  # image 0: three classes of one splat each
    cotangent = torch.randn(B, 3, H, W)

    ours = grads_through(
        rasterize_windowed_torch, positions, cholesky, colours, valid, H, W, 3.5, cotangent
    )
    twin = grads_through(
        rasterize_dense_torch, positions, cholesky, colours, valid, H, W, 3.5, cotangent
    )

    assert_matches_twin(ours, twin)


def garbage_in_invalid_slots(
    positions: Tensor, cholesky: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Invalid slots get a zero Cholesky factor (division by zero) and NaN or infinite positions."""
    invalid = ~valid
    bad_positions = positions.clone()
    bad_positions[invalid] = torch.tensor([math.nan, math.inf])
    bad_cholesky = cholesky.clone()
    bad_cholesky[invalid] = 0.0
    return bad_positions, bad_cholesky


@pytest.fixture(params=["window", "dense"])
def eager_branch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each branch in turn, eagerly. Garbage in invalid slots never reaches the compiled functions
    (the window branch gathers valid slots only, the dense branch swaps in unit splats first), so
    the eager mode is enough for the tests that take this."""
    monkeypatch.setenv("GSCLIP_COMPILE", EAGER)
    force_branch(monkeypatch, request.param)
    return request.param


def test_garbage_in_invalid_slots_is_inert(splat_tensors, eager_branch: str) -> None:
    positions, cholesky, colours, valid = splat_tensors(B, N, 3, H, W, scale=(0.8, 4.0))
    bad_positions, bad_cholesky = garbage_in_invalid_slots(positions, cholesky, valid)
    cotangent = torch.randn(B, 3, H, W)

    clean = grads_through(
        rasterize_windowed_torch, positions, cholesky, colours, valid, H, W, 3.5, cotangent
    )
    image, g_pos, g_chol, g_col = grads_through(
        rasterize_windowed_torch, bad_positions, bad_cholesky, colours, valid, H, W, 3.5, cotangent
    )

    assert torch.isfinite(image).all()
    torch.testing.assert_close(image, clean[0], rtol=0.0, atol=0.0)
    invalid = ~valid
    names = ["positions", "cholesky", "colours"]
    for name, grad, clean_grad in zip(names, (g_pos, g_chol, g_col), clean[1:]):
        assert torch.isfinite(grad).all(), name
        assert (grad[invalid] == 0).all(), name
        torch.testing.assert_close(grad, clean_grad, rtol=0.0, atol=0.0)


def test_nan_colour_in_invalid_slot_is_inert(splat_tensors, eager_branch: str) -> None:
    positions, cholesky, colours, valid = splat_tensors(B, N, 3, H, W, scale=(0.8, 4.0))
    bad_colours = colours.clone()
    bad_colours[~valid] = math.nan

    image = rasterize_windowed_torch(positions, cholesky, bad_colours, valid, H, W, 3.5)
    twin = rasterize_dense_torch(positions, cholesky, bad_colours, valid, H, W, 3.5)

    assert torch.isfinite(image).all() and torch.isfinite(twin).all()
    torch.testing.assert_close(image, twin, rtol=1e-4, atol=1e-5)


# An infinite cutoff always takes the dense branch.
@pytest.mark.parametrize("branch, cutoff", [("window", 3.5), ("dense", 3.5), ("dense", math.inf)])
def test_image_without_valid_splats_is_exactly_zero(
    splat_tensors, monkeypatch: pytest.MonkeyPatch, branch: str, cutoff: float
) -> None:
    monkeypatch.setenv("GSCLIP_COMPILE", EAGER)
    force_branch(monkeypatch, branch)
    positions, cholesky, colours, valid = splat_tensors(B, N, 3, H, W, scale=(0.8, 4.0))
    valid[1] = False  # image 1 of the batch has no valid splat; the others keep theirs
    bad_positions, bad_cholesky = garbage_in_invalid_slots(positions, cholesky, valid)

    image = rasterize_windowed_torch(bad_positions, bad_cholesky, colours, valid, H, W, cutoff)
    assert torch.equal(image[1], torch.zeros(3, H, W))
    assert image[0].abs().max() > 0.1

    # A batch without any valid splat at all: black, and gradients reach every input as zeros.
    leaves = [t.clone().requires_grad_() for t in (bad_positions, bad_cholesky, colours)]
    nothing = torch.zeros_like(valid)
    image = rasterize_windowed_torch(*leaves, nothing, H, W, cutoff)
    assert torch.equal(image, torch.zeros(B, 3, H, W))
    grads = torch.autograd.grad(image, leaves, torch.randn_like(image), allow_unused=True)
    for grad in grads:
        assert grad is None or torch.equal(grad, torch.zeros_like(grad))


def astronaut_splats(size: int = 64, cell: int = 4, sigma: float = 2.0):
    """One isotropic splat per cell of a real photograph, coloured so they tile its cell means."""
    from skimage import data
    from skimage.transform import resize

    photo = resize(data.astronaut(), (size, size), anti_aliasing=True)  # [H, W, 3] floats in [0, 1]
    cells = size // cell
    cell_means = photo.reshape(cells, cell, cells, cell, 3).mean(axis=(1, 3))  # [rows, cols, 3]
    # A Gaussian of peak 1 integrates to 2 pi sigma^2; a cell has cell^2 pixels.
    gain = cell * cell / (2.0 * math.pi * sigma * sigma)
    rows, cols = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    positions = np.stack([cols, rows], -1).reshape(1, -1, 2) * cell + cell / 2.0  # (x, y)
    colours = cell_means.reshape(1, -1, 3) * gain
    n = cells * cells
    cholesky = torch.tensor([sigma, 0.0, sigma]).expand(1, n, 3).contiguous()
    return (
        torch.tensor(positions, dtype=torch.float32),
        cholesky,
        torch.tensor(colours, dtype=torch.float32),
        torch.ones(1, n, dtype=torch.bool),
    )


def test_cutoff_error_on_a_photograph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GSCLIP_COMPILE", EAGER)
    monkeypatch.setattr(windowed._DenseRender, "apply", _refuse)  # 256 splats of R=8: windows
    splats = astronaut_splats()
    exact = rasterize_dense_torch(*splats, 64, 64)  # cutoff = inf: the untruncated sum

    error_35 = (rasterize_windowed_torch(*splats, 64, 64, cutoff=3.5) - exact).abs().max().item()
    error_45 = (rasterize_windowed_torch(*splats, 64, 64, cutoff=4.5) - exact).abs().max().item()

    # Measured: 2.53e-3 at cutoff 3.5 and 3.99e-5 at 4.5 (mean abs errors 7.7e-4 and 1.3e-5; the
    # image peaks at 0.90). A pixel misses the tails of every splat more than 3.5 sigma = 7 px away;
    # on a lattice of spacing 2 sigma those weights sum to about 2 pi exp(-3.5^2 / 2) / 4 = 3.4e-3,
    # times a splat colour of ~0.64 cell mean. Deterministic: no random draw.
    assert error_35 < 3e-3
    assert error_45 < 6e-5
    assert error_45 < error_35 / 10


def test_window_radius_covers_cutoff_ellipse() -> None:
    cutoff = 3.5
    count = 400
    positions = torch.rand(count, 2) * 10.0 - 5.0  # centres anywhere in their pixel, either sign
    l11 = 0.2 + 3.0 * torch.rand(count)
    l22 = 0.2 + 3.0 * torch.rand(count)
    l21 = 6.0 * torch.rand(count) - 3.0
    signs = torch.where(torch.rand(count, 3) < 0.2, -1.0, 1.0)  # a few negative diagonals too
    cholesky = torch.stack([l11, l21, l22], -1) * signs
    radius = window_radius_needed(cholesky, cutoff)  # [count]

    # Pixel centres of a grid large enough to hold every ellipse.
    grid_x, grid_y = pixel_centres(60, 60, positions)
    grid_x, grid_y = grid_x - 30.0, grid_y - 30.0  # pixels -30 .. 29 on both axes
    dx = grid_x[None] - positions[:, 0, None, None]
    dy = grid_y[None] - positions[:, 1, None, None]
    d_sq = mahalanobis_sq(dx, dy, cholesky[:, None, None, :])  # [count, 60, 60]
    inside = d_sq <= cutoff * cutoff

    centre = torch.floor(positions)  # the pixel holding the splat's centre
    col_offset = (torch.floor(grid_x)[None] - centre[:, 0, None, None]).abs()
    row_offset = (torch.floor(grid_y)[None] - centre[:, 1, None, None]).abs()
    in_window = (col_offset <= radius[:, None, None]) & (row_offset <= radius[:, None, None])
    assert inside.sum() > count  # the ellipses do cover pixels
    assert not (inside & ~in_window).any(), "a pixel within the cutoff lies outside its window"
    # Not vacuous: the window is at most a pixel and a half wider than the ellipse's bounding box.
    half_extent = cutoff * torch.maximum(cholesky[:, 0].abs(), cholesky[:, 1:].norm(dim=-1))
    assert (radius <= half_extent + 1.5).all()
