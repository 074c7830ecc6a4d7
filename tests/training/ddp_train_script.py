"""Run by tests/training/test_loop.py under ``torchrun --nproc_per_node=2``: RGB pretraining with DDP.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training/ddp_train_script.py WORK MODE``
where ``WORK`` holds ``model.json`` (a tiny open_clip config) and ``shards/train-*.tar``, and ``MODE``
is one of

- ``straight``: 2 epochs of 4 steps into ``WORK/straight``, checkpoints every 3 steps;
- ``killed``: the same into ``WORK/resumed``, but rank 1 sends itself SIGKILL right after its 4th
  optimizer step (before that step's checkpoint), so torchrun tears the job down and the last
  checkpoint on disk is step 3's, in the middle of epoch 1;
- ``resumed``: the same again, which continues from that checkpoint.

Each rank streams its shards with two DataLoader workers. It writes ``WORK/<mode>-rank<r>.json``:
the keys of the samples it read in its first epoch, a hash of its final trainable parameters and
what the run reports. Its configs are params.yaml's with this test's values laid over them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import open_clip
import torch

from gsclip_lib import distributed
from gsclip_lib.data import streaming
from gsclip_lib.params import PretrainConfig, load_params
from gsclip_lib.stages import pretrain as rgb_pretrain
from gsclip_lib.stages.pretrain import pretrain_rgb

MODEL_NAME = "model"  # the stem of WORK/model.json
REPO = Path(__file__).resolve().parents[2]
KILL_AFTER_STEP = 4  # rank 1 dies after this optimizer step, before its checkpoint
CHECKPOINT_EVERY = 3


def parameter_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(work: Path, mode: str) -> None:
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    open_clip.add_model_config(work / f"{MODEL_NAME}.json")

    # Spies on the functions the stage runs: what this rank read (the stream's epochs), and its model
    # when training ends.
    first_epoch_keys: list[str] = []
    final_hashes: list[str] = []
    train, batches = rgb_pretrain.train, streaming.epoch_batches

    def spy_batches(plan, decode, collate, epoch, start=0):
        for batch in batches(plan, decode, collate, epoch, start):
            if epoch == 0:
                first_epoch_keys.extend(batch.keys)
            yield batch

    def spy_train(model, *args, after_step=None, **kwargs):
        steps = {"done": 0}

        def counting(unwrapped):
            after_step(unwrapped)
            steps["done"] += 1
            if mode == "killed" and info.rank == 1 and steps["done"] == KILL_AFTER_STEP:
                os.kill(os.getpid(), signal.SIGKILL)

        result = train(model, *args, after_step=counting, **kwargs)
        final_hashes.append(parameter_hash(model))
        return result

    rgb_pretrain.train, streaming.epoch_batches = spy_train, spy_batches

    params = load_params(REPO / "params.yaml")
    optim = params.pretrain.optim.replace(epochs=2, batch_size=8, lr=2e-3, weight_decay=0.1, warmup_steps=2,
                                          grad_clip=1.0, seed=0, log_every=1, checkpoint_every=CHECKPOINT_EVERY)
    loader = params.pretrain.loader.replace(num_workers=2, shuffle_buffer=8, samples_per_epoch=0)
    model_config = params.model.replace(name=MODEL_NAME, pretrained="", checkpoint="")
    data = params.data.replace(train_shards=str(work / "shards" / "train-*.tar"), image_size=8, channels=1,
                               resize_mode="center_crop")
    folder = "straight" if mode == "straight" else "resumed"
    config: PretrainConfig = params.pretrain.replace(optim=optim, loader=loader, checkpoint_dir=str(work / folder))
    metrics = pretrain_rgb(model_config, config, data, progress=False)

    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "collective_device": str(distributed.collective_device()),
        "keys": first_epoch_keys,
        "hash": final_hashes[-1],
        "run": {k: metrics[k] for k in ("steps", "resumed_from_step", "train_images", "global_batch_size")},
        "losses": [row["loss"] for row in metrics["history"]],
    }
    (work / f"{mode}-rank{info.rank}.json").write_text(json.dumps(report))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
