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
    imagenet_class_names,
    load_level_examples,
    prepare_data,
    prepare_fashion_mnist,
    prune_splat_level,
    skipped_total,
    splat_splits,
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
    metrics = fit_splat_level(fit, data, progress=False)
    assert metrics["resumed"] == {"train": False, "eval": False}
    assert metrics["train"]["images"] == 40 and metrics["eval"]["images"] == 20
    assert metrics["train"]["payload_bytes"] == 22 * 6 * 2
    assert metrics["train"]["ratio_payload"] == pytest.approx(784 / 264, abs=1e-3)
    assert metrics["train"]["mean_psnr"] > 12.0

    # Nothing changed: every finished shard is kept, nothing is refitted.
    rerun = fit_splat_level(fit, data, progress=False)
    assert rerun["resumed"] == {"train": True, "eval": True}
    assert rerun["train"]["shards_written"] == 0 and rerun["train"]["shards_skipped"] == 3

    # A changed fit setting must not reuse shards made under the old one.
    changed = replace(fit, optimizer=replace(fit.optimizer, iterations=5))
    assert fit_splat_level(changed, data, progress=False)["resumed"] == {"train": False, "eval": False}
    saved = json.loads((Path(fit.out_dir) / "N22" / "train" / "config.json").read_text())
    assert saved["fit"]["optimizer"]["iterations"] == 5

    level = prune_splat_level(changed, PruneStageConfig(levels=(11,)), data, 11, progress=False)
    assert level["eval"]["images"] == 20 and level["eval"]["payload_bytes"] == 11 * 12
    pruned = list(splat_dataset(str(changed.level_dir(11, "eval"))))
    full = {sample.key: sample for sample in splat_dataset(str(changed.level_dir(22, "eval")))}
    assert {sample.key for sample in pruned} == set(full)
    assert all(sample.num_splats == 11 for sample in pruned)

    examples = load_level_examples(changed, [22, 11], split="eval", count=3)
    assert examples.images.shape == (3, 1, 28, 28)
    assert examples.splats[11].num_slots == 11 and examples.splats[22].num_slots == 22

    with pytest.raises(ValueError, match="must be below fit.num_splats"):
        prune_splat_level(changed, PruneStageConfig(), data, 22, progress=False)


@needs_data
def test_fit_starts_afresh_when_its_input_shards_change(tmp_path):
    data = DataConfig(shards_dir=str(tmp_path / "shards"), train_size=20, eval_size=10, images_per_shard=10)
    fit = FitStageConfig(
        train_shards=str(tmp_path / "shards" / "train-*.tar"), eval_shards=str(tmp_path / "shards" / "eval-*.tar"),
        out_dir=str(tmp_path / "splats"), num_splats=8, batch_size=10, optimizer=FitSettings(iterations=2),
    )
    prepare_fashion_mnist(data, progress=False)
    fit_splat_level(fit, data, progress=False)
    first_keys = {s.key for s in splat_dataset(str(fit.level_dir(8, "train")))}
    # Another subset under the same shard names and the same fit settings: nothing may be reused.
    prepare_fashion_mnist(replace(data, seed=5), progress=False)
    again = fit_splat_level(fit, data, progress=False)
    assert again["resumed"] == {"train": False, "eval": False} and again["train"]["shards_written"] == 2
    second_keys = {s.key for s in splat_dataset(str(fit.level_dir(8, "train")))}
    assert second_keys == {s.key for s in ImageTextShards(fit.train_shards, channels=1)} != first_keys


def _image_folder(root: Path) -> None:
    """Three classes of two 28x28 images, one as PNG and one as JPEG, and one broken file."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("ankle_boot", "bag", "coat"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / name / "a.png")
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / name / "b.JPEG")
    (root / "coat" / "c.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)


@needs_data
def test_image_folder_is_prepared_fitted_and_pruned_as_a_split(tmp_path):
    _image_folder(tmp_path / "folder")
    data = DataConfig(shards_dir=str(tmp_path / "shards"), train_size=20, eval_size=10, images_per_shard=4,
                      imagenet_dir=str(tmp_path / "folder"))
    prepared = prepare_data(data, progress=False)["splits"]["imagenet"]
    assert prepared["images"] == 6 and prepared["classes"] == 3 and prepared["per_class"] == [2, 2, 2]
    assert prepared["skipped"]["truncated_image"] + prepared["skipped"]["undecodable_image"] == 1
    assert imagenet_class_names(data) == ("ankle boot", "bag", "coat")
    samples = list(ImageTextShards(data.imagenet_shards(), image_size=28, channels=1))
    assert [s.label for s in samples] == [0, 0, 1, 1, 2, 2]
    assert samples[0].caption == "a photo of a ankle boot." and all(s.image.shape == (1, 28, 28) for s in samples)

    fit = FitStageConfig(
        train_shards=str(tmp_path / "shards" / "train-*.tar"), eval_shards="",
        out_dir=str(tmp_path / "splats"), num_splats=8, batch_size=8, optimizer=FitSettings(iterations=2),
    )
    assert list(splat_splits(fit, data)) == ["train", "imagenet"]
    fitted = fit_splat_level(fit, data, progress=False)
    assert fitted["imagenet"]["images"] == 6 and "eval" not in fitted
    pruned = prune_splat_level(fit, PruneStageConfig(levels=(4,)), data, 4, progress=False)
    assert pruned["imagenet"]["images"] == 6
    assert [s.label for s in splat_dataset(str(fit.level_dir(4, "imagenet")))] == [0, 0, 1, 1, 2, 2]

    # The folder dropped from the config: its shards, classes and splats go too.
    plain = replace(data, imagenet_dir="")
    assert "imagenet" not in prepare_data(plain, progress=False)["splits"]
    assert not list(Path(data.shards_dir).glob("imagenet*"))
    fit_splat_level(fit, plain, progress=False)
    assert not fit.level_dir(8, "imagenet").exists()
