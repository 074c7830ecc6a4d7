"""The prepare stage on the real Fashion-MNIST and on a small ImageNet-style folder."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsclip_lib.data.image_text_shards import ImageTextShards
from gsclip_lib.errors import InputError
from gsclip_lib.evaluation.class_prompts import folder_class_names
from gsclip_lib.stages import prepare


def _image_folder(root: Path) -> None:
    """Three classes of two images, one PNG and one JPEG of another size, and one broken file."""
    rng = np.random.default_rng(0)
    for name in ("ankle_boot", "bag", "coat"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / name / "a.png")
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / name / "b.JPEG")
    (root / "coat" / "c.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)


def test_prepare_writes_balanced_captioned_shards(fashion_mnist, defaults, tmp_path):
    params = defaults.params(f"data.shards_dir={tmp_path}/shards", "data.train_size=40", "data.eval_size=20",
                             "data.images_per_shard=16", "data.seed=1")
    result = prepare.run(params, progress=False)
    splits = result.metrics["splits"]
    assert splits["train"]["images"] == 40 and splits["train"]["shards"] == 3
    assert splits["eval"]["per_class"] == [2] * 10 and splits["train"]["skipped"]["good"] == 40
    samples = list(ImageTextShards(params.data.train_spec(), channels=1))
    assert all(sample.image.shape == (1, 28, 28) for sample in samples)
    assert all(sample.caption.endswith(".") and sample.label is not None for sample in samples)
    again = prepare.run(params, progress=False)
    assert again.metrics["splits"] == splits  # same seed, same subset


def test_external_training_shards_are_not_prepared(fashion_mnist, defaults, tmp_path):
    params = defaults.params(f"data.shards_dir={tmp_path}/shards", f"data.train_shards={tmp_path}/datacomp/*.tar",
                             "data.eval_size=10")
    splits = prepare.run(params, progress=False).metrics["splits"]
    assert list(splits) == ["eval"] and not list((tmp_path / "shards").glob("train-*"))


def test_image_folder_becomes_a_split(fashion_mnist, defaults, tmp_path):
    _image_folder(tmp_path / "folder")
    params = defaults.params(f"data.shards_dir={tmp_path}/shards", "data.train_size=20", "data.eval_size=10",
                             "data.images_per_shard=4", f"data.imagenet_dir={tmp_path}/folder")
    folder = prepare.run(params, progress=False).metrics["splits"]["imagenet"]
    assert folder["images"] == 6 and folder["classes"] == 3 and folder["per_class"] == [2, 2, 2]
    assert folder["skipped"]["truncated_image"] + folder["skipped"]["undecodable_image"] == 1
    assert folder_class_names(params.data.imagenet_classes_file()) == ("ankle boot", "bag", "coat")
    samples = list(ImageTextShards(params.data.imagenet_shards(), image_size=28, channels=1))
    assert [s.label for s in samples] == [0, 0, 1, 1, 2, 2]
    assert samples[0].caption == "a photo of a ankle boot." and all(s.image.shape == (1, 28, 28) for s in samples)

    # The folder dropped from the parameters: its shards and class names go too.
    plain = defaults.params(f"data.shards_dir={tmp_path}/shards", "data.train_size=20", "data.eval_size=10")
    assert "imagenet" not in prepare.run(plain, progress=False).metrics["splits"]
    assert not list((tmp_path / "shards").glob("imagenet*"))
    with pytest.raises(InputError, match="run the prepare stage"):
        folder_class_names(params.data.imagenet_classes_file())
