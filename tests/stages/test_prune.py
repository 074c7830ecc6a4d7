"""The prune stage: each level keeps the brightest splats of the fitted level, refitted on the images."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gsclip_lib.data.image_text_shards import list_shards, write_image_text_shards
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import decode_splats, record_bytes
from gsclip_lib.splats.pruning import prune_by_luminance
from gsclip_lib.stages import fit as fit_stage
from gsclip_lib.stages import prune

SIZE, SPLATS = 8, 16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """10 RGB images of 8x8 in 3 shards, fitted with 16 splats through the dense twin."""
    from gsclip_lib.params import load_params

    root = tmp_path_factory.mktemp("fitted")
    rng = np.random.default_rng(0)
    samples = [(f"img{i:03d}", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), f"caption {i}", {"label": i % 3})
               for i in range(10)]
    write_image_text_shards(samples, str(root / "images" / "train-%06d.tar"), 4)
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml",
                         overrides=["data.image_size=8", "data.channels=3"])
    settings = params.fit.optimizer.replace(iterations=2, backend="dense")
    fit_stage.fit_split(str(root / "images"), root / "gs16", SPLATS, settings, 3, params.data, progress=False)
    return root, params.data, settings


@pytest.mark.parametrize("target", [8, 4])
def test_pruned_levels_keep_the_brightest_splats(fitted, target, shard_samples):
    root, data, settings = fitted
    parents = {}
    for path in list_shards(root / "gs16"):
        parents.update(shard_samples(path))
    stats = prune.prune_split(root / "gs16", root / f"gs{target}", target, settings.replace(iterations=0), 3,
                              str(root / "images"), data, progress=False)
    assert (stats.shards_written, stats.images, stats.no_source_image) == (3, 10, 0)
    assert np.isfinite(stats.mean_psnr) and stats.psnr_before_count == 10
    level = {}
    for path in list_shards(root / f"gs{target}"):
        level.update(shard_samples(path))
    assert sorted(level) == sorted(parents)
    for key, (record, meta) in level.items():
        parent_record, parent_meta = parents[key]
        assert meta["N"] == target and meta["pruned_from"] == SPLATS and meta["refit_iterations"] == 0
        assert meta["bytes"] == len(record) == record_bytes(target, 3) < parent_meta["bytes"]
        assert meta["label"] == parent_meta["label"] and meta["source_key"] == key and np.isfinite(meta["psnr"])
        # Without a refit: exactly the target brightest splats of the stored parent.
        expected = prune_by_luminance(decode_splats(parent_record).splats, target_count=target)
        torch.testing.assert_close(decode_splats(record).splats.colours, expected.colours)
        torch.testing.assert_close(decode_splats(record).splats.positions, expected.positions)
    rerun = prune.prune_split(root / "gs16", root / f"gs{target}", target, settings, 3, str(root / "images"), data,
                              progress=False)
    assert (rerun.shards_written, rerun.shards_skipped) == (0, 3)


def test_refit_moves_the_survivors_and_only_namesake_image_shards_are_read(fitted, shard_samples):
    root, data, settings = fitted
    kept = prune.prune_split(root / "gs16", root / "gs8k", 8, settings.replace(iterations=0), 4, str(root / "images"),
                             data, progress=False)
    refit = prune.prune_split(root / "gs16", root / "gs8r", 8, settings.replace(iterations=3), 4,
                              str(root / "images"), data, progress=False)
    assert kept.images == refit.images == 10
    _, meta = shard_samples(list_shards(root / "gs8r")[1])["img004"]
    assert meta["refit_iterations"] == 3
    record_kept, _ = shard_samples(list_shards(root / "gs8k")[1])["img004"]
    record_refit, _ = shard_samples(list_shards(root / "gs8r")[1])["img004"]
    assert record_kept != record_refit
    # Only the image shard named like the splat shard's source is searched; the others count as missing.
    only_first = str(root / "images" / "train-000000.tar")
    missing = prune.prune_split(root / "gs16", root / "gs8x", 8, settings, 4, only_first, data, progress=False)
    assert missing.no_source_image == 6 and missing.images == 4


def test_a_level_outside_prune_levels_is_refused(defaults):
    params = defaults.params()
    with pytest.raises(InputError, match="not one of prune.levels"):
        prune.prune_level(params, 5, progress=False)
