"""Batches of an epoch: seeded, the same on a rerun, so that a resumed run equals an uninterrupted one.

Every training stage shuffles with :func:`epoch_permutation`, a permutation drawn from the seed, the
epoch and the rank alone (never from a global random state), and cuts it into full batches; under
``torchrun`` every rank takes the same number of steps (:func:`steps_per_epoch`), the smallest
rank's, so no rank waits for a batch that will not come.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsclip_lib import distributed


def epoch_permutation(count: int, seed: int, epoch: int, rank: int = 0) -> Tensor:  # [count] int64
    """The order of an epoch's samples, from ``(seed, epoch, rank)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    return torch.randperm(count, generator=generator)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches per epoch (one short batch when there are fewer samples than a batch), the
    smallest over the ranks when torch.distributed is initialized."""
    return distributed.all_reduce_min(max(1, num_samples // batch_size))
