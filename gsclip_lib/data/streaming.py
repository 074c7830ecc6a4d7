"""Training data as a stream of batches: bounded memory, seeded order, resumable mid-epoch.

The training stages (RGB pretraining, both alignment stages) never hold their data set: each epoch
is a webdataset pipeline that reads this rank's shards, shuffles a bounded buffer of raw samples,
decodes them and batches them, in DataLoader worker processes when ``loader.num_workers > 0``.
Memory is the shuffle buffer plus a few batches, whatever the size of the data set
(``benchmarks/memory.py`` measures it).

One epoch of one rank, as :class:`EpochStream` builds it::

    pass p = 0, 1, 2, ...:   all shards, shuffled by (seed, epoch, p), the same on every rank
      -> rank r takes shards r, r + R, ...            (as webdataset's split_by_node)
      -> worker w takes every W-th of those           (as webdataset's split_by_worker)
      -> tar members grouped into raw samples         (iter_tar_samples: broken shards counted)
      -> wds.shuffle(buffer) of the raw bytes         (seeded by seed, epoch, rank, worker, pass)
      -> decode; bad samples skipped and counted      (SkipCounts travel with the samples)
      -> wds.batched(batch_size, partial=False)

Every worker's stream repeats its shards pass after pass, so it never runs dry; an epoch is a fixed
number of steps (``steps_per_epoch``: this rank's sample count divided by the batch, the smallest over
ranks, or ``loader.samples_per_epoch`` when given), and every rank takes exactly that many, so no rank
waits in a collective for a batch that will not come. The DataLoader takes batches from its workers
in turn, so global batch ``i`` is batch ``i // W`` of worker ``i % W``: the order of an epoch
depends only on ``(seed, epoch, rank, num_workers)`` and the shards.

Resuming at batch ``k`` of an epoch (:func:`gsclip_lib.training.loop.train` checkpoints every
``checkpoint_every`` steps) rebuilds that epoch and fast-forwards it inside the workers: worker ``w``
plays the part of worker ``(w + k) % W`` and drops the batches of that part that come before ``k``,
decoding them (a skipped sample must be recognized as bad to keep the count), so the batches after
``k`` are exactly those an uninterrupted run would have read.

A split with fewer shards than ``world_size * num_workers`` would leave a worker without data:
:func:`check_enough_shards` refuses it with one line before any process starts reading.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from gsclip_lib import distributed
from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.data.tar_shards import RawSample, iter_tar_samples, shards_for_rank
from gsclip_lib.errors import InputError
from gsclip_lib.params import LoaderConfig, OptimConfig

Decode = Callable[[RawSample], Any]  # raw sample -> decoded sample with a ``skips`` attribute; may raise SkipSample
Collate = Callable[[list[Any]], Any]  # decoded samples -> a batch with a ``skips`` attribute


def check_enough_shards(shards: Sequence[str], world_size: int, num_workers: int, what: str) -> None:
    """Raise :class:`InputError` unless every rank's every worker gets at least one shard."""
    readers = world_size * max(1, num_workers)
    if len(shards) < readers:
        raise InputError(
            f"{what}: {len(shards)} shard(s) for {world_size} rank(s) x {max(1, num_workers)} loader worker(s); "
            f"every worker needs a shard of its own: write the data in at least {readers} shards, "
            "or lower the loader's num_workers or the number of processes"
        )


def count_samples(shards: Sequence[str], data_extensions: Sequence[str]) -> int:
    """How many samples ``shards`` hold, from the tar headers alone (no member is decoded).

    A sample counts when it has a member with one of ``data_extensions`` (the image, or the splat
    record). Bad samples that only decoding reveals are counted too; the stream makes up for them by
    reading on into its next pass. Local shards are read with seeks past the members' data; other
    URLs are streamed.
    """
    extensions = tuple(sorted(ext.lower() for ext in data_extensions))
    total = 0
    for url in shards:
        if os.path.isfile(url):  # both alignment stages count the same shards: count a file once
            stat = os.stat(url)
            total += _count_local_shard(url, stat.st_size, stat.st_mtime_ns, extensions)
        else:
            total += _count_shard(url, extensions)
    return total


@functools.lru_cache(maxsize=65536)
def _count_local_shard(path: str, size: int, mtime_ns: int, extensions: tuple[str, ...]) -> int:
    return _count_shard(path, extensions)  # size and mtime make a rewritten file a new entry


def _count_shard(url: str, extensions: tuple[str, ...]) -> int:
    keys: set[str] = set()
    local = os.path.isfile(url)
    try:
        stream = None if local else wds.gopen(url, "rb")
        with tarfile.open(url if local else None, mode="r:*" if local else "r|*", fileobj=stream) as archive:
            for info in archive:
                if not info.isreg():
                    continue
                name = os.path.basename(info.name)
                base, _, extension = name.partition(".")
                if extension.lower() in extensions and not base.startswith("__"):
                    keys.add(os.path.join(os.path.dirname(info.name), base))
    except (tarfile.TarError, OSError, EOFError):
        pass  # a broken shard counts what was listed before the break; the stream counts the fault
    return len(keys)


@dataclass(frozen=True)
class StreamPlan:
    """What fixes an epoch's batches on one rank (everything but the epoch and the start)."""

    shards: tuple[str, ...]  # the split's shards, all ranks'
    batch_size: int  # per rank
    seed: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader worker processes; 0 reads in this process
    shuffle_buffer: int  # raw samples held for shuffling, per worker; 0 or 1: read order

    def rank_shards(self, epoch: int, pass_index: int) -> list[str]:
        """This rank's shards in pass ``pass_index`` of ``epoch`` (one global shuffle, then a split)."""
        shards = list(self.shards)
        random.Random(f"{self.seed}/{epoch}/{pass_index}").shuffle(shards)
        return shards_for_rank(shards, self.rank, self.world_size)


class EpochStream(IterableDataset):
    """The batches of one epoch of one rank from batch ``start`` on (see the module docstring)."""

    def __init__(self, plan: StreamPlan, decode: Decode, collate: Collate, *, epoch: int, start: int = 0) -> None:
        super().__init__()
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.plan = plan
        self.decode = decode
        self.collate = collate
        self.epoch = epoch
        self.start = start

    def _worker(self) -> tuple[int, int]:
        """``(logical worker, workers)``: this process's part after the rotation by ``start``."""
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        physical = info.id if info is not None else 0
        return (physical + self.start) % workers, workers

    def _raw_samples(self, worker: int, workers: int, counts: SkipCounts, pass_sizes: list[int]) -> Iterator[RawSample]:
        """Pass after pass over this worker's shards, each pass shuffled in its own buffer (a buffer
        never mixes two passes, so an epoch that is one pass long reads every sample once)."""
        plan = self.plan
        for pass_index in itertools.count():
            shards = plan.rank_shards(self.epoch, pass_index)[worker::workers]
            if not shards:
                raise InputError(
                    f"rank {plan.rank} worker {worker} has no shard: {len(plan.shards)} shard(s) for "
                    f"{plan.world_size} rank(s) x {workers} worker(s)"
                )
            one_pass = self._one_pass(shards, counts, pass_sizes)
            if plan.shuffle_buffer > 1:
                rng = random.Random(f"{plan.seed}/{self.epoch}/{plan.rank}/{worker}/{pass_index}")
                one_pass = wds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng)(one_pass)
            yield from one_pass

    def _one_pass(self, shards: list[str], counts: SkipCounts, pass_sizes: list[int]) -> Iterator[RawSample]:
        size = 0
        for url in shards:
            for raw in iter_tar_samples(url, counts):
                size += 1
                yield raw
        if size == 0:
            raise InputError(f"rank {self.plan.rank}: its shards {shards[:3]} hold no sample")
        pass_sizes.append(size)

    def _decoded(self, raw_samples: Iterator[RawSample], counts: SkipCounts, pass_sizes: list[int]) -> Iterator[Any]:
        reported = SkipCounts()
        bad_in_a_row = 0
        for raw in raw_samples:
            try:
                sample = self.decode(raw)
            except SkipSample as skip:
                counts.count(skip.reason)
                bad_in_a_row += 1
                if pass_sizes and bad_in_a_row > max(pass_sizes):  # a whole pass without a good sample
                    raise InputError(
                        f"rank {self.plan.rank}: a whole pass over its shards found no usable sample "
                        f"(skipped: {({k: v for k, v in counts.as_dict().items() if v})})"
                    ) from None
                continue
            bad_in_a_row = 0
            counts.good += 1
            sample.skips, reported = counts - reported, counts.copy()
            yield sample

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan
        worker, workers = self._worker()
        counts = SkipCounts()
        pass_sizes: list[int] = []  # raw samples per completed pass of this worker
        batches = iter(wds.DataPipeline(
            functools.partial(self._raw_samples, worker, workers, counts, pass_sizes),
            functools.partial(self._decoded, counts=counts, pass_sizes=pass_sizes),
            wds.batched(plan.batch_size, collation_fn=self.collate, partial=False),
        ))
        # Global batches before ``start`` that belong to this logical worker: i < start, i % W == worker.
        already_read = max(0, -(-(self.start - worker) // workers))
        return itertools.islice(batches, already_read, None)


def epoch_batches(
    plan: StreamPlan, decode: Decode, collate: Collate, epoch: int, start: int = 0
) -> Iterator[Any]:
    """Batches ``start, start + 1, ...`` of ``epoch`` (without end: the training loop takes what it needs)."""
    stream = EpochStream(plan, decode, collate, epoch=epoch, start=start)
    if plan.num_workers == 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=plan.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2,
    )
    return iter(loader)


def rank_steps_per_epoch(plan: StreamPlan, data_extensions: Sequence[str], samples_per_epoch: int) -> int:
    """This rank's full batches per epoch before the minimum over ranks: ``samples_per_epoch`` (the
    whole split's, shared evenly by the ranks) when positive, else this rank's counted samples."""
    if samples_per_epoch > 0:
        samples = samples_per_epoch // plan.world_size
    else:
        samples = count_samples(plan.rank_shards(0, 0), data_extensions)
    return samples // plan.batch_size


def stream_plan(shards: Sequence[str], optim: OptimConfig, loader: LoaderConfig, *, rank: int, world_size: int,
                what: str) -> StreamPlan:
    """How this rank streams ``shards`` for one training stage (``what`` names them in errors)."""
    check_enough_shards(shards, world_size, loader.num_workers, what)
    return StreamPlan(shards=tuple(shards), batch_size=optim.batch_size, seed=optim.seed, rank=rank,
                      world_size=world_size, num_workers=loader.num_workers, shuffle_buffer=loader.shuffle_buffer)


def steps_every_rank_fills(plan: StreamPlan, data_extensions: Sequence[str], samples_per_epoch: int, *, what: str,
                           batch_setting: str) -> int:
    """The full batches an epoch has on every rank (the minimum over ranks); an error naming ``what``
    and the ``batch_setting`` to lower when a rank cannot fill one."""
    steps = distributed.all_reduce_min(rank_steps_per_epoch(plan, data_extensions, samples_per_epoch))
    if steps < 1:
        raise InputError(
            f"a rank of {plan.world_size} holds fewer samples than one batch of {plan.batch_size} in {what}; "
            f"lower {batch_setting} or use more data"
        )
    return steps


class SkipTally:
    """The skip counts the batches of each epoch carried, as the training loop consumes them."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, SkipCounts] = {}

    def counted(self, epoch: int, batches: Iterator[Any]) -> Iterator[Any]:
        tally = self.by_epoch.setdefault(epoch, SkipCounts())
        for batch in batches:
            tally += batch.skips
            self.by_epoch[epoch] = tally
            yield batch

    def first_epoch(self) -> SkipCounts:
        """The counts of the first epoch this process read (empty when it read none)."""
        return self.by_epoch[min(self.by_epoch)] if self.by_epoch else SkipCounts()


@dataclass
class CountedEpochs:
    """The training loop's ``batches(epoch, first)``: one epoch of ``plan`` from batch ``first`` on,
    the samples it skipped counted in ``tally``."""

    plan: StreamPlan
    decode: Decode
    collate: Collate
    tally: SkipTally

    def __call__(self, epoch: int, first: int) -> Iterator[Any]:
        return self.tally.counted(epoch, epoch_batches(self.plan, self.decode, self.collate, epoch, first))
