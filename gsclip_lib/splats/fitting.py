"""Batched splat fitting: one optimizer over all images of a batch (METHOD.md section 1).

Loss of a batch = sum over images of [ MSE(render, image) + lambda * ||colours||_1 ], with the L1
norm over the image's valid splats (the paper's lambda is about 1e-6). Summing rather than averaging
over images keeps each image's gradient independent of the batch size; Adam is per-element, so
every image follows the same trajectory it would follow alone, and one launch serves the batch.

After each step the Cholesky diagonal is kept at or above ``min_scale`` pixels: a splat narrower
than a fraction of a pixel falls between pixel centres, and its gradient vanishes.

An image whose loss turns NaN or inf is reported, put back to its initial splats with fresh
optimizer state and refitted; after ``max_retries`` such restarts it is dropped (all its splats
invalid, PSNR NaN) and listed in ``FitResult.dropped``. It is never silently kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from gsclip_lib.params import FitSettings
from gsclip_lib.progress import progress_bar, report
from gsclip_lib.splats.container import Splats, check_images, check_same_batch, check_splat_count
from gsclip_lib.splats.initialization import initialize_splats
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats


@dataclass
class FitResult:
    splats: Splats  # detached; dropped images have no valid splat
    psnr: Tensor  # [B] dB of the clamped render; NaN for dropped images
    seconds: float  # wall time of the optimization
    iterations: int
    retried: list[int] = field(default_factory=list)  # images restarted after a non-finite loss
    dropped: list[int] = field(default_factory=list)  # images given up on
    history: dict[str, list[float]] = field(default_factory=dict)  # iteration, loss, psnr (means)

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


def fit_splats(
    images: Tensor,  # [B, C, H, W] floats in [0, 1]
    num_splats: int,
    settings: FitSettings,
    *,
    initial: Splats | None = None,  # start here instead of settings.init (e.g. after pruning)
    progress: bool = True,
    description: str = "fit",
) -> FitResult:
    check_images(images)
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()  # half precision cannot hold the fit's small steps: fit in fp32
    _, _, height, width = images.shape
    if initial is None:
        check_splat_count(num_splats, height, width)
        initial = initialize_splats(images, num_splats, settings.init, settings.seed)
    else:
        check_same_batch(initial, images)
    initial = initial.detach().to(images.dtype)
    valid = initial.valid
    params = [t.clone().requires_grad_(True) for t in (initial.positions, initial.cholesky, initial.colours)]
    positions, cholesky, colours = params
    optimizer = torch.optim.Adam(
        [
            {"params": [positions], "lr": settings.lr_positions},
            {"params": [cholesky], "lr": settings.lr_cholesky},
            {"params": [colours], "lr": settings.lr_colours},
        ]
    )
    batch = images.shape[0]
    alive = torch.ones(batch, dtype=torch.bool, device=images.device)
    restarts = torch.zeros(batch, dtype=torch.int64)
    retried: list[int] = []
    dropped: list[int] = []
    history: dict[str, list[float]] = {"iteration": [], "loss": [], "psnr": []}

    def render() -> Tensor:
        current = Splats(positions, cholesky, colours, valid & alive[:, None])
        return render_splats(current, height, width, backend=settings.backend, cutoff=settings.cutoff)

    start = time.perf_counter()
    bar = progress_bar(range(settings.iterations), desc=description, disable=not progress)
    def restart_or_drop(bad: Tensor, what: str) -> None:  # bad: [B] bool
        """Put the ``bad`` images back to their start, or drop those restarted too often."""
        _restart_images(bad.nonzero().flatten(), params, initial, optimizer)
        for image in bad.nonzero().flatten().tolist():
            restarts[image] += 1
            if restarts[image] > settings.max_retries:
                alive[image] = False
                dropped.append(image)
                report(f"{description}: image {image} dropped, {what} again")
            else:
                retried.append(image)
                report(f"{description}: image {image} restarted, {what}")

    for iteration in bar:
        # Splats that left the finite numbers are handled before the render, which refuses them
        # rather than drop them silently; a start that is itself broken is dropped at once.
        broken = alive & ~_finite_splats(positions, cholesky, colours, valid)
        if bool(broken.any()):
            restart_or_drop(broken, "its splats became non-finite")
            unusable = alive & ~_finite_splats(positions, cholesky, colours, valid)
            for image in unusable.nonzero().flatten().tolist():
                alive[image] = False
                dropped.append(image)
                report(f"{description}: image {image} dropped, its starting splats are non-finite")
        rendered = render()
        losses = fit_loss_per_image(rendered, images, colours, valid, settings.colour_l1)
        bad = alive & ~torch.isfinite(losses)
        if bool(bad.any()):
            restart_or_drop(bad, "loss non-finite")
            # The restart rewrote the parameters in place: evaluate them afresh.
            rendered = render()
            losses = fit_loss_per_image(rendered, images, colours, valid, settings.colour_l1)
        healthy = alive & torch.isfinite(losses)
        optimizer.zero_grad(set_to_none=True)
        if bool(healthy.any()):
            losses[healthy].sum().backward()
            optimizer.step()
        with torch.no_grad():
            torch.clamp_(cholesky[..., 0], min=settings.min_scale)
            torch.clamp_(cholesky[..., 2], min=settings.min_scale)
        if iteration % settings.log_every == 0 or iteration == settings.iterations - 1:
            with torch.no_grad():
                quality = psnr(images[healthy], rendered[healthy].detach())
            history["iteration"].append(iteration)
            history["loss"].append(float(losses.detach()[healthy].mean()) if bool(healthy.any()) else float("nan"))
            history["psnr"].append(float(quality.mean()) if quality.numel() else float("nan"))
            bar.set_postfix(psnr=f"{history['psnr'][-1]:.2f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        final = Splats(positions.detach(), cholesky.detach(), colours.detach(), valid & alive[:, None])
        quality = psnr(images, render_splats(final, height, width, backend=settings.backend, cutoff=settings.cutoff))
        quality[~alive] = float("nan")
    return FitResult(
        splats=final,
        psnr=quality.cpu(),
        seconds=seconds,
        iterations=settings.iterations,
        retried=sorted(set(retried)),
        dropped=sorted(dropped),
        history=history,
    )


def _finite_splats(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor) -> Tensor:  # [B] bool
    """Whether each image's valid splats hold only finite numbers."""
    with torch.no_grad():
        finite = torch.cat([positions, cholesky, colours], -1).isfinite().all(-1) | ~valid
    return finite.all(-1)


def _restart_images(
    images: Tensor,  # [k] indices into the batch
    params: list[Tensor],
    initial: Splats,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Put the given images back to their initial splats and clear their Adam moments."""
    with torch.no_grad():
        for param, start in zip(params, (initial.positions, initial.cholesky, initial.colours)):
            param[images] = start[images]
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][images] = 0
