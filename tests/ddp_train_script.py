"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: RGB pretraining with DDP.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_train_script.py WORK``
where ``WORK`` holds ``model.json`` (a tiny open_clip config) and ``shards/train-*.tar``. Each rank
trains twice: straight through 2 epochs, and interrupted after epoch 1 then resumed from the
checkpoint. It writes ``WORK/rank<r>.json``: the keys of the samples it read, a hash of its final
trainable parameters after either run, and what the runs report.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import open_clip
import torch

from gsclip_lib import distributed, rgb_pretrain
from gsclip_lib.clip_models import RgbModelConfig
from gsclip_lib.rgb_pretrain import PretrainConfig, pretrain_rgb
from gsclip_lib.training import OptimConfig

MODEL_NAME = "model"  # the stem of WORK/model.json


def parameter_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(work: Path) -> None:
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    open_clip.add_model_config(work / f"{MODEL_NAME}.json")

    # Spies on the module's own functions: what this rank read, and its model when training ends.
    read_keys: list[list[str]] = []
    final_hashes: list[str] = []
    interrupt_at_epoch: list[int] = []
    load, train, batches = rgb_pretrain.load_image_text_set, rgb_pretrain.train, rgb_pretrain.epoch_batches

    def spy_load(*args, **kwargs):
        data = load(*args, **kwargs)
        read_keys.append(list(data.keys))
        return data

    def spy_train(model, *args, **kwargs):
        result = train(model, *args, **kwargs)
        final_hashes.append(parameter_hash(model))
        return result

    def spy_batches(data, batch_size, epoch, seed, rank=0):
        if epoch in interrupt_at_epoch:
            raise KeyboardInterrupt(f"rank {info.rank} stops as epoch {epoch} starts")
        return batches(data, batch_size, epoch, seed, rank)

    rgb_pretrain.load_image_text_set, rgb_pretrain.train, rgb_pretrain.epoch_batches = spy_load, spy_train, spy_batches

    optim = OptimConfig(epochs=2, batch_size=8, lr=2e-3, weight_decay=0.1, warmup_steps=2, seed=0, log_every=1)
    model_config = RgbModelConfig(name=MODEL_NAME)

    def config(folder: str) -> PretrainConfig:
        return PretrainConfig(train_shards=str(work / "shards" / "train-*.tar"), image_size=8, channels=1,
                              optim=optim, checkpoint_dir=str(work / folder))

    straight = pretrain_rgb(model_config, config("straight"), progress=False)
    interrupt_at_epoch.append(1)
    try:
        pretrain_rgb(model_config, config("resumed"), progress=False)
        raise AssertionError("the interrupted run did not stop")
    except KeyboardInterrupt:
        pass
    interrupt_at_epoch.clear()
    resumed = pretrain_rgb(model_config, config("resumed"), progress=False)

    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "keys": read_keys[0],
        "straight_hash": final_hashes[0],
        "resumed_hash": final_hashes[-1],
        "straight": {k: straight[k] for k in ("steps", "resumed_from_step", "train_images", "global_batch_size")},
        "resumed": {k: resumed[k] for k in ("steps", "resumed_from_step")},
        "straight_losses": [row["loss"] for row in straight["history"]],
        "resumed_losses": [row["loss"] for row in resumed["history"]],
    }
    (work / f"rank{info.rank}.json").write_text(json.dumps(report))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
