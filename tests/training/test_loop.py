"""The training loop (gsclip_lib.training.loop) and RGB pretraining on tiny synthetic image-text shards,
in one process and as two data-parallel ranks under torchrun (tests/training/ddp_train_script.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import write_image_text_shards
from gsclip_lib.errors import InputError
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.stages.pretrain import pretrain_rgb
from gsclip_lib.training.loop import (
    NonFiniteLossError,
    cosine_with_warmup,
    excluded_from_weight_decay,
    load_checkpoint,
    train,
)

SCRIPT = Path(__file__).resolve().parent / "ddp_train_script.py"
REPO = Path(__file__).resolve().parents[2]

# A CLIP small enough to train in seconds: 8x8 inputs, 2x2 patches of 4x4, one block per tower.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 8, "patch_size": 4, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_NAME = "gsclip-test-tiny"
SHAPES = ("horizontal stripes", "vertical stripes", "a checkerboard", "a diagonal")


def register_tiny_clip(folder) -> str:
    path = folder / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return TINY_NAME


def synthetic_samples(count: int, seed: int = 0, size: int = 8):
    """Separable image-text pairs: each class is a texture that fills the image (so every patch
    shows it): horizontal stripes, vertical stripes, a checkerboard, a diagonal; the caption names it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    textures = [rows % 2 == 0, cols % 2 == 0, (rows + cols) % 2 == 0, (rows - cols) % 4 == 0]
    for index in range(count):
        label = index % len(SHAPES)
        image = rng.integers(0, 50, size=(size, size)).astype(np.uint8) + 200 * textures[label].astype(np.uint8)
        yield f"sample{index:05d}", image, f"a photo of {SHAPES[label]}.", {"label": label}


def write_synthetic_shards(folder, count: int = 64, per_shard: int = 16) -> str:
    write_image_text_shards(synthetic_samples(count), str(folder / "train-%06d.tar"), per_shard)
    return str(folder / "train-*.tar")


class TinyNet(nn.Module):
    """A frozen stem, a trainable head with dropout (so the RNG state matters on resume)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(16), nn.Linear(16, 3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.stem(x))


def regression_data(seed: int = 0, count: int = 96):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 6, generator=generator)
    y = x[:, :3] * 2.0 - x[:, 3:]
    return x, y


def make_batches(data, batch_size: int = 16, stop_at_epoch: int | None = None):
    x, y = data

    def batches(epoch: int, first: int):
        if stop_at_epoch is not None and epoch == stop_at_epoch:
            raise KeyboardInterrupt  # the run "dies" as this epoch starts
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + epoch))
        for start in range(first * batch_size, len(x), batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]

    return batches


def mse_loss(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"scale": 1.0}


def fresh_model(head_seed: int) -> TinyNet:
    """The same frozen stem every time (as a pretrained backbone would be); the head drawn from ``head_seed``."""
    torch.manual_seed(1)
    model = TinyNet()
    model.stem.requires_grad_(False)
    torch.manual_seed(head_seed)
    for module in model.head:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait for each
    # other slow a step down tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(defaults):
    return defaults.optim(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.1, warmup_steps=3, grad_clip=1.0, seed=0,
                          log_every=2)


def test_resumed_run_equals_uninterrupted(tmp_path, config):
    data = regression_data()
    config = config.replace(log_every=4)  # rows at steps 4, 6, 8, 12: one at each epoch's end
    straight = fresh_model(head_seed=1)
    result = train(straight, mse_loss, make_batches(data), 6, config, tmp_path / "straight", progress=False)
    assert result.steps == 12 and result.resumed_from_step == 0

    interrupted = fresh_model(head_seed=1)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, mse_loss, make_batches(data, stop_at_epoch=1), 6, config, tmp_path / "resumed",
              progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    torch.manual_seed(12345)  # a new process: other global RNG state, other initial weights
    restarted = fresh_model(head_seed=2)
    resumed = train(restarted, mse_loss, make_batches(data), 6, config, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from_step == 6 and resumed.steps == 12

    # Exactly equal: the same operations on the same numbers, dropout masks included.
    for (name, a), (_, b) in zip(straight.state_dict().items(), restarted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resuming")
    assert [row["step"] for row in result.history] == [4, 6, 8, 12]
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in result.history]


def test_mid_epoch_checkpoint_resumes_on_the_same_batches(tmp_path, config):
    """Checkpoints every 4 steps (6 per epoch); killed at step 11, the run resumes at step 8, in the
    middle of epoch 2, and ends exactly as an uninterrupted run, its history included."""
    data = regression_data()
    config = config.replace(log_every=3, checkpoint_every=4)  # log rows straddle the checkpoints
    straight = fresh_model(head_seed=1)
    result = train(straight, mse_loss, make_batches(data), 6, config, tmp_path / "straight", progress=False)

    steps = {"n": 0}

    def dying(model, batch):
        steps["n"] += 1
        if steps["n"] == 11:
            raise KeyboardInterrupt  # killed during step 11: the last checkpoint is step 8's
        return mse_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(head_seed=1), dying, make_batches(data), 6, config, tmp_path / "resumed", progress=False)
    saved = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (saved["step"], saved["epoch"]) == (8, 1)
    torch.manual_seed(999)
    restarted = fresh_model(head_seed=2)
    resumed = train(restarted, mse_loss, make_batches(data), 6, config, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from_step == 8 and resumed.steps == 12
    for (name, a), (_, b) in zip(straight.state_dict().items(), restarted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after a mid-epoch resume")
    assert [(row["step"], row["loss"]) for row in resumed.history] == [(row["step"], row["loss"]) for row in result.history]


def test_resume_with_other_settings_is_refused(tmp_path, config):
    data = regression_data()
    train(fresh_model(1), mse_loss, make_batches(data), 6, config, tmp_path, progress=False)
    other = config.replace(lr=5e-3, epochs=3)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt.*epochs: 2 in the checkpoint, 3 now.*lr"):
        train(fresh_model(1), mse_loss, make_batches(data), 6, other, tmp_path, progress=False)
    with pytest.raises(ValueError, match="steps_per_epoch: 6 in the checkpoint, 5 now"):
        train(fresh_model(1), mse_loss, make_batches(data), 5, config, tmp_path, progress=False)
    # log_every and checkpoint_every only change what is recorded: resuming with others is allowed
    # (here: nothing left to do).
    done = train(fresh_model(1), mse_loss, make_batches(data), 6, config.replace(log_every=5, checkpoint_every=2),
                 tmp_path, progress=False)
    assert done.resumed_from_step == done.steps == 12


def test_a_checkpoint_cut_short_is_one_line_that_names_the_file(tmp_path, config):
    data = regression_data()
    train(fresh_model(1), mse_loss, make_batches(data), 6, config, tmp_path, progress=False)
    path = tmp_path / "last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a disk that filled up
    with pytest.raises(InputError) as cut:
        train(fresh_model(1), mse_loss, make_batches(data), 6, config, tmp_path, progress=False)
    message = str(cut.value)
    assert "\n" not in message and str(path) in message and "Delete it" in message
    path.write_bytes(b"")
    with pytest.raises(InputError, match="cut short or corrupt"):
        load_checkpoint(path)


def test_training_leaves_the_callers_random_state_alone(tmp_path, config):
    model = fresh_model(1)  # seeds the generator itself
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, mse_loss, make_batches(regression_data()), 6, config, tmp_path, progress=False)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_finished_run_returns_its_final_state(tmp_path, config):
    data = regression_data()
    first = fresh_model(1)
    train(first, mse_loss, make_batches(data), 6, config, tmp_path, progress=False)
    again = fresh_model(3)
    result = train(again, mse_loss, make_batches(data), 6, config, tmp_path, progress=False)
    assert result.steps == result.resumed_from_step == 12
    torch.testing.assert_close(again.head.state_dict(), first.head.state_dict(), rtol=0, atol=0)
    assert int(again.calls) == int(first.calls) == 12  # buffers travel with the checkpoint


def test_frozen_parameters_stay_bit_identical(tmp_path, config):
    model = fresh_model(1)
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    train(model, mse_loss, make_batches(regression_data()), 6, config, tmp_path, progress=False)
    for name, value in model.stem.state_dict().items():
        assert torch.equal(value, stem_before[name]), f"frozen stem.{name} changed"
        assert model.stem.get_parameter(name).grad is None
    assert not torch.equal(model.head[0].weight, head_before["0.weight"])
    saved = load_checkpoint(tmp_path / "last.pt")["model"]
    assert not any(key.startswith("stem.") for key in saved)  # frozen weights are not checkpointed
    assert "calls" in saved


def test_short_run_lowers_the_loss_and_logs(tmp_path, config):
    model = fresh_model(1)
    config = config.replace(epochs=4)
    result = train(model, mse_loss, make_batches(regression_data()), 6, config, tmp_path, progress=False)
    losses = [row["loss"] for row in result.history]
    assert len(result.history) == 12  # every 2nd of 24 steps
    assert losses[-1] < 0.75 * losses[0]
    assert [row["step"] for row in result.history] == list(range(2, 25, 2))
    assert set(result.history[0]) >= {"step", "epoch", "loss", "lr", "scale", "grad_norm"}
    assert result.history[-1]["epoch"] == 4.0


def test_non_finite_loss_names_the_step(tmp_path, config):
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        loss, metrics = mse_loss(model, batch)
        return (loss * math.inf if calls["n"] == 9 else loss), metrics

    expected = r"loss is (inf|nan) at step 9 of 12 \(epoch 2, batch 3\).*last\.pt holds the state after step 6"
    with pytest.raises(NonFiniteLossError, match=expected):
        train(fresh_model(1), exploding, make_batches(regression_data()), 6, config, tmp_path, progress=False)


def test_too_few_batches_is_an_error(tmp_path, config):
    with pytest.raises(ValueError, match=r"ran out after 6 batches; steps_per_epoch=7"):
        train(fresh_model(1), mse_loss, make_batches(regression_data()), 7, config, tmp_path, progress=False)


def test_schedule_and_weight_decay_groups():
    factor = cosine_with_warmup(total_steps=20, warmup_steps=5)
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == pytest.approx(1.0) and factor(20) == pytest.approx(0.0)
    assert factor(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert excluded_from_weight_decay("visual.ln_pre.weight", torch.zeros(4))
    assert excluded_from_weight_decay("logit_scale", torch.zeros(()))
    assert excluded_from_weight_decay("token_embedding.weight", torch.zeros(10, 4))
    assert excluded_from_weight_decay("visual.positional_embedding", torch.zeros(5, 4))
    assert not excluded_from_weight_decay("visual.transformer.resblocks.0.mlp.c_fc.weight", torch.zeros(8, 4))


def test_pretrain_rgb_learns_synthetic_pairs(tmp_path, defaults):
    name = register_tiny_clip(tmp_path)
    spec = write_synthetic_shards(tmp_path)
    optim = defaults.optim(epochs=4, batch_size=16, lr=2e-3, weight_decay=0.0, warmup_steps=4, grad_clip=1.0, seed=0,
                           log_every=4)
    params = defaults.values
    data = params.data.replace(train_shards=spec, image_size=8, channels=1, resize_mode="center_crop")
    config = params.pretrain.replace(optim=optim, checkpoint_dir=str(tmp_path / "rgb"))
    model = defaults.model(name=name, pretrained="", checkpoint="")
    metrics = pretrain_rgb(model, config, data, progress=False)
    assert metrics["train_images"] == 64 and metrics["steps"] == 16
    losses = [row["loss"] for row in metrics["history"]]
    # ln(16) at chance; ln(4) is the floor, as each batch holds about 4 images per caption
    assert losses[-1] < 0.7 * losses[0], losses

    # The saved model classifies its training images zero-shot from the captions.
    clip = create_rgb_clip(model.replace(checkpoint=metrics["model_path"]))
    images = torch.stack([torch.from_numpy(im).float()[None] / 255 for _, im, _, _ in synthetic_samples(64)])
    labels = torch.arange(64) % len(SHAPES)
    with torch.no_grad():
        captions = clip.tokenize([f"a photo of {shape}." for shape in SHAPES])
        text = nn.functional.normalize(clip.model.encode_text(captions), dim=-1)
        image = nn.functional.normalize(clip.model.encode_image(clip.prepare_images(images)), dim=-1)
    accuracy = ((image @ text.T).argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_two_ranks_stream_disjoint_shards_and_resume_after_sigkill(tmp_path):
    """torchrun, two gloo ranks, two loader workers each: a straight run; a run whose rank 1 is
    SIGKILLed mid-epoch (torchrun stops the job); its resumption from the mid-epoch checkpoint,
    which ends with exactly the straight run's parameters and losses."""
    (tmp_path / "model.json").write_text(json.dumps(TINY_CLIP))
    (tmp_path / "shards").mkdir()
    write_synthetic_shards(tmp_path / "shards", count=64, per_shard=16)  # 4 shards: one per rank and worker
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def launch(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
             str(tmp_path), mode],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )

    straight = launch("straight")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-5000:]
    killed = launch("killed")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 3  # mid-epoch 1 (4 steps an epoch)
    resumed = launch("resumed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"straight-rank{r}.json").read_text()) for r in range(2)]
    again = [json.loads((tmp_path / f"resumed-rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"} and {r["collective_device"] for r in ranks} == {"cpu"}
    keys = [set(r["keys"]) for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 32 and not keys[0] & keys[1]  # disjoint halves...
    assert keys[0] | keys[1] == {f"sample{i:05d}" for i in range(64)}  # ...of the whole set, in epoch 1
    assert ranks[0]["run"] == {"steps": 8, "resumed_from_step": 0, "train_images": 64, "global_batch_size": 16}

    # DDP averaged the gradients: both replicas end with the same parameters, although each saw other data.
    assert ranks[0]["hash"] == ranks[1]["hash"]
    # Killed after step 4, resumed from step 3's checkpoint: the same parameters and losses on every rank.
    assert [r["run"]["resumed_from_step"] for r in again] == [3, 3] and {r["run"]["steps"] for r in again} == {8}
    assert {r["hash"] for r in again} == {ranks[0]["hash"]}
    assert again[0]["losses"] == ranks[0]["losses"] == ranks[1]["losses"]
    assert (tmp_path / "straight" / "model.pt").is_file() and (tmp_path / "resumed" / "model.pt").is_file()
    assert not [p for p in (tmp_path / "straight").iterdir() if p.name.startswith(".")]  # no temporary left
