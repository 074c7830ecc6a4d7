"""The data stages end to end on a tiny slice of the real Fashion-MNIST: prepare, fit, prune."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gsclip_lib.data_stages import (
    DataConfig,
    FitStageConfig,
    PruneStageConfig,
    fit_splat_level,
    load_level_examples,
    prepare_fashion_mnist,
    prune_splat_level,
    skipped_total,
)
from gsclip_lib.fit import FitSettings
from gsclip_lib.shards import ImageTextShards, expand_shard_spec
from gsclip_lib.splat_shards import splat_dataset

FASHION_MNIST = Path(DataConfig().fashion_mnist_dir)
needs_data = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (make test installs Debian's dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data = DataConfig(shards_dir=str(root / "shards"), train_size=40, eval_size=20, images_per_shard=16, seed=1)
    fit = FitStageConfig(
        train_shards=str(root / "shards" / "train-*.tar"),
        eval_shards=str(root / "shards" / "eval-*.tar"),
        out_dir=str(root / "splats"),
        num_splats=22,
        batch_size=16,
        optimizer=FitSettings(iterations=4, log_every=2),
    )
    return data, fit


@needs_data
def test_prepare_writes_balanced_captioned_shards(tiny):
    data, _ = tiny
    metrics = prepare_fashion_mnist(data, progress=False)
    assert metrics["splits"]["train"]["images"] == 40 and metrics["splits"]["train"]["shards"] == 3
    assert metrics["splits"]["eval"]["per_class"] == [2] * 10
    assert metrics["splits"]["train"]["skipped"]["good"] == 40
    assert skipped_total(metrics["splits"]) == 0
    samples = list(ImageTextShards(expand_shard_spec(data.shards_dir + "/train-*.tar"), channels=1))
    assert all(sample.image.shape == (1, 28, 28) for sample in samples)
    assert all(sample.caption.endswith(".") and sample.label is not None for sample in samples)
    again = prepare_fashion_mnist(data, progress=False)
    assert again["splits"] == metrics["splits"]  # same seed, same subset


@needs_data
def test_fit_then_prune_levels_and_resume(tiny):
    data, fit = tiny
    prepare_fashion_mnist(data, progress=False)
    metrics = fit_splat_level(fit, progress=False)
    assert metrics["resumed"] is False
    assert metrics["train"]["images"] == 40 and metrics["eval"]["images"] == 20
    assert metrics["train"]["payload_bytes"] == 22 * 6 * 2
    assert metrics["train"]["ratio_payload"] == pytest.approx(784 / 264, abs=1e-3)
    assert metrics["train"]["mean_psnr"] > 12.0

    # Nothing changed: every finished shard is kept, nothing is refitted.
    rerun = fit_splat_level(fit, progress=False)
    assert rerun["resumed"] is True
    assert rerun["train"]["shards_written"] == 0 and rerun["train"]["shards_skipped"] == 3

    # A changed fit setting must not reuse shards made under the old one.
    changed = replace(fit, optimizer=replace(fit.optimizer, iterations=5))
    assert fit_splat_level(changed, progress=False)["resumed"] is False
    saved = json.loads((Path(fit.out_dir) / "N22" / "config.json").read_text())
    assert saved["optimizer"]["iterations"] == 5

    level = prune_splat_level(changed, PruneStageConfig(levels=(11,)), 11, progress=False)
    assert level["eval"]["images"] == 20 and level["eval"]["payload_bytes"] == 11 * 12
    pruned = list(splat_dataset(str(changed.level_dir(11, "eval"))))
    full = {sample.key: sample for sample in splat_dataset(str(changed.level_dir(22, "eval")))}
    assert {sample.key for sample in pruned} == set(full)
    assert all(sample.num_splats == 11 for sample in pruned)

    examples = load_level_examples(changed, [22, 11], split="eval", count=3)
    assert examples.images.shape == (3, 1, 28, 28)
    assert examples.splats[11].num_slots == 11 and examples.splats[22].num_slots == 22

    with pytest.raises(ValueError, match="must be below fit.num_splats"):
        prune_splat_level(changed, PruneStageConfig(), 22, progress=False)
