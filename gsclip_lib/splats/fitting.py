"""Batched splat fitting: one optimizer over all images of a batch (METHOD.md section 1).

Loss of a batch = sum over images of [ MSE(render, image) + lambda * ||colours||_1 ], with the L1
norm over the image's valid splats (the paper's lambda is about 1e-6). Summing rather than averaging
over images keeps each image's gradient independent of the batch size; Adam is per-element, so
every image follows the same trajectory it would follow alone, and one launch serves the batch.

Three things make the fit converge in far fewer steps than Adam alone (measured against it in
``benchmarks/fitting_old_vs_new.json``):

- **Least-squares colours** (:mod:`gsclip_lib.splats.least_squares`): the render is linear in the
  colours, so for the current geometry the best colours are a solve away. ``colour_solve`` says
  when: ``none`` (Adam on everything), ``sparse`` (solved at the start, after every re-seeding and at
  the end; Adam moves the colours in between) or ``periodic`` (solved before every ``solve_every``-th
  step and at the end; with ``solve_every: 1`` Adam moves only the geometry, otherwise it moves the
  colours between solves too). A solve costs several render passes (``least_squares``), so
  ``solve_every`` and ``cg_iterations`` set most of a step's cost; ``benchmarks/fit_schedule.py``
  measures PSNR against passes for each choice.
- **Error-guided re-seeding** (:func:`reseed_dead_splats`): every ``reseed_every`` steps during the
  first ``reseed_until`` of the fit, splats that carry almost no energy move to the pixels where the
  error is largest.
- **The C++ rasterizer** on the CPU (``backend`` ``auto`` or ``cpu``), about 10x faster per step than
  the compiled PyTorch path.

After each step the Cholesky diagonal is kept at or above ``min_scale`` pixels: a splat narrower
than a fraction of a pixel falls between pixel centres, and its gradient vanishes.

An image whose loss, or whose splats, turn NaN or inf is reported, put back to its initial splats
with its Adam moments zeroed (Adam's step count is the batch's and runs on) and refitted; after ``max_retries`` such restarts it is dropped (all its
splats invalid, PSNR NaN) and listed in ``FitResult.dropped``. It is never silently kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gsclip_lib.params import FitSettings
from gsclip_lib.progress import progress_bar, report
from gsclip_lib.splats.container import Splats, check_images, check_same_batch, check_splat_count
from gsclip_lib.splats.initialization import initialize_splats
from gsclip_lib.splats.least_squares import solve_colours
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import RenderPasses, render_splats

RESEED_SUPPRESSION = 2  # pixels around a chosen error peak that no other re-seeded splat may take
HISTORY_COLUMNS = ("iteration", "seconds", "cpu_seconds", "loss", "psnr", "forward_passes", "backward_passes",
                   "adjoint_passes")


@dataclass
class FitResult:
    splats: Splats  # detached; dropped images have no valid splat
    psnr: Tensor  # [B] dB of the clamped render; NaN for dropped images
    seconds: float  # wall time of the optimization
    iterations: int
    retried: list[int] = field(default_factory=list)  # images restarted after a non-finite loss
    dropped: list[int] = field(default_factory=list)  # images given up on
    reseeded: int = 0  # splats moved by re-seeding, over the whole fit
    # iteration, seconds (wall), cpu_seconds (this process's CPU time), loss, psnr (means over images),
    # and the render passes run so far: forward_passes, backward_passes, adjoint_passes
    history: dict[str, list[float]] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)  # RenderPasses of the whole fit, final solve included

    @property
    def kept(self) -> Tensor:  # [B] bool
        kept = torch.ones(self.psnr.shape[0], dtype=torch.bool)
        kept[self.dropped] = False
        return kept


def fit_loss_per_image(
    rendered: Tensor,  # [B, C, H, W]
    images: Tensor,  # [B, C, H, W]
    colours: Tensor,  # [B, N, C]
    valid: Tensor,  # [B, N]
    colour_l1: float,
) -> Tensor:  # [B]
    mse = (rendered - images).square().flatten(1).mean(1)
    l1 = (colours.abs() * valid[..., None]).flatten(1).sum(1)
    return mse + colour_l1 * l1


def reseed_dead_splats(
    splats: Splats,  # modified in place: positions, cholesky and colours of the moved splats
    residual: Tensor,  # [B, C, H, W] render - image
    fraction: float,  # at most this share of an image's splats moves
    energy_floor: float,  # a splat is dead when its energy is below this times the image's median
) -> Tensor:  # [B, N] bool: the splats that moved
    """Move splats that carry almost no energy to the pixels where the error is largest.

    The energy of a splat is ``|colour| l11 l22`` (its colour times its area, up to 2 pi). Per image,
    at most ``fraction * N`` splats below ``energy_floor`` times the image's median move, the weakest
    first, one each to the largest peaks of the 3x3-smoothed squared residual (picked greedily, each
    pick masking the 5x5 pixels around it), with a one-pixel isotropic footprint and colour zero: the
    next colour solve, or Adam, gives them their colour.
    """
    positions, cholesky, colours, valid = splats.positions, splats.cholesky, splats.colours, splats.valid
    batch, num, _ = positions.shape
    height, width = residual.shape[-2:]
    budget = max(1, int(fraction * num))
    energy = colours.abs().sum(-1) * (cholesky[..., 0] * cholesky[..., 2]).abs()
    energy = torch.where(valid, energy, torch.full_like(energy, math.inf))
    median = energy.masked_fill(~valid, math.nan).nanmedian(dim=1).values  # [B]
    dead = energy < energy_floor * median[:, None]
    weakest = energy.masked_fill(~dead, math.inf).argsort(dim=1, stable=True)[:, :budget]  # [B, budget]
    moving = torch.gather(dead, 1, weakest)  # [B, budget]: which of the weakest are really dead
    squared = residual.square().sum(1, keepdim=True)  # [B, 1, H, W]
    # Smoothed, so that a peak is a patch of error rather than one noisy pixel; a pixel's own error
    # breaks the ties a lone error spike leaves between its neighbours.
    error = F.avg_pool2d(squared, 3, 1, 1, count_include_pad=False) + 1e-6 * squared
    rows_index = torch.arange(height, device=residual.device)[None, :, None]
    cols_index = torch.arange(width, device=residual.device)[None, None, :]
    peaks = []
    for _ in range(budget):
        peak = error.flatten(1).argmax(1)  # [B]
        peaks.append(peak)
        near = ((rows_index - (peak // width)[:, None, None]).abs() <= RESEED_SUPPRESSION) & (
            (cols_index - (peak % width)[:, None, None]).abs() <= RESEED_SUPPRESSION)
        error = error.masked_fill(near[:, None], -1.0)
    peaks = torch.stack(peaks, 1)  # [B, budget]
    targets = torch.stack([(peaks % width).to(positions.dtype) + 0.5, (peaks // width).to(positions.dtype) + 0.5], -1)
    image_index = torch.arange(batch, device=positions.device)[:, None].expand_as(weakest)[moving]
    slot_index = weakest[moving]
    positions[image_index, slot_index] = targets[moving]
    cholesky[image_index, slot_index] = torch.tensor([1.0, 0.0, 1.0], dtype=cholesky.dtype, device=cholesky.device)
    colours[image_index, slot_index] = 0.0
    moved = torch.zeros_like(valid)
    moved[image_index, slot_index] = True
    return moved


def fit_splats(
    images: Tensor,  # [B, C, H, W] floats in [0, 1]
    num_splats: int,
    settings: FitSettings,
    *,
    initial: Splats | None = None,  # start here instead of settings.init (e.g. after pruning)
    progress: bool = True,
    description: str = "fit",
) -> FitResult:
    """Fit ``num_splats`` splats to each image of the batch for ``settings.iterations`` steps
    (see the module docstring); images that turn non-finite are restarted, then dropped."""
    check_images(images)
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()  # half precision cannot hold the fit's small steps: fit in fp32
    _, _, height, width = images.shape
    if initial is None:
        check_splat_count(num_splats, height, width)
        initial = initialize_splats(images, num_splats, settings.init, settings.seed)
    else:
        check_same_batch(initial, images)
    fit = _BatchFit(images, initial.detach().to(images.dtype), settings, description)
    bar = progress_bar(range(settings.iterations), desc=description, disable=not progress)
    for iteration in bar:
        fit.step(iteration)
        if iteration % settings.log_every == 0 or iteration == settings.iterations - 1:
            bar.set_postfix(psnr=f"{fit.log(iteration):.2f}")
    if settings.colour_solve != "none":
        fit.solve()  # the best colours of the last geometry (with 0 steps: of the start)
    return fit.result()


class _BatchFit:
    """The state of one :func:`fit_splats` call: the splat parameters of the whole batch, their Adam
    optimizer, which images are still fitted, and what happened to the others."""

    def __init__(self, images: Tensor, initial: Splats, settings: FitSettings, description: str) -> None:
        self.images, self.initial, self.settings, self.description = images, initial, settings, description
        self.height, self.width = images.shape[-2:]
        self.valid = initial.valid
        self.solve_every_step = settings.colour_solve == "periodic" and settings.solve_every == 1
        self.positions, self.cholesky = (t.clone().requires_grad_(True) for t in (initial.positions, initial.cholesky))
        self.colours = initial.colours.clone().requires_grad_(not self.solve_every_step)
        self.params = [self.positions, self.cholesky, self.colours]
        groups = [{"params": [self.positions], "lr": settings.lr_positions},
                  {"params": [self.cholesky], "lr": settings.lr_cholesky}]
        if not self.solve_every_step:  # colours solved at every step take no Adam step
            groups.append({"params": [self.colours], "lr": settings.lr_colours})
        self.optimizer = torch.optim.Adam(groups)
        batch = images.shape[0]
        self.alive = torch.ones(batch, dtype=torch.bool, device=images.device)
        self.restarts = torch.zeros(batch, dtype=torch.int64)
        self.retried: list[int] = []
        self.dropped: list[int] = []
        self.reseeded = 0
        self.reseed_until = int(settings.reseed_until * settings.iterations)
        self.history: dict[str, list[float]] = {name: [] for name in HISTORY_COLUMNS}
        self.passes = RenderPasses()
        self.last: tuple[Tensor, Tensor, Tensor] | None = None  # the latest step's render, losses, healthy images
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def current(self) -> Splats:
        return Splats(self.positions, self.cholesky, self.colours, self.valid & self.alive[:, None])

    def render(self) -> Tensor:  # [B, C, H, W]
        settings = self.settings
        return render_splats(self.current(), self.height, self.width, backend=settings.backend, cutoff=settings.cutoff,
                             passes=self.passes)

    def losses(self, rendered: Tensor) -> Tensor:  # [B]
        return fit_loss_per_image(rendered, self.images, self.colours, self.valid, self.settings.colour_l1)

    def solve(self) -> None:
        """The best colours of the current geometry (least squares), written into the parameters."""
        settings = self.settings
        with torch.no_grad():
            self.colours.copy_(solve_colours(self.current().detach(), self.images, ridge=settings.ridge,
                                             cutoff=settings.cutoff, backend=settings.backend,
                                             cg_iterations=settings.cg_iterations, passes=self.passes))

    def drop(self, image: int, why: str) -> None:
        self.alive[image] = False
        self.dropped.append(image)
        report(f"{self.description}: image {image} dropped, {why}")

    def restart_or_drop(self, bad: Tensor, what: str) -> None:  # bad: [B] bool
        """Put the ``bad`` images back to their start, or drop those restarted too often."""
        _restart_images(bad.nonzero().flatten(), self.params, self.initial, self.optimizer)
        for image in bad.nonzero().flatten().tolist():
            self.restarts[image] += 1
            if self.restarts[image] > self.settings.max_retries:
                self.drop(image, f"{what} again")
            else:
                self.retried.append(image)
                report(f"{self.description}: image {image} restarted, {what}")

    def handle_broken_splats(self) -> None:
        """Splats that left the finite numbers are handled before the render, which refuses them
        rather than drop them silently; a start that is itself broken is dropped at once."""
        broken = self.alive & ~_finite_splats(self.positions, self.cholesky, self.colours, self.valid)
        if bool(broken.any()):
            self.restart_or_drop(broken, "its splats became non-finite")
            unusable = self.alive & ~_finite_splats(self.positions, self.cholesky, self.colours, self.valid)
            for image in unusable.nonzero().flatten().tolist():
                self.drop(image, "its starting splats are non-finite")

    def step(self, iteration: int) -> None:
        """One optimizer step over the healthy images, then the scale floor and any re-seeding."""
        settings = self.settings
        self.handle_broken_splats()
        if settings.colour_solve == "periodic" and iteration % settings.solve_every == 0:
            self.solve()
        elif settings.colour_solve == "sparse" and iteration == 0:
            self.solve()
        rendered = self.render()
        losses = self.losses(rendered)
        bad = self.alive & ~torch.isfinite(losses)
        if bool(bad.any()):
            self.restart_or_drop(bad, "loss non-finite")
            rendered = self.render()  # the restart rewrote the parameters in place: evaluate them afresh
            losses = self.losses(rendered)
        healthy = self.alive & torch.isfinite(losses)
        self.optimizer.zero_grad(set_to_none=True)
        if bool(healthy.any()):
            losses[healthy].sum().backward()
            self.optimizer.step()
        with torch.no_grad():
            torch.clamp_(self.cholesky[..., 0], min=settings.min_scale)
            torch.clamp_(self.cholesky[..., 2], min=settings.min_scale)
            if settings.reseed_every and 0 < iteration < self.reseed_until and iteration % settings.reseed_every == 0:
                self.reseed(rendered.detach())
        self.last = (rendered, losses, healthy)

    def reseed(self, rendered: Tensor) -> None:  # rendered [B, C, H, W], before this step's update
        settings = self.settings
        moved = reseed_dead_splats(self.current(), rendered - self.images, settings.reseed_fraction,
                                   settings.reseed_energy)
        self.reseeded += int(moved.sum())
        _clear_moments(self.optimizer, self.params, moved)
        if settings.colour_solve == "sparse":
            self.solve()

    def log(self, iteration: int) -> float:
        """Record the latest step in the history; its mean PSNR over the healthy images."""
        rendered, losses, healthy = self.last
        with torch.no_grad():
            quality = psnr(self.images[healthy], rendered[healthy].detach())
        history = self.history
        history["iteration"].append(iteration)
        history["seconds"].append(time.perf_counter() - self.start)
        history["cpu_seconds"].append(time.process_time() - self.cpu_start)
        history["loss"].append(float(losses.detach()[healthy].mean()) if bool(healthy.any()) else float("nan"))
        history["psnr"].append(float(quality.mean()) if quality.numel() else float("nan"))
        for kind, count in self.passes.as_dict().items():
            history[f"{kind}_passes"].append(count)
        return history["psnr"][-1]

    def result(self) -> FitResult:
        seconds = time.perf_counter() - self.start
        settings = self.settings
        with torch.no_grad():
            final = Splats(self.positions.detach(), self.cholesky.detach(), self.colours.detach(),
                           self.valid & self.alive[:, None])
            quality = psnr(self.images, render_splats(final, self.height, self.width, backend=settings.backend,
                                                      cutoff=settings.cutoff))
            quality[~self.alive] = float("nan")
        return FitResult(
            splats=final,
            psnr=quality.cpu(),
            seconds=seconds,
            iterations=settings.iterations,
            retried=sorted(set(self.retried)),
            dropped=sorted(self.dropped),
            reseeded=self.reseeded,
            history=self.history,
            passes=self.passes.as_dict(),
        )


def _finite_splats(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor) -> Tensor:  # [B] bool
    """Whether each image's valid splats hold only finite numbers."""
    with torch.no_grad():
        finite = torch.cat([positions, cholesky, colours], -1).isfinite().all(-1) | ~valid
    return finite.all(-1)


def _clear_moments(optimizer: torch.optim.Optimizer, params: list[Tensor], moved: Tensor) -> None:
    """Zero Adam's moments of the splats in ``moved`` [B, N], so no momentum from where they were
    carries over. Adam's step count belongs to the whole tensor and is not reset, so a moved splat's
    first update is not a fresh optimizer's (its bias correction is the fit's, not step 1's)."""
    for param in params:
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][moved] = 0


def _restart_images(
    images: Tensor,  # [k] indices into the batch
    params: list[Tensor],
    initial: Splats,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Put the given images back to their initial splats and zero their Adam moments (the step
    count, shared by the batch, runs on)."""
    with torch.no_grad():
        for param, start in zip(params, (initial.positions, initial.cholesky, initial.colours)):
            param[images] = start[images]
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][images] = 0
