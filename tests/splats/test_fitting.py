"""Fitting and pruning on real photographs (scikit-image's astronaut and coffee, resized to 64x64).

64x64 with 256 splats has the density of the paper's 224x224 with 3136 (one splat per 16 pixels),
and 400 splats that of 4900, where the paper compares structured and random init. Thresholds were
measured on this 2-core CPU (numbers in each test) and set a little below what was seen.
"""

import pytest
import torch

import gsclip_lib.splats.fitting as fit_module
from gsclip_lib.data.photos import load_photos
from gsclip_lib.splats.fitting import fit_splats
from gsclip_lib.splats.pruning import luminance_score, prune_and_finetune, prune_by_luminance

SIZE = 64
ITERATIONS = 150


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return load_photos(["astronaut", "coffee"], SIZE)


@pytest.fixture(scope="module")
def fitted(photos, defaults):
    return fit_splats(photos, 256, defaults.photo_fit_settings(iterations=ITERATIONS), progress=False)


def test_fit_reaches_measured_psnr(fitted):
    # Measured: astronaut 29.2 dB, coffee 33.3 dB after 150 iterations (grid init 17.9 dB mean).
    assert fitted.psnr[0] > 28.0
    assert fitted.psnr[1] > 32.0
    history = fitted.history["psnr"]
    assert history[-1] > history[0] + 6.0, "fitting must improve on the grid init by a wide margin"
    assert fitted.dropped == [] and fitted.retried == []
    assert fitted.splats.counts().tolist() == [256, 256]
    assert (fitted.splats.cholesky[..., [0, 2]] >= 0.3 - 1e-6).all(), "min_scale floor not kept"


def test_structured_init_beats_random_init(photos, defaults):
    settings = defaults.photo_fit_settings(iterations=ITERATIONS, init="grid")
    grid = fit_splats(photos, 400, settings, progress=False)
    random = fit_splats(photos, 400, settings.replace(init="random"), progress=False)
    # Measured: grid 32.5 / 36.6 dB, random 28.0 / 29.9 dB (the paper: +7 dB at 4900 on 224x224).
    assert (grid.psnr - random.psnr).min() > 3.5


def test_fit_is_deterministic_for_a_seed(photos, defaults):
    settings = defaults.photo_fit_settings(iterations=20, init="gradient", seed=3)
    first = fit_splats(photos, 100, settings, progress=False)
    second = fit_splats(photos, 100, settings, progress=False)
    torch.testing.assert_close(first.splats.positions, second.splats.positions, rtol=0, atol=0)
    torch.testing.assert_close(first.splats.colours, second.splats.colours, rtol=0, atol=0)
    other_seed = fit_splats(photos, 100, settings.replace(iterations=0, seed=4), progress=False)
    assert not torch.equal(first.splats.positions, other_seed.splats.positions)


def test_an_image_fits_the_same_alone_and_in_a_batch(photos, defaults):
    settings = defaults.photo_fit_settings(iterations=30)
    batch = fit_splats(photos, 64, settings, progress=False)
    alone = fit_splats(photos[1:], 64, settings, progress=False)
    # Summed per-image losses and per-element Adam make images independent; only float
    # summation order inside the scatter can differ.
    torch.testing.assert_close(batch.splats.positions[1:], alone.splats.positions, rtol=1e-4, atol=1e-4)
    assert abs(float(batch.psnr[1] - alone.psnr[0])) < 0.01


def _inject_nan(monkeypatch, image: int, until_iteration: int) -> None:
    calls = {"n": 0}
    original = fit_module.render_splats

    def render_with_nan(splats, height, width, **kwargs):
        out = original(splats, height, width, **kwargs)
        calls["n"] += 1
        if calls["n"] <= until_iteration and splats.positions.requires_grad:
            out = out.clone()
            out[image] = float("nan")
        return out

    monkeypatch.setattr(fit_module, "render_splats", render_with_nan)


def test_non_finite_image_is_restarted_and_recovers(photos, monkeypatch, defaults):
    _inject_nan(monkeypatch, image=1, until_iteration=3)
    result = fit_splats(photos, 64, defaults.photo_fit_settings(iterations=40, max_retries=5), progress=False)
    assert result.retried == [1]
    assert result.dropped == []
    assert torch.isfinite(result.psnr).all()
    # The restarted image lost a few iterations, not its fit.
    clean = fit_splats(photos, 64, defaults.photo_fit_settings(iterations=35), progress=False)
    assert result.psnr[1] > clean.psnr[1] - 0.5


def test_image_that_stays_non_finite_is_dropped_not_kept(photos, monkeypatch, defaults):
    _inject_nan(monkeypatch, image=0, until_iteration=10**6)
    result = fit_splats(photos, 64, defaults.photo_fit_settings(iterations=10, max_retries=1), progress=False)
    assert result.dropped == [0]
    assert torch.isnan(result.psnr[0]) and torch.isfinite(result.psnr[1])
    assert result.splats.counts().tolist() == [0, 64]
    assert result.kept.tolist() == [False, True]


def test_prune_to_target_count_keeps_the_brightest(fitted):
    pruned = prune_by_luminance(fitted.splats, target_count=192)
    assert pruned.num_slots == 192 and pruned.counts().tolist() == [192, 192]
    scores = luminance_score(fitted.splats.colours)
    kept_scores = luminance_score(pruned.colours)
    # Everything kept is at least as bright as everything dropped.
    for image in range(2):
        threshold = kept_scores[image].min()
        assert int((scores[image] >= threshold).sum()) >= 192
        assert int((scores[image] > threshold).sum()) <= 192


def test_prune_by_threshold_removes_dim_splats_at_bounded_cost(photos, fitted, defaults):
    tau = 0.05
    pruned = prune_by_luminance(fitted.splats, threshold=tau)
    # The paper's rule keeps the slot layout; zero iterations re-measure the survivors.
    assert pruned.num_slots == 256
    settings = defaults.photo_fit_settings(iterations=0)
    result = fit_splats(photos, pruned.num_slots, settings, initial=pruned, progress=False)
    counts = result.splats.counts()
    assert (counts < 256).all() and (counts > 200).all()
    assert (luminance_score(result.splats.colours)[result.splats.valid] >= tau).all()
    # Measured: 251 / 232 splats left, PSNR 29.2 -> 29.1 and 33.3 -> 29.1 dB (no fine-tune). The
    # paper loses 6.3 dB pruning 23.7 % at tau = 0.05; the bound allows as much.
    drop = fitted.psnr - result.psnr
    assert (drop >= -1e-3).all() and (drop < 6.5).all()


def test_fine_tune_recovers_part_of_the_pruning_loss(photos, fitted, defaults):
    settings = defaults.photo_fit_settings()
    cut = prune_and_finetune(photos, fitted.splats, 128, settings, 0, progress=False)
    tuned = prune_and_finetune(photos, fitted.splats, 128, settings, 50, progress=False)
    # Measured: halving the count drops to 12.8 / 13.6 dB; 50 fine-tune steps bring back 21.9 / 25.7.
    # (The render is a sum: removing half the splats leaves holes, which regrowing neighbours fill.)
    assert (tuned.psnr > cut.psnr + 4.0).all()
    assert tuned.splats.counts().tolist() == [128, 128]
    assert cut.iterations == 0 and tuned.iterations == 50


def test_pruning_needs_exactly_one_criterion(random_splats):
    splats = random_splats(2, 8, 3)
    with pytest.raises(ValueError, match="exactly one"):
        prune_by_luminance(splats)
    with pytest.raises(ValueError, match="exactly one"):
        prune_by_luminance(splats, threshold=0.1, target_count=4)
    with pytest.raises(ValueError, match="target_count must be positive"):
        prune_by_luminance(splats, target_count=0)
    with pytest.raises(ValueError, match="1 or 3 colour channels"):
        luminance_score(torch.rand(1, 4, 2))
