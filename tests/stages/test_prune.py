"""The prune stage: each level keeps the best splats of the level above, refitted on the images."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gsclip_lib.data.image_text_shards import write_image_text_shards
from gsclip_lib.data.tar_shards import list_shards
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import decode_splats, record_bytes
from gsclip_lib.splats.pruning import keep_best, luminance_score, prune_score
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


def image_members(folder) -> dict[str, bytes]:
    """key -> the .png member of every sample in the shards of ``folder``."""
    import tarfile

    found = {}
    for path in list_shards(folder):
        with tarfile.open(path) as archive:
            for info in archive.getmembers():
                if info.name.endswith(".png"):
                    found[info.name[: -len(".png")]] = archive.extractfile(info).read()
    return found


@pytest.mark.parametrize("target", [8, 4])
def test_pruned_levels_keep_the_brightest_splats(fitted, target, shard_samples):
    root, data, settings = fitted
    parents = {}
    for path in list_shards(root / "gs16"):
        parents.update(shard_samples(path))
    # No refit and no colour solve: exactly the target brightest splats of the stored parent.
    keep_only = settings.replace(iterations=0, colour_solve="none")
    stats = prune.prune_split(root / "gs16", root / f"gs{target}", target, keep_only, "luminance", 3,
                              str(root / "images"), data, progress=False)
    assert (stats.shards_written, stats.images, stats.sums["no_source_image"]) == (3, 10, 0)
    assert np.isfinite(stats.mean_psnr) and stats.sums["psnr_before_count"] == 10 == stats.sums["psnr_pruned_count"]
    # Without a refit the stored PSNR is that of the pruned splats.
    assert stats.mean("psnr_pruned_sum", "psnr_pruned_count") == pytest.approx(stats.mean_psnr, abs=0.05)
    level = {}
    for path in list_shards(root / f"gs{target}"):
        level.update(shard_samples(path))
    images, parent_images = image_members(root / f"gs{target}"), image_members(root / "gs16")
    assert sorted(level) == sorted(parents)
    for key, (record, meta) in level.items():
        parent_record, parent_meta = parents[key]
        assert meta["N"] == target and meta["pruned_from"] == SPLATS and meta["refit_iterations"] == 0
        assert meta["bytes"] == len(record) == record_bytes(target, 3) < parent_meta["bytes"]
        assert meta["label"] == parent_meta["label"] and meta["source_key"] == key and np.isfinite(meta["psnr"])
        assert images[key] == parent_images[key] and images[key].startswith(b"\x89PNG")  # carried on, as stored
        parent = decode_splats(parent_record).splats
        expected = keep_best(parent, luminance_score(parent.colours), target)
        torch.testing.assert_close(decode_splats(record).splats.colours, expected.colours)
        torch.testing.assert_close(decode_splats(record).splats.positions, expected.positions)
    rerun = prune.prune_split(root / "gs16", root / f"gs{target}", target, keep_only, "luminance", 3,
                              str(root / "images"), data, progress=False)
    assert (rerun.shards_written, rerun.shards_skipped) == (0, 3)


def test_the_energy_score_keeps_the_splats_with_most_energy(fitted, shard_samples):
    root, data, settings = fitted
    keep_only = settings.replace(iterations=0, colour_solve="none")
    prune.prune_split(root / "gs16", root / "gs6e", 6, keep_only, "energy", 4, str(root / "images"), data,
                      progress=False)
    parents = {}
    for path in list_shards(root / "gs16"):
        parents.update(shard_samples(path))
    for path in list_shards(root / "gs6e"):
        for key, (record, _) in shard_samples(path).items():
            parent = decode_splats(parents[key][0]).splats
            expected = keep_best(parent, prune_score(parent, "energy", SIZE, SIZE, settings.cutoff, "dense"), 6)
            torch.testing.assert_close(decode_splats(record).splats.positions, expected.positions)


def test_solved_colours_and_the_refit_improve_on_pruning_alone(fitted, shard_samples):
    root, data, settings = fitted
    kept = prune.prune_split(root / "gs16", root / "gs8k", 8, settings.replace(iterations=0, colour_solve="none"),
                             "luminance", 4, str(root / "images"), data, progress=False)
    solved = prune.prune_split(root / "gs16", root / "gs8s", 8, settings.replace(iterations=0), "luminance", 4,
                               str(root / "images"), data, progress=False)
    refit = prune.prune_split(root / "gs16", root / "gs8r", 8, settings.replace(iterations=20), "luminance", 4,
                              str(root / "images"), data, progress=False)
    assert kept.images == solved.images == refit.images == 10
    assert solved.mean_psnr > kept.mean_psnr and refit.mean_psnr > kept.mean_psnr
    _, meta = shard_samples(list_shards(root / "gs8r")[1])["img004"]
    assert meta["refit_iterations"] == 20
    record_kept, _ = shard_samples(list_shards(root / "gs8k")[1])["img004"]
    record_refit, _ = shard_samples(list_shards(root / "gs8r")[1])["img004"]
    assert record_kept != record_refit


def test_only_namesake_image_shards_are_read(fitted):
    root, data, settings = fitted
    # Only the image shard named like the splat shard's source is searched; the others count as missing.
    only_first = str(root / "images" / "train-000000.tar")
    missing = prune.prune_split(root / "gs16", root / "gs8x", 8, settings, "luminance", 4, only_first, data,
                                progress=False)
    assert missing.sums["no_source_image"] == 6 and missing.images == 4


def test_an_unknown_score_is_refused_before_anything_is_written(fitted, tmp_path):
    root, data, settings = fitted
    with pytest.raises(InputError, match="unknown prune score"):
        prune.prune_split(root / "gs16", tmp_path / "out", 8, settings, "size", 4, str(root / "images"), data,
                          progress=False)
    assert not (tmp_path / "out").exists()
