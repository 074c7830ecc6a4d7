"""Splat shards: fitting image shards, resuming a killed fit, pruned levels, reading them back."""

import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

import gsclip_lib.splat_shards as splat_shards_module
from gsclip_lib.codec import decode_splats, record_bytes
from gsclip_lib.fit import FitSettings
from gsclip_lib.prune import prune_by_luminance
from gsclip_lib.shards import SkipCounts, list_shards, write_image_text_shards
from gsclip_lib.splat_shards import (
    collate_splats,
    fit_shards_to_splats,
    prune_splat_shards,
    splat_dataset,
    verify_splat_shard,
)

# Tiny fits: the machinery is under test, not the fit quality (the dense twin needs no compile).
SETTINGS = FitSettings(iterations=2, backend="dense", log_every=1)
SIZE, SPLATS = 8, 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def shard_samples(path) -> dict[str, tuple[bytes, dict]]:
    """key -> (record, json) of a splat shard."""
    import json

    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for info in archive.getmembers():
            key, extension = info.name.split(".", 1)
            members.setdefault(key, {})[extension] = archive.extractfile(info).read()
    return {key: (value["gs"], json.loads(value["json"])) for key, value in members.items()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted")
    sources = image_shards(str(root / "images"), 10, 4)
    stats = fit_shards_to_splats(sources, root / "gs16", SPLATS, SETTINGS, batch_size=3)
    return root, sources, stats


def test_fit_writes_one_splat_shard_per_image_shard(fitted):
    root, sources, stats = fitted
    outputs = list_shards(root / "gs16")
    assert [os.path.basename(p) for p in outputs] == [os.path.basename(p) for p in sources]
    assert (stats.shards_written, stats.shards_skipped, stats.images, stats.dropped_fits) == (3, 0, 10, 0)
    assert stats.skip_counts == SkipCounts(good=10) and stats.skipped == 0
    assert np.isfinite(stats.mean_psnr) and stats.seconds > stats.fit_seconds > 0
    assert stats.record_bytes == 10 * record_bytes(SPLATS, 3)
    assert sorted(os.listdir(root / "gs16")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]

    stored = shard_samples(outputs[0])
    assert sorted(stored) == ["img000", "img001", "img002", "img003"]
    record, meta = stored["img001"]
    assert meta["N"] == SPLATS and (meta["C"], meta["H"], meta["W"]) == (3, SIZE, SIZE)
    assert meta["bytes"] == len(record) == record_bytes(SPLATS, 3)
    assert meta["payload_bytes"] == SPLATS * 8 * 2
    assert meta["source_key"] == "img001" and meta["source_shard"] == "train-000000.tar" and meta["label"] == 1
    assert np.isfinite(meta["psnr"])
    assert decode_splats(record).num_splats == SPLATS


def test_splat_reader_and_padding_collate(fitted):
    root, _, _ = fitted
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


def test_pruned_levels_are_derived_from_the_largest_fit(fitted):
    root, sources, _ = fitted
    parents = {}
    for path in list_shards(root / "gs16"):
        parents.update(shard_samples(path))
    for target in (8, 4):
        stats = prune_splat_shards(root / "gs16", root / f"gs{target}", target, batch_size=3)
        assert (stats.shards_written, stats.images) == (3, 10)
        level = {}
        for path in list_shards(root / f"gs{target}"):
            level.update(shard_samples(path))
        assert sorted(level) == sorted(parents)
        for key, (record, meta) in level.items():
            parent_record, parent_meta = parents[key]
            assert meta["N"] == target and meta["pruned_from"] == SPLATS and meta["psnr"] is None
            assert meta["bytes"] == len(record) == record_bytes(target, 3) < parent_meta["bytes"]
            assert meta["label"] == parent_meta["label"] and meta["source_key"] == key
            # Exactly the target brightest splats of the stored parent.
            expected = prune_by_luminance(decode_splats(parent_record).splats, target_count=target)
            torch.testing.assert_close(decode_splats(record).splats.colours, expected.colours)
            torch.testing.assert_close(decode_splats(record).splats.positions, expected.positions)
    rerun = prune_splat_shards(root / "gs16", root / "gs8", 8)
    assert (rerun.shards_written, rerun.shards_skipped) == (0, 3)


def test_pruning_with_finetune_uses_the_source_images(fitted):
    root, sources, _ = fitted
    with pytest.raises(ValueError, match="images_for_finetune"):
        prune_splat_shards(root / "gs16", root / "never", 8, finetune_iterations=3)
    measured = prune_splat_shards(root / "gs16", root / "gs8m", 8, fit_settings=SETTINGS, images_for_finetune=sources)
    tuned = prune_splat_shards(
        root / "gs16", root / "gs8ft", 8, finetune_iterations=3, fit_settings=SETTINGS, images_for_finetune=sources
    )
    assert measured.images == tuned.images == 10 and tuned.no_source_image == 0
    assert np.isfinite(measured.mean_psnr) and np.isfinite(tuned.mean_psnr)
    _, meta = shard_samples(list_shards(root / "gs8ft")[1])["img004"]
    assert meta["N"] == 8 and meta["finetune_iterations"] == 3 and np.isfinite(meta["psnr"])
    # Only the image shard named like the splat shard's source is searched; the others count as missing.
    others = image_shards(str(root / "other"), 4, 4)
    missing = prune_splat_shards(root / "gs16", root / "gs8x", 8, fit_settings=SETTINGS, images_for_finetune=others[0])
    assert missing.no_source_image == 6 and missing.images == 4  # only train-000000.tar has a namesake


def test_dropped_fits_are_counted_and_left_out(tmp_path, monkeypatch):
    sources = image_shards(str(tmp_path / "images"), 5, 5)
    real_fit = splat_shards_module.fit_splats

    def fit_dropping_the_first(images, num_splats, settings, **kwargs):
        result = real_fit(images, num_splats, settings, **kwargs)
        splats = result.splats.with_valid(result.splats.valid.clone())
        splats.valid[0] = False
        psnr = result.psnr.clone()
        psnr[0] = float("nan")
        return replace(result, splats=splats, psnr=psnr, dropped=[0])

    monkeypatch.setattr(splat_shards_module, "fit_splats", fit_dropping_the_first)
    stats = fit_shards_to_splats(sources, tmp_path / "gs", SPLATS, SETTINGS, batch_size=2)
    assert (stats.images, stats.dropped_fits, stats.skipped) == (2, 3, 3)
    assert sorted(shard_samples(list_shards(tmp_path / "gs")[0])) == ["img001", "img003"]


def test_existing_shards_are_verified_on_request(tmp_path):
    sources = image_shards(str(tmp_path / "images"), 4, 2)
    out = tmp_path / "gs"
    fit_shards_to_splats(sources, out, SPLATS, SETTINGS)
    broken = list_shards(out)[1]
    data = open(broken, "rb").read()
    with open(broken, "wb") as handle:
        handle.write(data[: len(data) // 3])
    with pytest.raises(ValueError):
        verify_splat_shard(broken)
    assert fit_shards_to_splats(sources, out, SPLATS, SETTINGS).shards_skipped == 2
    again = fit_shards_to_splats(sources, out, SPLATS, SETTINGS, verify_existing=True)
    assert (again.shards_skipped, again.shards_written) == (1, 1)
    assert verify_splat_shard(broken) == 2


def test_ranks_fit_disjoint_shards(tmp_path):
    sources = image_shards(str(tmp_path / "images"), 6, 2)
    written = [fit_shards_to_splats(sources, tmp_path / "gs", SPLATS, SETTINGS, rank=r, world_size=2) for r in (0, 1)]
    assert [s.shards_written for s in written] == [2, 1] and [s.images for s in written] == [4, 2]
    assert len(list_shards(tmp_path / "gs")) == 3


KILLABLE_FIT = textwrap.dedent(
    """
    import sys, time
    import gsclip_lib.splat_shards as module
    from gsclip_lib.fit import FitSettings

    real_fit, calls = module.fit_splats, []

    def fit_that_hangs(*args, **kwargs):
        # Two batches per shard: call 3 is the first batch of the second shard, call 4 hangs there,
        # with the second shard half written under its temporary name.
        calls.append(1)
        if len(calls) == 4:
            open(sys.argv[3], "w").close()
            time.sleep(600)
        return real_fit(*args, **kwargs)

    module.fit_splats = fit_that_hangs
    module.fit_shards_to_splats(
        sys.argv[1], sys.argv[2], {splats}, FitSettings(iterations=2, backend="dense"), batch_size=2
    )
    """
)


def test_a_killed_fit_leaves_no_partial_shard_and_resumes(tmp_path):
    sources = image_shards(str(tmp_path / "images"), 12, 4)
    out, hanging = tmp_path / "gs", tmp_path / "hanging"
    script = tmp_path / "fit.py"
    script.write_text(KILLABLE_FIT.format(splats=SPLATS))
    env = {**os.environ, "PYTHONPATH": REPO, "GSCLIP_COMPILE": "0"}
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "images"), str(out), str(hanging)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            assert process.poll() is None, "the fitting process ended before it was killed"
            assert time.monotonic() < deadline, "the fitting process never reached its second shard"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    names = sorted(os.listdir(out))
    partial = [name for name in names if name.startswith(".train-000001.tar.") and name.endswith(".partial")]
    assert len(partial) == 1, names  # the half-written shard exists only under its temporary name
    assert [name for name in names if not name.startswith(".")] == ["train-000000.tar"]
    first = out / "train-000000.tar"
    assert verify_splat_shard(first) == 4
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns

    resumed = fit_shards_to_splats(sources, out, SPLATS, replace(SETTINGS, log_every=25), batch_size=2)
    assert (resumed.shards_skipped, resumed.shards_written, resumed.images) == (1, 2, 8)
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    keys = [sample.key for sample in splat_dataset(out)]
    assert keys == [f"img{i:03d}" for i in range(12)]
    assert [verify_splat_shard(path) for path in list_shards(out)] == [4, 4, 4]


def test_collate_binds_a_fixed_slot_count(fitted):
    root, _, _ = fitted
    samples = list(splat_dataset(root / "gs16" / "train-000002.tar"))
    batch = partial(collate_splats, num_slots=32)(samples)
    assert batch.splats.valid.shape == (2, 32) and batch.record_bytes.tolist() == [record_bytes(SPLATS, 3)] * 2
    with pytest.raises(ValueError):
        collate_splats(samples, num_slots=4)
