"""The RGB CLIP factory (gsclip_lib.models.rgb_clip): configs, the three ways to build, preprocessing."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from gsclip_lib.atomic_files import save_torch
from gsclip_lib.models.rgb_clip import (
    DEFAULT_MODEL,
    MODEL_CONFIG_DIR,
    cached_pretrained_file,
    create_rgb_clip,
    project_models,
    save_rgb_clip,
)
from gsclip_lib.training.loop import CHECKPOINT_FORMAT


@pytest.fixture(scope="module")
def scratch(defaults):
    """``model`` as params.yaml has it, for the module's default model, from scratch; called with
    fields to change, a copy with them changed (the config's ``replace``)."""
    return defaults.model(name=DEFAULT_MODEL, pretrained="", checkpoint="").replace


@pytest.fixture(scope="module")
def default_clip(scratch):
    torch.manual_seed(0)
    return create_rgb_clip(scratch(), device="cpu")


def encode(clip, images, captions):
    with torch.no_grad():
        return clip.model.encode_image(clip.prepare_images(images)), clip.model.encode_text(clip.tokenize(captions))


IMAGES = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
CAPTIONS = ["a photo of a sandal.", "a catalogue image of an ankle boot.", "a bag"]


def test_default_model_is_registered_with_its_json(default_clip, defaults):
    config = json.loads((MODEL_CONFIG_DIR / f"{DEFAULT_MODEL}.json").read_text())
    assert DEFAULT_MODEL in open_clip.list_models() and DEFAULT_MODEL in project_models()
    assert defaults.values.model.name in project_models()  # params.yaml's model ships with the project
    assert open_clip.get_model_config(DEFAULT_MODEL) == config
    visual = default_clip.model.visual
    assert default_clip.image_size == 28 and visual.grid_size == (7, 7)  # 4x4 patches: 49 tokens
    assert visual.conv1.out_channels == config["vision_cfg"]["width"]
    assert default_clip.model.context_length == config["text_cfg"]["context_length"]
    assert default_clip.model.text_projection.shape[1] == config["embed_dim"]
    assert not default_clip.model.training  # built for inference; train() switches it


def test_scratch_model_round_trips_through_a_checkpoint(default_clip, scratch, tmp_path):
    path = save_rgb_clip(default_clip, tmp_path / "model.pt")
    loaded = create_rgb_clip(scratch(checkpoint=str(path)), device="cpu")
    for before, after in zip(encode(default_clip, IMAGES, CAPTIONS), encode(loaded, IMAGES, CAPTIONS)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert loaded.image_mean == default_clip.image_mean and loaded.image_std == default_clip.image_std


def test_open_clip_and_training_checkpoints_load(default_clip, scratch, tmp_path):
    # open_clip's training checkpoints keep the weights under "state_dict", DDP-prefixed with "module.".
    state = {f"module.{k}": v for k, v in default_clip.model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    save_torch({"format": CHECKPOINT_FORMAT, "model": default_clip.model.state_dict()}, tmp_path / "last.pt")
    expected = encode(default_clip, IMAGES, CAPTIONS)
    for name in ("epoch_3.pt", "last.pt"):
        loaded = create_rgb_clip(scratch(checkpoint=str(tmp_path / name)), device="cpu")
        for before, after in zip(expected, encode(loaded, IMAGES, CAPTIONS)):
            torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_unknown_model_name_lists_the_registered_ones(scratch):
    with pytest.raises(ValueError, match=r"unknown model 'ViT-Tiny-99'.*'gsclip-vit-tiny-28'.*'ViT-B-32'"):
        create_rgb_clip(scratch(name="ViT-Tiny-99"), device="cpu")


def test_missing_checkpoint_names_the_file(scratch, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match=r"model checkpoint not found: .*nowhere/model\.pt"):
        create_rgb_clip(scratch(checkpoint=str(missing)), device="cpu")


def test_mismatched_checkpoint_is_refused(default_clip, scratch, tmp_path):
    state = default_clip.model.state_dict()
    state["visual.proj"] = torch.zeros(7, 7)  # a different width
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"(?s)other\.pt does not fit the model 'gsclip-vit-tiny-28'.*visual\.proj"):
        create_rgb_clip(scratch(checkpoint=str(tmp_path / "other.pt")), device="cpu")
    path = save_rgb_clip(default_clip, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"holds a 'gsclip-vit-tiny-28' model, not 'ViT-B-32'"):
        create_rgb_clip(scratch(name="ViT-B-32", checkpoint=str(path)), device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read the model checkpoint .*junk\.pt"):
        create_rgb_clip(scratch(checkpoint=str(tmp_path / "junk.pt")), device="cpu")


def test_pretrained_tags_come_from_the_local_cache_only(scratch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the network
    with pytest.raises(FileNotFoundError, match=r"'ViT-B-32' / 'laion2b_s34b_b79k' are not in the local cache"):
        cached_pretrained_file("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'no-such-tag' for 'ViT-B-32'"):
        create_rgb_clip(scratch(name="ViT-B-32", pretrained="no-such-tag"), device="cpu")
    # A file in the Hugging Face hub cache layout is found without a download.
    snapshot = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    refs = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    found = cached_pretrained_file("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert found.endswith("snapshots/abc123/open_clip_model.safetensors")


def test_prepare_images_repeats_gray_resizes_and_normalizes(default_clip):
    gray = torch.full((2, 1, 14, 14), 0.5)
    prepared = default_clip.prepare_images(gray)
    assert prepared.shape == (2, 3, 28, 28)
    mean = torch.tensor(default_clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(default_clip.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(prepared, ((0.5 - mean) / std).expand(2, 3, 28, 28))
    rgb = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(default_clip.prepare_images(rgb) * std + mean, rgb)
    with pytest.raises(ValueError, match=r"images must be \[B, 1 or 3, H, W\]"):
        default_clip.prepare_images(torch.rand(2, 28, 28))

