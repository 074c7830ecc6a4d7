"""Least-squares colours against a dense oracle, and error-guided re-seeding.

The oracle is ``torch.linalg.solve`` on the normal equations built from the twin's weight matrix in
float64; both solvers (batched Cholesky for small images, matrix-free conjugate gradients for large)
must reach it, on every backend that serves as ``W`` and ``W^T``.
"""

from __future__ import annotations

import pytest
import torch

from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import reseed_dead_splats
from gsclip_lib.splats.least_squares import solve_colours, solved_densely, splat_weight_norms
from gsclip_lib.splats.render import RenderPasses, render_splats
from kernels.rasterize_cpu import cpu_kernel_available
from kernels.rasterize_torch import splat_weights_dense

CUTOFF = 3.5
RIDGE = 1e-4
BACKENDS = ["windowed", pytest.param("cpu", marks=pytest.mark.skipif(not cpu_kernel_available(), reason="no C++ compiler"))]


def oracle_colours(splats: Splats, images: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:  # [B, N, C]
    """The ridge least-squares colours, written out densely in float64 (invalid splats: zero)."""
    height, width = images.shape[-2:]
    weights = splat_weights_dense(splats.positions, splats.cholesky, splats.valid, height, width, CUTOFF)
    weights = weights.flatten(2).double()  # [B, N, P]
    answers = []
    for image in range(images.shape[0]):
        keep = splats.valid[image]
        w = weights[image, keep]  # [n, P]
        gram = w @ w.T
        shift = ridge * gram.diagonal().mean()
        solved = torch.linalg.solve(gram + shift * torch.eye(len(gram), dtype=gram.dtype),
                                    w @ images[image].flatten(1).T.double())
        full = torch.zeros(splats.num_slots, images.shape[1], dtype=torch.float64)
        full[keep] = solved
        answers.append(full)
    return torch.stack(answers).float()


def covering_splats(batch: int, side: int, per_row: int, channels: int, invalid_slot: bool = True) -> Splats:
    """A jittered grid of splats that covers a ``side x side`` image, one slot invalid per image."""
    generator = torch.Generator().manual_seed(1)
    step = side / per_row
    centres = (torch.arange(per_row) + 0.5) * step
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    base = torch.stack([grid_x.flatten(), grid_y.flatten()], -1)  # [N, 2]
    count = base.shape[0]
    positions = base[None] + (torch.rand(batch, count, 2, generator=generator) - 0.5) * step * 0.5
    scale = step * (0.5 + 0.3 * torch.rand(batch, count, 2, generator=generator))
    shear = (torch.rand(batch, count, generator=generator) - 0.5) * step * 0.4
    cholesky = torch.stack([scale[..., 0], shear, scale[..., 1]], -1)
    colours = torch.rand(batch, count, channels, generator=generator)
    valid = torch.ones(batch, count, dtype=torch.bool)
    if invalid_slot:
        valid[:, 3] = False
    return Splats(positions, cholesky, colours, valid)


def test_small_images_are_solved_exactly():
    images = torch.rand(3, 2, 20, 18)
    splats = covering_splats(3, 20, 5, 2)
    assert solved_densely(splats.num_slots, 20, 18)
    colours = solve_colours(splats, images, ridge=RIDGE, cutoff=CUTOFF, backend="dense", cg_iterations=1)
    torch.testing.assert_close(colours, oracle_colours(splats, images), rtol=1e-4, atol=1e-4)
    assert torch.all(colours[:, 3] == 0), "an invalid splat got a colour"


@pytest.mark.parametrize("backend", BACKENDS)
def test_conjugate_gradients_reach_the_solution_on_large_images(backend):
    side = 48
    images = torch.rand(2, 3, side, side)
    splats = covering_splats(2, side, 9, 3)
    assert not solved_densely(splats.num_slots, side, side), "this test is about the iterative solver"
    start = splats.with_valid(splats.valid)  # colours to warm-start from: random
    oracle = oracle_colours(splats, images)
    few = solve_colours(start, images, ridge=RIDGE, cutoff=CUTOFF, backend=backend, cg_iterations=3)
    many = solve_colours(start, images, ridge=RIDGE, cutoff=CUTOFF, backend=backend, cg_iterations=60)
    error_start = (start.colours * start.valid[..., None] - oracle).norm()
    error_few, error_many = (few - oracle).norm(), (many - oracle).norm()
    assert error_few < 0.7 * error_start, "three warm-started steps should already reduce the error"
    assert error_many < 5e-3 * oracle.norm()  # measured 1.7e-3: fp32 CG on a ridge of 1e-4
    assert torch.all(many[:, 3] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_solved_colours_minimize_the_squared_error(backend):
    images = torch.rand(2, 1, 24, 24)
    splats = covering_splats(2, 24, 6, 1)
    best = splats.with_valid(splats.valid)
    best = Splats(best.positions, best.cholesky,
                  solve_colours(splats, images, ridge=1e-8, cutoff=CUTOFF, backend=backend, cg_iterations=1),
                  best.valid)

    def error(candidate: Splats) -> torch.Tensor:
        return (render_splats(candidate, 24, 24, backend=backend, cutoff=CUTOFF) - images).square().sum()

    optimum = error(best)
    for _ in range(5):
        nudged = Splats(best.positions, best.cholesky, best.colours + 0.01 * torch.randn_like(best.colours), best.valid)
        assert error(nudged) > optimum


@pytest.mark.parametrize("backend", BACKENDS + ["dense"])
def test_weight_norms_are_the_diagonal_of_the_normal_equations(backend):
    splats = covering_splats(2, 30, 5, 1)
    weights = splat_weights_dense(splats.positions, splats.cholesky, splats.valid, 30, 30, CUTOFF)
    expected = weights.square().flatten(2).sum(-1)
    torch.testing.assert_close(splat_weight_norms(splats, 30, 30, CUTOFF, backend), expected, rtol=1e-4, atol=1e-5)


def test_reseeding_moves_only_dead_splats_to_the_largest_errors():
    splats = covering_splats(2, 28, 4, 1, invalid_slot=False)  # 16 splats per image
    colours = splats.colours.clone().fill_(0.5)
    colours[0, [2, 7]] = 1e-4  # two dead splats in image 0, none in image 1
    splats = Splats(splats.positions.clone(), splats.cholesky.clone(), colours, splats.valid)
    before = splats.detach()
    before = Splats(before.positions.clone(), before.cholesky.clone(), before.colours.clone(), before.valid)
    residual = torch.zeros(2, 1, 28, 28)
    residual[0, 0, 20, 5] = 3.0  # the largest error
    residual[0, 0, 4, 24] = 2.0  # the second, far from the first
    residual[1, 0, 10, 10] = 5.0
    moved = reseed_dead_splats(splats, residual, fraction=0.25, energy_floor=0.2)
    assert moved[0].nonzero().flatten().tolist() == [2, 7]
    assert not moved[1].any(), "an image without dead splats must keep its splats"
    targets = {tuple(p) for p in splats.positions[0, [2, 7]].tolist()}
    assert targets == {(5.5, 20.5), (24.5, 4.5)}, "each dead splat goes to one error peak, pixel centre"
    assert torch.all(splats.colours[0, [2, 7]] == 0)
    assert torch.equal(splats.cholesky[0, 2], torch.tensor([1.0, 0.0, 1.0]))
    untouched = ~moved
    assert torch.equal(splats.positions[untouched], before.positions[untouched])
    assert torch.equal(splats.colours[untouched], before.colours[untouched])


def test_reseeding_moves_at_most_its_share():
    splats = covering_splats(1, 28, 4, 1, invalid_slot=False)
    colours = torch.full_like(splats.colours, 1.0)
    colours[0, 10:] = 1e-5  # six dead splats; "dead" is relative to the image's median energy
    splats = Splats(splats.positions.clone(), splats.cholesky.clone(), colours, splats.valid)
    moved = reseed_dead_splats(splats, torch.rand(1, 1, 28, 28), fraction=0.125, energy_floor=0.2)
    assert int(moved.sum()) == 2 and not bool(moved[0, :10].any())


@pytest.mark.skipif(not cpu_kernel_available(), reason="the reference is the C++ kernel's solve")
@pytest.mark.parametrize("backend", ["triton", "triton_tiled"])
def test_the_gpu_backends_solve_with_the_triton_adjoint(backend):
    # Their W^T is the tile-culled Triton adjoint kernel (the interpreter runs it here), not a render's
    # full backward: the passes say so, and the colours are the C++ kernel's solve.
    side = 40
    images = torch.rand(1, 3, side, side)
    splats = covering_splats(1, side, 8, 3)
    assert not solved_densely(splats.num_slots, side, side)
    passes, reference = RenderPasses(), RenderPasses()
    got = solve_colours(splats, images, ridge=RIDGE, cutoff=CUTOFF, backend=backend, cg_iterations=2, passes=passes)
    expected = solve_colours(splats, images, ridge=RIDGE, cutoff=CUTOFF, backend="cpu", cg_iterations=2,
                             passes=reference)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # one (render, adjoint) product for the start's residual (the adjoint pass also gives the norms)
    # and one for each of the 2 iterations
    assert passes.as_dict() == reference.as_dict() == {"forward": 3, "backward": 0, "adjoint": 3}


def test_the_solve_checks_the_geometry_once(monkeypatch):
    from gsclip_lib.splats import least_squares, render

    calls = {"solve": 0, "render": 0}
    real = render.check_renderable

    def counted(where):
        def check(splats):
            calls[where] += 1
            return real(splats)
        return check

    monkeypatch.setattr(least_squares, "check_renderable", counted("solve"))
    monkeypatch.setattr(render, "check_renderable", counted("render"))
    splats = covering_splats(2, 48, 9, 3)
    solve_colours(splats, torch.rand(2, 3, 48, 48), ridge=RIDGE, cutoff=CUTOFF, backend="windowed", cg_iterations=3)
    assert calls == {"solve": 1, "render": 0}, "the products of the solve must not check (a host sync) again"
