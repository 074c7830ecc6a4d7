"""Splat shards, the format: writing whole shards, reading them back, collating, rank split, examples.

The splats stored here are random (the ``random_splats`` fixture): this module stores and reads
whatever it is given. Fitting images into shards and pruning them into levels are the fit and prune
stages' loops (tests/stages).
"""

import os
import tarfile
from functools import partial

import numpy as np
import pytest
import torch

from gsclip_lib.data.image_text_shards import write_image_text_shards
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.tar_shards import list_shards
from gsclip_lib.data.splat_shards import (
    collate_splats,
    open_splat_shard,
    read_level_examples,
    shard_is_complete,
    shards_of_this_rank,
    splat_dataset,
    splat_shard_name,
    verify_splat_shard,
)
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import decode_splats, encode_splats, payload_bytes, record_bytes

SIZE, SPLATS = 8, 16


def image_shards(folder, count: int, per_shard: int) -> list[str]:
    """``count`` smooth RGB images of ``SIZE`` x ``SIZE`` with captions and labels, as shards."""
    grid = np.linspace(0, 1, SIZE)
    samples = []
    for i in range(count):
        phase = i / count
        image = np.stack(
            [np.outer(grid, grid) * (1 - phase), np.outer(grid, 1 - grid) * phase + 0.2, np.full((SIZE, SIZE), 0.1 * (i % 5))],
            axis=-1,
        )
        samples.append((f"img{i:03d}", (image * 255).round().astype(np.uint8), f"caption {i}", {"label": i % 3}))
    return write_image_text_shards(samples, os.path.join(folder, "train-%06d.tar"), per_shard)


def write_splat_shards(folder, splats, per_shard: int) -> list[str]:
    """One sample per image of ``splats`` (keys ``img000``, ...), ``per_shard`` to a shard, written
    as the fit stage writes them; returns the shard paths."""
    paths = []
    for first in range(0, splats.batch_size, per_shard):
        final = os.path.join(folder, f"train-{first // per_shard:06d}.tar")
        with open_splat_shard(final) as writer:
            for index in range(first, min(first + per_shard, splats.batch_size)):
                record = encode_splats(splats, index, SIZE, SIZE)
                count = int(splats.valid[index].sum())
                metadata = {
                    "N": count, "C": splats.channels, "H": SIZE, "W": SIZE, "psnr": None, "bytes": len(record),
                    "payload_bytes": payload_bytes(count, splats.channels), "source_key": f"img{index:03d}",
                    "label": index % 3,
                }
                writer.write(f"img{index:03d}", record, f"caption {index}", metadata)
            assert writer.samples == min(per_shard, splats.batch_size - first)
            assert writer.record_bytes == writer.samples * record_bytes(splats.num_slots, splats.channels)
        paths.append(final)
    return paths


@pytest.fixture
def written(tmp_path, random_splats):
    splats = random_splats(10, SPLATS, 3, height=SIZE, width=SIZE, scale=(0.5, 2.0))
    paths = write_splat_shards(tmp_path / "gs16", splats, 4)
    return tmp_path, paths, splats


def test_writer_stores_one_sample_per_image(written, shard_samples):
    root, paths, splats = written
    assert list_shards(root / "gs16") == paths
    assert sorted(os.listdir(root / "gs16")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stored = shard_samples(paths[0])
    assert sorted(stored) == ["img000", "img001", "img002", "img003"]
    with tarfile.open(paths[0]) as archive:
        assert sorted(archive.getnames()[:3]) == ["img000.gs", "img000.json", "img000.txt"]
        assert archive.extractfile("img001.txt").read() == b"caption 1"
    record, meta = stored["img001"]
    assert meta["N"] == SPLATS and (meta["C"], meta["H"], meta["W"]) == (3, SIZE, SIZE)
    assert meta["bytes"] == len(record) == record_bytes(SPLATS, 3)
    assert meta["payload_bytes"] == SPLATS * 8 * 2
    decoded = decode_splats(record)
    assert decoded.num_splats == SPLATS and (decoded.height, decoded.width) == (SIZE, SIZE)
    torch.testing.assert_close(decoded.splats.positions[0], splats.positions[1].half().float(), rtol=0, atol=0)
    # The same samples give the same bytes: tar members carry a fixed time.
    again = write_splat_shards(root / "again", splats, 4)
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in paths]


def test_splat_reader_and_padding_collate(written):
    root, _, _ = written
    dataset = splat_dataset(str(root / "gs16" / "train-{000000..000002}.tar"))
    samples = list(dataset)
    assert [s.key for s in samples] == [f"img{i:03d}" for i in range(10)]
    assert [s.caption for s in samples] == [f"caption {i}" for i in range(10)]
    assert [s.label for s in samples] == [i % 3 for i in range(10)]
    assert dataset.skip_counts == SkipCounts(good=10)
    batch = collate_splats(samples[:4], num_slots=20)
    assert batch.splats.positions.shape == (4, 20, 2) and (batch.height, batch.width) == (SIZE, SIZE)
    assert batch.splats.valid.sum(1).tolist() == [SPLATS] * 4 and not batch.splats.valid[:, SPLATS:].any()
    torch.testing.assert_close(batch.splats.colours[1, :SPLATS], samples[1].splats.colours[0])
    assert batch.labels.tolist() == [0, 1, 2, 0] and batch.skips == SkipCounts(good=4)
    halves = [{s.key for s in splat_dataset(root / "gs16", rank=rank, world_size=2)} for rank in (0, 1)]
    assert halves[0].isdisjoint(halves[1]) and len(halves[0] | halves[1]) == 10


def test_collate_binds_a_fixed_slot_count(written):
    root, _, _ = written
    samples = list(splat_dataset(root / "gs16" / "train-000002.tar"))
    batch = partial(collate_splats, num_slots=32)(samples)
    assert batch.splats.valid.shape == (2, 32) and batch.record_bytes.tolist() == [record_bytes(SPLATS, 3)] * 2
    with pytest.raises(ValueError):
        collate_splats(samples, num_slots=4)
    with pytest.raises(ValueError, match="empty batch"):
        collate_splats([])


def test_broken_shards_fail_verification(written):
    root, paths, splats = written
    assert [verify_splat_shard(path) for path in paths] == [4, 4, 2]
    broken = paths[1]
    data = open(broken, "rb").read()
    with open(broken, "wb") as handle:
        handle.write(data[: len(data) // 3])
    with pytest.raises(ValueError):
        verify_splat_shard(broken)
    # A shard that exists counts as done; on request it must also read through.
    assert shard_is_complete(broken) and not shard_is_complete(broken, verify=True)
    assert shard_is_complete(paths[0], verify=True)
    assert not shard_is_complete(str(root / "gs16" / "absent.tar"))

    # A .json whose N disagrees with the record is refused too.
    lying = root / "lying" / "train-000000.tar"
    with open_splat_shard(lying) as writer:
        writer.write("img000", encode_splats(splats, 0, SIZE, SIZE), "caption", {"N": SPLATS - 1})
    with pytest.raises(ValueError, match=f"stores {SPLATS} splats, its .json says {SPLATS - 1}"):
        verify_splat_shard(lying)


def test_an_interrupted_write_leaves_no_shard(tmp_path, random_splats):
    record = encode_splats(random_splats(1, SPLATS, 3, height=SIZE, width=SIZE), 0, SIZE, SIZE)
    final = tmp_path / "gs" / "train-000001.tar"
    with pytest.raises(RuntimeError, match="the fit broke"):
        with open_splat_shard(final) as writer:
            writer.write("img000", record, "caption", {"N": SPLATS})
            raise RuntimeError("the fit broke")
    assert os.listdir(tmp_path / "gs") == []  # neither the shard nor its temporary file

    # A killed process leaves its temporary file behind; the next write of that shard clears it.
    stale = tmp_path / "gs" / ".train-000001.tar.0123456789ab.partial"
    stale.write_bytes(b"half a shard")
    assert list_shards(tmp_path / "gs") == []  # hidden: never taken for a shard
    with open_splat_shard(final) as writer:
        writer.write("img000", record, "caption", {"N": SPLATS})
    assert os.listdir(tmp_path / "gs") == ["train-000001.tar"]
    assert verify_splat_shard(final) == 1


def test_ranks_take_disjoint_shards_with_distinct_names(tmp_path):
    sources = image_shards(str(tmp_path / "images"), 6, 2)
    assert len(sources) == 3
    halves = [shards_of_this_rank(sources, rank, 2) for rank in (0, 1)]
    assert halves == [[sources[0], sources[2]], [sources[1]]]
    assert shards_of_this_rank(sources, 0, 1) == sources
    assert splat_shard_name(sources[1]) == "train-000001.tar"
    assert splat_shard_name("/data/web/00012.tar.gz") == splat_shard_name("00012.tgz") == "00012.tar"
    # Two inputs that would write the same splat shard are refused before anything is written.
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "train-000001.tar.gz"
    twin.write_bytes(b"")
    with pytest.raises(InputError, match="would both write train-000001.tar"):
        shards_of_this_rank([*sources, str(twin)], 0, 1)
    with pytest.raises(ValueError, match="rank"):
        shards_of_this_rank(sources, 2, 2)


def test_level_examples_match_images_and_levels_by_key(tmp_path, random_splats):
    sources = image_shards(str(tmp_path / "images"), 6, 4)
    large = random_splats(6, SPLATS, 3, height=SIZE, width=SIZE, seed=1)
    small = random_splats(6, 4, 3, height=SIZE, width=SIZE, seed=2)
    write_splat_shards(tmp_path / "N16", large, 4)
    # The smaller level lacks img001: an example must be found at every level.
    write_splat_shards(tmp_path / "N4", small, 4)
    os.remove(tmp_path / "N4" / "train-000000.tar")
    with open_splat_shard(tmp_path / "N4" / "train-000000.tar") as writer:
        for index in (0, 2, 3):
            writer.write(f"img{index:03d}", encode_splats(small, index, SIZE, SIZE), f"caption {index}", {"N": 4})

    examples = read_level_examples(
        {16: tmp_path / "N16", 4: tmp_path / "N4"}, sources, image_size=SIZE, channels=3,
        resize_mode="center_crop", count=3,
    )
    assert examples.keys == ["img000", "img002"]
    assert examples.captions == ["caption 0", "caption 2"]
    assert examples.images.shape == (2, 3, SIZE, SIZE)
    assert examples.splats[16].positions.shape == (2, SPLATS, 2) and examples.splats[4].positions.shape == (2, 4, 2)
    torch.testing.assert_close(examples.splats[16].colours[1], large.colours[2].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(examples.splats[4].colours[1], small.colours[2].half().float(), rtol=0, atol=0)
    gray = read_level_examples({16: tmp_path / "N16"}, sources, image_size=4, channels=1, resize_mode="resize")
    assert gray.images.shape == (6, 1, 4, 4)
    elsewhere = write_image_text_shards(
        [("other", np.zeros((SIZE, SIZE, 3), np.uint8), "c", {})], str(tmp_path / "elsewhere-%06d.tar"), 4
    )
    with pytest.raises(InputError, match="found its image"):
        read_level_examples({16: tmp_path / "N16"}, elsewhere, image_size=SIZE, channels=3, resize_mode="center_crop")
