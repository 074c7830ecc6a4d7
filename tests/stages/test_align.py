"""Aligning splat towers: pairing, frozen parts, both stages learn, resume, caching, save and load."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

import gsclip_lib.training.alignment as alignment_training
from gsclip_lib.data.image_text_shards import write_image_text_shards
from gsclip_lib.models.splat_clip import SplatClip, TextTower, load_splat_clip
from gsclip_lib.models.splat_encoder import build_splat_encoder, fit_feature_statistics
from gsclip_lib.splats.codec import encode_splats
from gsclip_lib.splats.initialization import init_grid
from gsclip_lib.stages import align as align_stage
from gsclip_lib.stages.align import align_level, load_paired_data
from gsclip_lib.training.alignment import (
    AlignBatch,
    ContrastiveObjective,
    DistillationObjective,
    TokenDistillationObjective,
    teacher_embeddings,
    teacher_tokens,
)
from gsclip_lib.training.objectives import caption_table

SIZE = 28
COUNT, SPLATS = 8, 10
CLASSES = ["t-shirt", "trouser", "sneaker", "bag"]


@pytest.fixture(scope="module")
def configs():
    """The splat tower and training settings of these tests: params.yaml's, made small."""
    from gsclip_lib.params import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    encoder = params.align.encoder.replace(num_latents=4, resampler_layers=2, resampler_heads=2, fourier_frequencies=4)

    def optim(epochs: int, batch_size: int = COUNT, lr: float = 3e-3):
        return params.align.distill.replace(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0,
                                            warmup_steps=0, grad_clip=1.0, seed=0, log_every=1)

    def align(tmp_path: Path, folder: str, distill, contrastive, **changes):
        return params.align.replace(encoder=encoder, distill=distill, contrastive=contrastive,
                                    checkpoint_dir=str(tmp_path / folder), **changes)

    return SimpleNamespace(params=params, encoder=encoder, optim=optim, align=align, data=params.data)


def images() -> np.ndarray:  # [COUNT, SIZE, SIZE] uint8: one shape per class, shifted
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for i in range(COUNT):
        kind, shift = i % len(CLASSES), 2 * (i // len(CLASSES))
        if kind == 0:
            mask = (abs(rows - 14) < 8) & (abs(cols - 14 - shift) < 10)
        elif kind == 1:
            mask = (abs(cols - 10 - shift) < 3) | (abs(cols - 18 - shift) < 3)
        elif kind == 2:
            mask = (rows > 16 + shift) & (rows < 24 + shift)
        else:
            mask = (rows - 14) ** 2 + (cols - 14 - shift) ** 2 < 60
        out.append((mask * 220 + 20).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread is several times faster than two fighting over small ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Image shards (2 shards of 4) and one splat shard per image shard, in reverse key order."""
    root = tmp_path_factory.mktemp("align_data")
    pixels = images()
    samples = [
        (f"img{i:03d}", pixels[i], f"a photo of a {CLASSES[i % len(CLASSES)]}", {"label": i % len(CLASSES)})
        for i in range(COUNT)
    ]
    written = write_image_text_shards(samples, os.path.join(root, "images", "train-%06d.tar"), 4)
    tensors = torch.from_numpy(pixels).float().div(255).unsqueeze(1)
    splats = init_grid(tensors, SPLATS)
    os.makedirs(root / "splats")
    for shard_index, shard in enumerate(written):
        name = os.path.basename(shard)
        with wds.TarWriter(str(root / "splats" / name)) as writer:
            for i in reversed(range(4 * shard_index, 4 * shard_index + 4)):
                key, _, caption, meta = samples[i]
                metadata = {
                    "N": SPLATS, "C": 1, "H": SIZE, "W": SIZE, "source_key": key, "source_shard": name,
                    "label": meta["label"], "image_size": SIZE, "resize_mode": "center_crop",
                }
                writer.write(
                    {
                        "__key__": key,
                        "gs": encode_splats(splats, i, SIZE, SIZE),
                        "txt": caption.encode(),
                        "json": json.dumps(metadata).encode(),
                    }
                )
    return {"images": str(root / "images"), "splats": str(root / "splats"), "pixels": tensors}


@pytest.fixture(scope="module")
def data(shards, configs):
    return load_paired_data(shards["splats"], shards["images"], configs.data)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_pairs_are_matched_by_key(shards, data):
    assert len(data) == COUNT and data.unpaired == 0
    assert data.level == SPLATS and data.height == SIZE
    for row, key in enumerate(data.keys):
        index = int(key[3:])
        assert torch.equal(data.images[row], shards["pixels"][index])
        assert data.captions[row] == f"a photo of a {CLASSES[index % len(CLASSES)]}"
        assert int(data.labels[row]) == index % len(CLASSES)
    assert data.keys != sorted(data.keys)  # the splat shards were written in another order


def test_text_tower_matches_open_clip_and_cache_matches_encoding(data, configs, make_rgb):
    rgb = make_rgb()
    tokens = rgb.tokenizer(data.captions)
    expected = rgb.model.encode_text(tokens)
    torch.testing.assert_close(TextTower(rgb.model).encode_text(tokens), expected)
    torch.testing.assert_close(TextTower(rgb.model, train_last_block=True).encode_text(tokens), expected)

    stats = fit_feature_statistics([data.splats], height=SIZE, width=SIZE)
    encoder = build_splat_encoder(rgb, configs.encoder, stats, SIZE)
    distinct, ids = caption_table(data.captions)
    assert len(distinct) == len(CLASSES) and [distinct[i] for i in ids] == data.captions
    clip = SplatClip(encoder, TextTower(rgb.model), 2.0)
    batch = AlignBatch(data.splats, caption_ids=ids)
    cached = ContrastiveObjective(clip, rgb.tokenizer(distinct), cache_text_embeddings=True)
    uncached = ContrastiveObjective(clip, rgb.tokenizer(distinct), cache_text_embeddings=False)
    assert cached.caption_embeddings is not None and uncached.caption_embeddings is None
    torch.testing.assert_close(cached(batch)[0], uncached(batch)[0])


def test_frozen_parameters_do_not_move_in_a_training_step(data, configs, make_rgb):
    rgb = make_rgb()
    before = snapshot(rgb.model)
    stats = fit_feature_statistics([data.splats], height=SIZE, width=SIZE)
    encoder = build_splat_encoder(rgb, configs.encoder.replace(unfreeze_first_blocks=1), stats, SIZE)
    text = TextTower(rgb.model, train_last_block=True)
    clip = SplatClip(encoder, text, 2.0)
    distinct, ids = caption_table(data.captions)
    objective = ContrastiveObjective(clip, rgb.tokenizer(distinct))
    distill = DistillationObjective(encoder)
    trained_before = {k: v for k, v in snapshot(objective).items() if objective.get_parameter(k).requires_grad}
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    targets = teacher_embeddings(rgb, data.images)
    for stage, batch in ((distill, AlignBatch(data.splats, targets=targets)), (objective, AlignBatch(data.splats, caption_ids=ids))):
        optimizer.zero_grad()
        stage(batch)[0].backward()
        optimizer.step()
    for name, value in snapshot(rgb.model).items():
        assert torch.equal(value, before[name]), f"the RGB model's {name} changed"
    moved = [k for k, v in snapshot(objective).items() if k in trained_before and not torch.equal(v, trained_before[k])]
    assert any(k.startswith("clip.image.blocks.0.") for k in moved)
    assert any(k.startswith("clip.text.blocks.") for k in moved) and "clip.logit_scale" in moved
    assert any(k.startswith("clip.image.resampler.") for k in moved)


def test_both_stages_lower_their_loss_and_save_a_loadable_clip(shards, tmp_path, configs, make_rgb):
    rgb = make_rgb()
    before = snapshot(rgb.model)
    config = configs.align(tmp_path, "align", configs.optim(epochs=25), configs.optim(epochs=30, lr=1e-3),
                           unfreeze_text_last_block=True)
    result = align_level(rgb, shards["splats"], shards["images"], config, configs.data)
    metrics = result.metrics
    for stage in ("distill", "contrastive"):
        losses = [entry["loss"] for entry in metrics[stage]["history"] if "loss" in entry]
        assert losses[-1] < 0.7 * losses[0], f"{stage}: {losses[0]:.4f} -> {losses[-1]:.4f}"
        assert metrics[stage]["final_loss"] == pytest.approx(losses[-1])
    assert metrics["level"] == SPLATS and metrics["pairs"] == COUNT and metrics["distinct_captions"] == 4
    assert not metrics["cache_text_embeddings"]  # the text tower trains, so nothing is cached
    assert result.path == tmp_path / "align" / f"N{SPLATS}" / "splat_encoder.pt"
    for name, value in snapshot(rgb.model).items():
        assert torch.equal(value, before[name]), f"the RGB model's {name} changed"

    loaded = load_splat_clip(result.path, rgb)
    data = load_paired_data(shards["splats"], shards["images"], configs.data)
    tokens = rgb.tokenizer(["a photo of a bag"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logit_scale, result.clip.logit_scale)
        torch.testing.assert_close(loaded.encode_image(data.splats), result.clip.encode_image(data.splats))
        torch.testing.assert_close(loaded.encode_text(tokens), result.clip.encode_text(tokens))


def test_resume_after_a_kill_equals_an_uninterrupted_run(shards, tmp_path, monkeypatch, configs, make_rgb):
    def run(folder: str):
        config = configs.align(tmp_path, folder, configs.optim(epochs=2, batch_size=4), configs.optim(epochs=3, batch_size=4))
        return align_level(make_rgb(), shards["splats"], shards["images"], config, configs.data)

    straight = run("straight")

    original = alignment_training.epoch_permutation
    calls = {"contrastive_epoch_2": 0}

    def dying(count, seed, epoch, rank=0):
        if epoch == 2 and calls["contrastive_epoch_2"] == 0 and dying.stage == "contrastive":
            calls["contrastive_epoch_2"] += 1
            raise KeyboardInterrupt("killed")
        return original(count, seed, epoch, rank)

    dying.stage = "distill"
    real_train = align_stage.train

    def tracking_train(model, *args, **kwargs):
        dying.stage = "contrastive" if isinstance(model, ContrastiveObjective) else "distill"
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(alignment_training, "epoch_permutation", dying)
    monkeypatch.setattr(align_stage, "train", tracking_train)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert calls["contrastive_epoch_2"] == 1
    monkeypatch.undo()
    resumed = run("resumed")
    assert resumed.metrics["contrastive"]["resumed_from_step"] > 0
    for (name, mine), (_, theirs) in zip(resumed.clip.state_dict().items(), straight.clip.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_token_distillation_matches_block_inputs_without_running_the_blocks(data, configs, make_rgb):
    rgb = make_rgb()
    stats = fit_feature_statistics([data.splats], height=SIZE, width=SIZE)
    encoder = build_splat_encoder(rgb, configs.encoder.replace(unfreeze_first_blocks=1), stats, SIZE)
    side = int(configs.encoder.num_latents**0.5)
    targets = teacher_tokens(rgb, data.images, side)
    width = rgb.model.visual.class_embedding.shape[0]
    assert targets.shape == (COUNT, 1 + configs.encoder.num_latents, width)
    objective = TokenDistillationObjective(encoder)
    loss, metrics = objective(AlignBatch(data.splats, targets=targets))
    assert float(loss.detach()) > 0 and metrics["relative_error"] == pytest.approx(float(loss.detach()))
    loss.backward()
    assert all(p.grad is None for p in encoder.blocks[0].parameters()), "the blocks must not run"
    assert all(p.grad is None for p in encoder.proj.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.resampler.parameters())
    with torch.no_grad():
        own = encoder.block_inputs(data.splats)
        assert float(objective(AlignBatch(data.splats, targets=own))[0]) == 0.0
        doubled = objective(AlignBatch(data.splats, targets=2 * own))[0]
    assert float(doubled) == pytest.approx(0.25, rel=1e-5)  # |s - 2s|^2 / |2s|^2
    with pytest.raises(ValueError, match="tokens, the targets are"):
        objective(AlignBatch(data.splats, targets=targets[:, :2]))
