"""Aligning splat towers: pairing, frozen parts, both stages learn, resume, caching, save and load."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from gsclip_lib.data.image_text_shards import encode_image, write_image_text_shards
from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.data.tar_shards import expand_shard_spec, iter_tar_samples
from gsclip_lib.data.splat_shards import PairedDecoder
from gsclip_lib.errors import InputError
from gsclip_lib.models.splat_clip import SplatClip, TextTower, load_splat_clip
from gsclip_lib.models.splat_encoder import build_splat_encoder
from gsclip_lib.models.splat_features import fit_feature_statistics
from gsclip_lib.splats.codec import encode_splats
from gsclip_lib.splats.initialization import init_grid
from gsclip_lib.stages import align as align_stage
from gsclip_lib.stages.align import align_level
from gsclip_lib.training.alignment import (
    AlignBatch,
    CaptionEmbeddingCache,
    ContrastiveObjective,
    DistillationObjective,
    TokenDistillationObjective,
    teacher_embeddings,
    collate_pairs,
    teacher_tokens,
)

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
    """Image shards (2 shards of 4) and one splat shard per image shard, in reverse key order, each
    splat sample carrying its image as the fit stage writes it."""
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
                        "png": encode_image(pixels[i], "png"),
                        "txt": caption.encode(),
                        "json": json.dumps(metadata).encode(),
                    }
                )
    return {"images": str(root / "images"), "splats": str(root / "splats"), "pixels": tensors}


def read_pairs(spec: str, data_config) -> tuple[AlignBatch, list[str]]:
    """Every sample of the splat shards at ``spec`` as one batch, and their keys, in shard order."""
    decode = PairedDecoder(data_config.image_size, data_config.channels, data_config.resize_mode)
    raws = [raw for url in expand_shard_spec(spec) for raw in iter_tar_samples(url, SkipCounts())]
    return collate_pairs([decode(raw) for raw in raws]), [raw.key for raw in raws]


@pytest.fixture(scope="module")
def data(shards, configs):
    return read_pairs(shards["splats"], configs.data)[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_splat_samples_carry_their_image_and_caption(shards, configs):
    batch, keys = read_pairs(shards["splats"], configs.data)
    assert batch.splats.batch_size == COUNT and batch.splats.num_slots == SPLATS
    for row, key in enumerate(keys):
        index = int(key[3:])
        assert torch.equal(batch.images[row], shards["pixels"][index])
        assert batch.captions[row] == f"a photo of a {CLASSES[index % len(CLASSES)]}"
    assert keys != sorted(keys)  # the splat shards were written in another order


def test_a_splat_sample_without_its_image_is_skipped_and_a_wrong_size_is_an_error(shards, configs):
    raw = next(iter_tar_samples(expand_shard_spec(shards["splats"])[0], SkipCounts()))
    decode = PairedDecoder(configs.data.image_size, configs.data.channels, configs.data.resize_mode)
    del raw.members["png"]
    with pytest.raises(SkipSample, match="carries no source image") as skipped:
        decode(raw)
    assert skipped.value.reason == "no_image"
    raw = next(iter_tar_samples(expand_shard_spec(shards["splats"])[0], SkipCounts()))
    with pytest.raises(InputError, match=r"reads as \(1, 14, 14\), its splats describe \(1, 28, 28\)"):
        PairedDecoder(14, 1, "center_crop")(raw)
    without_pixels = PairedDecoder(14, 1, "center_crop", with_image=False)(raw)  # the contrastive stage's
    assert without_pixels.image is None and collate_pairs([without_pixels]).images is None


def test_text_tower_matches_open_clip_and_cache_matches_encoding(data, configs, make_rgb):
    rgb = make_rgb()
    tokens = rgb.tokenizer(data.captions)
    expected = rgb.model.encode_text(tokens)
    torch.testing.assert_close(TextTower(rgb.model).encode_text(tokens), expected)
    torch.testing.assert_close(TextTower(rgb.model, train_last_block=True).encode_text(tokens), expected)

    stats = fit_feature_statistics([data.splats], height=SIZE, width=SIZE)
    encoder = build_splat_encoder(rgb, configs.encoder, stats, SIZE)
    clip = SplatClip(encoder, TextTower(rgb.model), 2.0)
    batch = AlignBatch(data.splats, captions=data.captions)
    cached = ContrastiveObjective(clip, rgb.tokenizer, cache_size=2)  # fewer places than the 4 captions
    uncached = ContrastiveObjective(clip, rgb.tokenizer, cache_size=0)
    assert cached.cache is not None and uncached.cache is None
    for _ in range(2):
        torch.testing.assert_close(cached(batch)[0], uncached(batch)[0])
    info = cached.cache_info()
    assert info["size"] == 2 and info["misses"] + info["hits"] == 2 * len(CLASSES) and info["evictions"] >= 2
    trained = ContrastiveObjective(SplatClip(encoder, TextTower(rgb.model, train_last_block=True), 2.0),
                                   rgb.tokenizer, cache_size=10)
    assert trained.cache is None  # a text tower that trains is never cached


def test_caption_cache_keeps_the_most_recently_used():
    cache = CaptionEmbeddingCache(2)
    encoded = []

    def encode(caption):
        encoded.append(caption)
        return torch.tensor([float(len(caption))])

    assert cache.lookup(["a", "bb"], encode).tolist() == [[1.0], [2.0]]
    cache.lookup(["a"], encode)  # "a" is now the most recent: "bb" goes first
    cache.lookup(["ccc"], encode)
    assert list(cache.entries) == ["a", "ccc"] and encoded == ["a", "bb", "ccc"]
    cache.lookup(["bb"], encode)
    assert encoded[-1] == "bb" and cache.info() == {"capacity": 2, "size": 2, "hits": 1, "misses": 4, "evictions": 2}
    with pytest.raises(ValueError, match="capacity"):
        CaptionEmbeddingCache(0)


def test_frozen_parameters_do_not_move_in_a_training_step(data, configs, make_rgb):
    rgb = make_rgb()
    before = snapshot(rgb.model)
    stats = fit_feature_statistics([data.splats], height=SIZE, width=SIZE)
    encoder = build_splat_encoder(rgb, configs.encoder.replace(unfreeze_first_blocks=1), stats, SIZE)
    text = TextTower(rgb.model, train_last_block=True)
    clip = SplatClip(encoder, text, 2.0)
    objective = ContrastiveObjective(clip, rgb.tokenizer)
    distill = DistillationObjective(encoder)
    trained_before = {k: v for k, v in snapshot(objective).items() if objective.get_parameter(k).requires_grad}
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    targets = teacher_embeddings(rgb, data.images)
    for stage, batch in ((distill, AlignBatch(data.splats, targets=targets)), (objective, AlignBatch(data.splats, captions=data.captions))):
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
    result = align_level(rgb, shards["splats"], config, configs.data)
    metrics = result.metrics
    for stage in ("distill", "contrastive"):
        losses = [entry["loss"] for entry in metrics[stage]["history"] if "loss" in entry]
        assert losses[-1] < 0.7 * losses[0], f"{stage}: {losses[0]:.4f} -> {losses[-1]:.4f}"
        assert metrics[stage]["final_loss"] == pytest.approx(losses[-1])
    assert metrics["level"] == SPLATS and metrics["pairs"] == COUNT
    assert metrics["skipped"]["distill"] == {**SkipCounts().as_dict(), "good": COUNT}  # the first epoch's count
    assert not metrics["cache_text_embeddings"]  # the text tower trains, so nothing is cached
    assert result.path == tmp_path / "align" / f"N{SPLATS}" / "splat_encoder.pt"
    for name, value in snapshot(rgb.model).items():
        assert torch.equal(value, before[name]), f"the RGB model's {name} changed"

    loaded = load_splat_clip(result.path, rgb)
    data = read_pairs(shards["splats"], configs.data)[0]
    tokens = rgb.tokenizer(["a photo of a bag"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logit_scale, result.clip.logit_scale)
        torch.testing.assert_close(loaded.encode_image(data.splats), result.clip.encode_image(data.splats))
        torch.testing.assert_close(loaded.encode_text(tokens), result.clip.encode_text(tokens))


def test_resume_after_a_kill_equals_an_uninterrupted_run(shards, tmp_path, monkeypatch, configs, make_rgb):
    """Contrastive stage: 2 steps an epoch, a checkpoint every step; killed in step 4 (epoch 2), the
    rerun resumes from step 3's checkpoint and ends exactly as the straight run."""
    def run(folder: str):
        config = configs.align(tmp_path, folder, configs.optim(epochs=2, batch_size=4),
                               configs.optim(epochs=3, batch_size=4).replace(checkpoint_every=1))
        return align_level(make_rgb(), shards["splats"], config, configs.data)

    straight = run("straight")
    real_train = align_stage.train

    def dying_train(model, loss_fn, *args, **kwargs):
        if not isinstance(model, ContrastiveObjective):
            return real_train(model, loss_fn, *args, **kwargs)
        calls = {"n": 0}

        def dying(wrapped, batch):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt("killed")
            return loss_fn(wrapped, batch)

        return real_train(model, dying, *args, **kwargs)

    monkeypatch.setattr(align_stage, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    resumed = run("resumed")
    assert resumed.metrics["distill"]["resumed_from_step"] == 4  # finished before the kill
    assert resumed.metrics["contrastive"]["resumed_from_step"] == 3  # mid-epoch
    for (name, mine), (_, theirs) in zip(resumed.clip.state_dict().items(), straight.clip.state_dict().items()):
        assert torch.equal(mine, theirs), name
    assert resumed.metrics["contrastive"]["history"] == straight.metrics["contrastive"]["history"] or all(
        {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
        for a, b in zip(resumed.metrics["contrastive"]["history"], straight.metrics["contrastive"]["history"])
    )


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
