"""Data-parallel training under torchrun (two CPU processes, gloo) and the single-process no-ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gsclip_lib import distributed
from test_training import TINY_CLIP, write_synthetic_shards

SCRIPT = Path(__file__).parent / "ddp_train_script.py"
REPO = Path(__file__).parent.parent


def test_two_ranks_train_disjoint_shards_into_one_model(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(TINY_CLIP))
    (tmp_path / "shards").mkdir()
    write_synthetic_shards(tmp_path / "shards", count=64, per_shard=16)  # 4 shards: 2 per rank
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"}
    keys = [set(r["keys"]) for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 32 and not keys[0] & keys[1]  # disjoint halves...
    assert keys[0] | keys[1] == {f"sample{i:05d}" for i in range(64)}  # ...of the whole set
    assert ranks[0]["straight"] == {"steps": 8, "resumed_from_step": 0, "train_images": 64, "global_batch_size": 16}

    # DDP averaged the gradients: both replicas end with the same parameters, although each saw other data.
    assert ranks[0]["straight_hash"] == ranks[1]["straight_hash"]
    # Interrupted after epoch 1 and resumed from rank 0's checkpoint: the same parameters, on every rank.
    assert [r["resumed"] for r in ranks] == [{"steps": 8, "resumed_from_step": 4}] * 2
    assert {r["resumed_hash"] for r in ranks} == {ranks[0]["straight_hash"]}
    assert ranks[0]["resumed_losses"] == ranks[0]["straight_losses"] == ranks[1]["straight_losses"]
    assert (tmp_path / "straight" / "model.pt").is_file() and (tmp_path / "resumed" / "last.pt").is_file()
    assert not [p for p in (tmp_path / "straight").iterdir() if p.name.startswith(".")]  # no temporary left


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed.is_main() and distributed.rank_and_world_size() == (0, 1)
    value = torch.tensor([1.5, -2.0])
    mean = distributed.all_reduce_mean(value)
    torch.testing.assert_close(mean, value)
    assert mean is not value
    assert distributed.all_reduce_min(7) == 7 and distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup()
