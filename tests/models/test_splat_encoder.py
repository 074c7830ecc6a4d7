"""The splat image tower: shapes, masking of invalid splats, statistics, shared blocks, parameter shares,
latents tied to the patch grid, the locality bias and the teacher's block inputs."""

import math
from functools import partial

import pytest
import torch

from gsclip_lib.errors import ConfigError
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.models.splat_clip import parameter_shares, text_last_block_parameters
from gsclip_lib.models.splat_encoder import (
    build_splat_encoder,
    latent_grid_side,
    latent_positions,
    load_splat_encoder,
    patch_grid_size,
    pool_patch_grid,
    save_splat_encoder,
    teacher_block_inputs,
)
from gsclip_lib.models.splat_features import FeatureStats, fit_feature_statistics, fourier_features, splat_features
from gsclip_lib.splats.container import Splats

SIZE = 28


@pytest.fixture
def splats_in_image(random_splats):
    """The ``random_splats`` factory for this module's images: centres inside ``SIZE`` x ``SIZE``."""
    return partial(random_splats, height=SIZE, width=SIZE, beyond=0.0)


def pad_with_garbage(splats: Splats, extra: int, seed: int = 1) -> Splats:
    """The same splats with ``extra`` invalid slots of large random values, interleaved at random."""
    generator = torch.Generator().manual_seed(seed)
    batch, count = splats.batch_size, splats.num_slots
    total = count + extra
    positions = torch.cat([splats.positions, garbage(generator, batch, extra, 2)], 1)
    cholesky = torch.cat([splats.cholesky, garbage(generator, batch, extra, 3)], 1)
    colours = torch.cat([splats.colours, garbage(generator, batch, extra, splats.channels)], 1)
    valid = torch.cat([splats.valid, torch.zeros(batch, extra, dtype=torch.bool)], 1)
    order = torch.stack([torch.randperm(total, generator=generator) for _ in range(batch)])
    return Splats(take(positions, order), take(cholesky, order), take(colours, order), torch.gather(valid, 1, order))


def garbage(generator: torch.Generator, batch: int, extra: int, k: int) -> torch.Tensor:
    """``[batch, extra, k]`` large random values, drawn from ``generator``."""
    return (torch.rand(batch, extra, k, generator=generator) - 0.5) * 1e4


def take(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The slots of ``values`` ``[B, N, k]`` in the per-image ``order`` ``[B, N]``."""
    return torch.gather(values, 1, order.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@pytest.fixture(scope="module")
def rgb(defaults):
    """The project's RGB model (params.yaml's ``model``), from scratch."""
    torch.manual_seed(0)
    return create_rgb_clip(defaults.model(pretrained="", checkpoint=""), device="cpu")


@pytest.fixture
def stats(splats_in_image):
    return fit_feature_statistics([splats_in_image(16, 10, seed=5)], height=SIZE, width=SIZE)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_output_shapes(rgb, stats, defaults, splats_in_image):
    config = defaults.encoder()
    encoder = build_splat_encoder(rgb, config, stats, SIZE)
    embeddings, tokens = encoder(splats_in_image(3, 10), return_tokens=True)
    width = rgb.model.visual.class_embedding.shape[0]
    assert embeddings.shape == (3, rgb.model.visual.output_dim)
    assert tokens.shape == (3, 1 + config.num_latents, width)
    assert torch.equal(encoder(splats_in_image(3, 10)), embeddings)


def test_features_and_fourier_encoding(splats_in_image):
    splats = splats_in_image(2, 5)
    features = splat_features(splats, SIZE, SIZE)
    assert features.shape == (2, 5, 6)
    assert float(features[..., :2].abs().max()) <= 1.0
    l11 = splats.cholesky[..., 0]
    torch.testing.assert_close(features[..., 2], l11.log())
    encoded = fourier_features(features, torch.pi * 2.0 ** torch.arange(3.0))
    assert encoded.shape == (2, 5, 6 * (1 + 2 * 3))
    assert torch.equal(encoded[..., :6], features)  # the raw features are kept
    torch.testing.assert_close(encoded[..., 6], torch.sin(torch.pi * features[..., 0]))


def test_padded_invalid_splats_do_not_change_the_output(rgb, stats, defaults, splats_in_image):
    encoder = build_splat_encoder(rgb, defaults.encoder(unfreeze_first_blocks=1), stats, SIZE)
    splats = splats_in_image(4, 10)
    padded = pad_with_garbage(splats, extra=13)
    assert padded.num_slots == 23 and torch.equal(padded.counts(), splats.counts())
    torch.testing.assert_close(encoder(padded), encoder(splats), atol=1e-5, rtol=1e-5)
    # pruning a splat (marking it invalid) is the same as never having had it
    pruned = splats.with_valid(splats.valid.clone().index_fill_(1, torch.tensor([3, 7]), False))
    kept = Splats.from_tensors(*(t[:, [0, 1, 2, 4, 5, 6, 8, 9]] for t in (splats.positions, splats.cholesky, splats.colours)))
    torch.testing.assert_close(encoder(pruned), encoder(kept), atol=1e-5, rtol=1e-5)


def test_all_invalid_image_gives_finite_output_and_gradients(rgb, stats, defaults, splats_in_image):
    encoder = build_splat_encoder(rgb, defaults.encoder(), stats, SIZE)
    splats = pad_with_garbage(splats_in_image(3, 4), extra=6)
    valid = splats.valid.clone()
    valid[1] = False
    embeddings = encoder(splats.with_valid(valid))
    assert torch.isfinite(embeddings).all()
    embeddings.square().sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_feature_statistics_use_only_valid_splats(splats_in_image):
    splats = splats_in_image(4, 10)
    expected = splat_features(splats, SIZE, SIZE).reshape(-1, 6).double()
    stats = fit_feature_statistics([pad_with_garbage(splats, 5)], height=SIZE, width=SIZE)
    assert stats.count == 40
    torch.testing.assert_close(stats.mean, expected.mean(0).float())
    torch.testing.assert_close(stats.std, expected.std(0, unbiased=False).float())
    constant = Splats.from_tensors(splats.positions, splats.cholesky, torch.zeros_like(splats.colours))
    assert float(fit_feature_statistics([constant], height=SIZE, width=SIZE).std[-1]) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="height= and width="):
        fit_feature_statistics([splats])


def test_statistics_are_in_the_state_dict_and_restored(rgb, stats, tmp_path, defaults, splats_in_image):
    encoder = build_splat_encoder(rgb, defaults.encoder(num_latents=5, unfreeze_first_blocks=1, latents="learned", locality_width=0.0), stats, SIZE)
    assert torch.equal(encoder.state_dict()["feature_mean"], stats.mean)
    assert torch.equal(encoder.state_dict()["feature_std"], stats.std)
    with torch.no_grad():
        encoder.resampler.latent_embedding.add_(1.0)  # a change that must survive the round trip
    path = tmp_path / "splat_encoder.pt"
    save_splat_encoder(encoder, path)
    stored = torch.load(path, weights_only=True)["state_dict"]
    shared = encoder.shared_block_names
    assert not any(name.startswith(tuple(shared)) for name in stored), "shared RGB blocks must not be stored"
    assert any(name.startswith("blocks.0.") for name in stored), "the unfrozen copy must be stored"
    loaded = load_splat_encoder(path, rgb)
    assert torch.equal(loaded.feature_mean, stats.mean) and torch.equal(loaded.feature_std, stats.std)
    assert loaded.feature_stats().count == stats.count
    splats = splats_in_image(2, 10)
    torch.testing.assert_close(loaded(splats), encoder(splats), atol=0, rtol=0)


def test_blocks_are_shared_with_the_rgb_model_unless_unfrozen(rgb, stats, defaults):
    resblocks = rgb.model.visual.transformer.resblocks
    shared = build_splat_encoder(rgb, defaults.encoder(), stats, SIZE)
    assert all(mine is theirs for mine, theirs in zip(shared.blocks, resblocks))
    assert not any(p.requires_grad for p in resblocks.parameters())
    unfrozen = build_splat_encoder(rgb, defaults.encoder(unfreeze_first_blocks=2), stats, SIZE)
    assert unfrozen.blocks[0] is not resblocks[0] and unfrozen.blocks[1] is not resblocks[1]
    assert all(mine is theirs for mine, theirs in zip(unfrozen.blocks[2:], resblocks[2:]))
    assert all(p.requires_grad for p in unfrozen.blocks[:2].parameters())
    for mine, theirs in zip(unfrozen.blocks[0].parameters(), resblocks[0].parameters()):
        assert torch.equal(mine, theirs) and mine is not theirs


def test_parameter_shares_add_up(rgb, stats, defaults):
    base = parameter_shares(build_splat_encoder(rgb, defaults.encoder(), stats, SIZE), rgb, verbose=False)
    assert base["trainable_parameters"] + base["frozen_parameters"] == base["total_parameters"]
    assert base["image_tower_parameters"] + base["text_tower_parameters"] == base["total_parameters"]
    blocks = rgb.model.visual.transformer.resblocks
    assert base["reused_from_rgb"] == num_parameters(blocks)
    assert base["reused_share"] == pytest.approx(num_parameters(blocks) / base["total_parameters"])
    assert base["image_tower_trainable"] == base["image_tower_parameters"] - num_parameters(blocks)
    assert math.isclose(base["trainable_share"] + base["frozen_share"], 1.0)

    two = parameter_shares(
        build_splat_encoder(rgb, defaults.encoder(unfreeze_first_blocks=2), stats, SIZE), rgb, verbose=False
    )
    assert two["trainable_parameters"] - base["trainable_parameters"] == num_parameters(blocks[:2])
    assert two["total_parameters"] == base["total_parameters"]  # copies instead of the shared blocks
    assert two["reused_from_rgb"] == base["reused_from_rgb"]

    text = parameter_shares(
        build_splat_encoder(rgb, defaults.encoder(), stats, SIZE), rgb, text_trainable=True, verbose=False
    )
    unfrozen_text = sum(p.numel() for p in text_last_block_parameters(rgb))
    assert text["trainable_parameters"] - base["trainable_parameters"] == unfrozen_text


def test_bad_configs_are_refused(rgb, stats, defaults, splats_in_image):
    with pytest.raises(ConfigError, match="num_latents: Input should be greater than 0"):
        defaults.encoder(num_latents=0)
    with pytest.raises(ValueError, match="unfreeze_first_blocks"):
        build_splat_encoder(rgb, defaults.encoder(unfreeze_first_blocks=99), stats, SIZE)
    encoder = build_splat_encoder(rgb, defaults.encoder(), stats, SIZE)
    with pytest.raises(ValueError, match="1-channel"):
        encoder(splats_in_image(1, 4, channels=3))
    assert isinstance(encoder.feature_stats(), FeatureStats)


# ----------------------------------------------------------------------------------------------
# Latents tied to the RGB ViT's patch grid, the locality bias, the teacher's block inputs


def test_teacher_block_inputs_are_what_the_first_block_reads(rgb):
    visual = rgb.model.visual
    images = rgb.prepare_images(torch.rand(3, 1, SIZE, SIZE))
    seen = {}
    hook = visual.transformer.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            visual.eval()
            visual(images)
    finally:
        hook.remove()
    grid = patch_grid_size(visual)
    with torch.no_grad():
        mine = teacher_block_inputs(visual, images)
        pooled = teacher_block_inputs(visual, images, side=2)
    first_block_input = seen["x"] if getattr(visual.transformer, "batch_first", True) else seen["x"].transpose(0, 1)
    torch.testing.assert_close(mine, first_block_input)
    assert mine.shape == (3, 1 + grid[0] * grid[1], visual.class_embedding.shape[0])
    assert pooled.shape == (3, 1 + 4, mine.shape[-1])
    torch.testing.assert_close(pooled[:, 0], mine[:, 0])  # the class token is never pooled


def test_pooling_averages_the_patch_cells_and_places_the_latents():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row-major
    torch.testing.assert_close(pool_patch_grid(tokens, (4, 4), 2).flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert pool_patch_grid(tokens, (4, 4), 4) is tokens
    torch.testing.assert_close(latent_positions(2, (4, 4)), torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    four = latent_positions(4, (4, 4))
    torch.testing.assert_close(four[1], torch.tensor([-0.25, -0.75]))  # row 0, column 1: x right of y
    assert latent_grid_side(16, (4, 4)) == 4
    for bad in (5, 25):
        with pytest.raises(ValueError, match="num_latents = s\\^2"):
            latent_grid_side(bad, (4, 4))


def test_teacher_grid_latents_start_at_the_patch_positions(rgb, stats, defaults):
    visual = rgb.model.visual
    encoder = build_splat_encoder(rgb, defaults.encoder(latents="teacher_grid", num_latents=16), stats, SIZE)
    torch.testing.assert_close(encoder.resampler.latent_embedding.detach(), visual.positional_embedding.detach()[1:])
    small = build_splat_encoder(rgb, defaults.encoder(latents="teacher_grid", num_latents=4), stats, SIZE)
    expected = pool_patch_grid(visual.positional_embedding.detach()[1:].unsqueeze(0), patch_grid_size(visual), 2)[0]
    torch.testing.assert_close(small.resampler.latent_embedding.detach(), expected)


def test_teacher_ln_is_a_trainable_copy(rgb, stats, defaults, splats_in_image):
    ln_pre = rgb.model.visual.ln_pre
    before = [p.detach().clone() for p in ln_pre.parameters()]
    encoder = build_splat_encoder(rgb, defaults.encoder(norm_pre="teacher_ln"), stats, SIZE)
    assert encoder.norm_pre is not ln_pre
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(encoder.norm_pre.parameters(), ln_pre.parameters()))
    encoder.block_inputs(splats_in_image(2, 6)).square().sum().backward()
    assert all(p.grad is not None for p in encoder.norm_pre.parameters())
    assert all(p.grad is None for p in ln_pre.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, ln_pre.parameters()))


def corner_splats(colour: float) -> Splats:
    """Two splats: one in the top-left corner, one of colour ``colour`` in the bottom-right corner."""
    positions = torch.tensor([[[2.0, 2.0], [26.0, 26.0]]])
    cholesky = torch.tensor([[[1.5, 0.0, 1.5], [1.5, 0.0, 1.5]]])
    colours = torch.tensor([[[0.8], [colour]]])
    return Splats.from_tensors(positions, cholesky, colours)


def top_left_change(rgb, stats, defaults, locality_width: float) -> float:
    """How much the top-left latent moves when the bottom-right splat changes colour (relative)."""
    config = defaults.encoder(latents="teacher_grid", num_latents=16, locality_width=locality_width)
    encoder = build_splat_encoder(rgb, config, stats, SIZE)
    with torch.no_grad():
        first, second = (encoder.block_inputs(corner_splats(c))[0, 1] for c in (0.0, 1.0))  # latent 0: top left
    return float((first - second).norm() / first.norm())


def test_the_locality_bias_keeps_latents_on_their_own_splats(rgb, stats, defaults):
    """With a narrow bias, a latent in the top-left corner hardly notices a splat in the bottom-right
    corner; without it, it does."""
    assert top_left_change(rgb, stats, defaults, 0.05) < 1e-4
    assert top_left_change(rgb, stats, defaults, 0.0) > 1e-3


def test_locality_and_token_distillation_need_the_grid(defaults):
    with pytest.raises(ConfigError, match="locality_width > 0 needs latents: teacher_grid"):
        defaults.encoder(latents="learned", locality_width=0.5)
    with pytest.raises(ConfigError, match="distill_target: tokens needs encoder.latents: teacher_grid"):
        defaults.values.align.replace(
            distill_target="tokens", encoder=defaults.encoder(latents="learned", locality_width=0.0)
        )
