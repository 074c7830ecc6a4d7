"""Streaming training data (gsclip_lib.data.streaming): seeded epochs, resumable at any batch with
or without DataLoader workers, skips counted, and clear errors instead of hangs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS
from gsclip_lib.data.image_text_shards import ImageTextShards, collate_image_text, write_image_text_shards
from gsclip_lib.data.streaming import (
    SkipTally,
    StreamPlan,
    check_enough_shards,
    count_samples,
    epoch_batches,
    rank_steps_per_epoch,
)
from gsclip_lib.errors import InputError


def write_shards(folder: Path, count: int = 48, per_shard: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    samples = ((f"s{i:04d}", rng.integers(0, 255, (4, 4), dtype=np.uint8), f"caption {i % 5}", {"label": i % 5})
               for i in range(count))
    return write_image_text_shards(samples, str(folder / "train-%06d.tar"), per_shard)


def plan_for(shards, **changes) -> StreamPlan:
    values = dict(shards=tuple(shards), batch_size=4, seed=3, rank=0, world_size=1, num_workers=0, shuffle_buffer=16)
    values.update(changes)
    return StreamPlan(**values)


def keys_of(plan: StreamPlan, epoch: int, start: int, steps: int) -> list[list[str]]:
    reader = ImageTextShards(list(plan.shards), image_size=4, channels=1)
    batches = epoch_batches(plan, reader.decode_sample, collate_image_text, epoch, start)
    return [next(batches).keys for _ in range(steps)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("stream"))


def test_an_epoch_of_one_pass_reads_every_sample_once_in_a_seeded_order(shards):
    plan = plan_for(shards)
    first = keys_of(plan, epoch=0, start=0, steps=12)
    flat = [key for batch in first for key in batch]
    assert sorted(flat) == [f"s{i:04d}" for i in range(48)]  # a buffer never mixes two passes
    assert flat != sorted(flat)  # shuffled...
    assert keys_of(plan, epoch=0, start=0, steps=12) == first  # ...the same way every time
    assert keys_of(plan, epoch=1, start=0, steps=12) != first  # and another way next epoch
    more = keys_of(plan, epoch=0, start=0, steps=15)  # past the pass: a new pass goes on
    assert more[:12] == first and all(key in flat for batch in more[12:] for key in batch)


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_starting_at_batch_k_gives_the_rest_of_the_epoch(shards, num_workers):
    plan = plan_for(shards, num_workers=num_workers)
    whole = keys_of(plan, epoch=2, start=0, steps=12)
    for start in (1, 5, 7):
        assert keys_of(plan, epoch=2, start=start, steps=12 - start) == whole[start:], start


def test_ranks_read_disjoint_halves(shards):
    halves = [{key for batch in keys_of(plan_for(shards, rank=r, world_size=2), 0, 0, 6) for key in batch}
              for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == 24 and not halves[0] & halves[1]


def test_sample_counts_come_from_the_tar_headers(shards):
    assert count_samples(shards, IMAGE_EXTENSIONS) == 48
    assert count_samples(shards[:2], IMAGE_EXTENSIONS) == 16
    assert count_samples(shards, ("gs",)) == 0
    assert rank_steps_per_epoch(plan_for(shards), IMAGE_EXTENSIONS, 0) == 12
    assert rank_steps_per_epoch(plan_for(shards, world_size=2, rank=1), IMAGE_EXTENSIONS, 0) == 6
    assert rank_steps_per_epoch(plan_for(shards, world_size=2), IMAGE_EXTENSIONS, 1000) == 125


def test_fewer_shards_than_ranks_times_workers_is_refused_in_one_line(shards):
    check_enough_shards(shards, 2, 3, "train")  # 6 shards, 6 readers
    with pytest.raises(InputError, match=r"train: 6 shard\(s\) for 2 rank\(s\) x 4 loader worker\(s\).* at least 8 shards"):
        check_enough_shards(shards, 2, 4, "train")


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path, count=16, per_shard=8)
    broken = tmp_path / "train-000002.tar"
    with tarfile.open(broken, "w") as archive:
        for key in ("bad0", "bad1"):
            for extension, data in (("png", b"not a png"), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    plan = plan_for([*shards, str(broken)], shuffle_buffer=0)
    reader = ImageTextShards(list(plan.shards), image_size=4, channels=1)
    tally = SkipTally()
    batches = tally.counted(0, epoch_batches(plan, reader.decode_sample, collate_image_text, 0))
    keys = [key for _, batch in zip(range(4), batches) for key in batch.keys]
    assert len(keys) == 16 and not any(key.startswith("bad") for key in keys)
    counts = tally.first_epoch()
    assert counts.good == 16 and counts.undecodable_image == 2


def test_shards_without_a_single_good_sample_raise_instead_of_hanging(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        for extension, data in (("png", b"junk"), ("txt", b"caption")):
            info = tarfile.TarInfo(f"only.{extension}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    plan = plan_for([str(path)])
    reader = ImageTextShards([str(path)], image_size=4, channels=1)
    with pytest.raises(InputError, match="found no usable sample"):
        next(epoch_batches(plan, reader.decode_sample, collate_image_text, 0))
