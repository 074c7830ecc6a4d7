"""Run by tests/training/test_loop.py under ``torchrun --nproc_per_node=2``: RGB pretraining with DDP.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training/ddp_train_script.py WORK``
where ``WORK`` holds ``model.json`` (a tiny open_clip config) and ``shards/train-*.tar``. Each rank
trains twice: straight through 2 epochs, and interrupted after epoch 1 then resumed from the
checkpoint. It writes ``WORK/rank<r>.json``: the keys of the samples it read, a hash of its final
trainable parameters after either run, and what the runs report. Its configs are params.yaml's with
the values of this test laid over them (a script has no pytest fixtures).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import open_clip
import torch

from gsclip_lib import distributed
from gsclip_lib.params import PretrainConfig, load_params
from gsclip_lib.stages import pretrain as rgb_pretrain
from gsclip_lib.stages.pretrain import pretrain_rgb

MODEL_NAME = "model"  # the stem of WORK/model.json
REPO = Path(__file__).resolve().parents[2]


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

    params = load_params(REPO / "params.yaml")
    optim = params.pretrain.optim.replace(epochs=2, batch_size=8, lr=2e-3, weight_decay=0.1, warmup_steps=2,
                                          grad_clip=1.0, seed=0, log_every=1)
    model_config = params.model.replace(name=MODEL_NAME, pretrained="", checkpoint="")
    data = params.data.replace(train_shards=str(work / "shards" / "train-*.tar"), image_size=8, channels=1,
                               resize_mode="center_crop")

    def config(folder: str) -> PretrainConfig:
        return params.pretrain.replace(optim=optim, checkpoint_dir=str(work / folder))

    straight = pretrain_rgb(model_config, config("straight"), data, progress=False)
    interrupt_at_epoch.append(1)
    try:
        pretrain_rgb(model_config, config("resumed"), data, progress=False)
        raise AssertionError("the interrupted run did not stop")
    except KeyboardInterrupt:
        pass
    interrupt_at_epoch.clear()
    resumed = pretrain_rgb(model_config, config("resumed"), data, progress=False)

    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "collective_device": str(distributed.collective_device()),
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
