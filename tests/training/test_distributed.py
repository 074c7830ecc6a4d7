"""gsclip_lib.distributed in a single process: its helpers are no-ops, ranks come from torchrun's
environment. Data-parallel training under torchrun (two CPU processes, gloo) is tested with the
training loop, in tests/training/test_loop.py."""

from __future__ import annotations

import pytest
import torch

from gsclip_lib import distributed
from gsclip_lib.distributed import resolve_rank


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
    assert distributed.resolve_rank() == (0, 1)


def test_rank_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (1, 3)
    assert resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        resolve_rank(2, 2)


def test_rank_before_the_process_group_starts_is_torchruns(monkeypatch):
    """Before ``init_distributed`` every helper agrees on torchrun's rank: only rank 0 is the main
    one, and collectives span one process until the group exists."""
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.rank_and_world_size() == (2, 4)
    assert not distributed.is_main()
    assert distributed.process_group_size() == 1
    assert distributed.all_gather_objects("x") == ["x"]
