"""Fashion-MNIST parsing on Debian's real files, errors on hand-made broken ones, deterministic subsets."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gsclip_lib.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_OFFICIAL_NAMES,
    FASHION_MNIST_SIZES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_fashion_mnist,
    read_idx,
    subset_indices,
)

REAL_DIR = Path(DEFAULT_FASHION_MNIST_DIR)
needs_real_files = pytest.mark.skipif(
    not all((REAL_DIR / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair),
    reason=f"Fashion-MNIST not installed in {REAL_DIR} (sudo apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def real_train():
    return load_fashion_mnist(REAL_DIR, "train")


@needs_real_files
def test_real_train_split(real_train):
    images, labels = real_train
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60_000,) and labels.dtype == np.int64
    assert len(images) == FASHION_MNIST_SIZES["train"]
    # Pinned from the files Debian's dataset-fashion-mnist 0.0~git20200523 installs.
    assert labels[:12].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]
    assert int(images[0].sum(dtype=np.int64)) == 76247
    assert np.bincount(labels).tolist() == [6000] * 10  # the official split is balanced
    assert images.flags.writeable


@needs_real_files
def test_real_test_split():
    images, labels = load_fashion_mnist(REAL_DIR, "test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10


def test_class_names_in_label_order():
    assert len(FASHION_MNIST_CLASSES) == len(FASHION_MNIST_OFFICIAL_NAMES) == 10
    assert FASHION_MNIST_OFFICIAL_NAMES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[0] == "t-shirt"
    assert FASHION_MNIST_OFFICIAL_NAMES[9] == "Ankle boot" and FASHION_MNIST_CLASSES[9] == "ankle boot"
    assert all(name == name.lower() for name in FASHION_MNIST_CLASSES)


def _idx_bytes(magic: int, shape: tuple[int, ...], values: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + values


def _write_split(folder: Path, num_images: int, num_labels: int, split: str = "train") -> tuple[Path, Path]:
    images_name, labels_name = FASHION_MNIST_FILES[split]
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(num_images, 28, 28), dtype=np.uint8)
    labels = (np.arange(num_labels) % 10).astype(np.uint8)
    images_path, labels_path = folder / images_name, folder / labels_name
    images_path.write_bytes(gzip.compress(_idx_bytes(IDX_IMAGES_MAGIC, (num_images, 28, 28), pixels.tobytes())))
    labels_path.write_bytes(gzip.compress(_idx_bytes(IDX_LABELS_MAGIC, (num_labels,), labels.tobytes())))
    return images_path, labels_path


def test_hand_made_split_round_trips(tmp_path):
    _write_split(tmp_path, 7, 7, "test")
    images, labels = load_fashion_mnist(tmp_path, "test")
    expected = np.random.default_rng(1).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_missing_folder_and_file_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder not found.*sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz.*data.fashion_mnist_dir"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist(tmp_path, "val")


def test_truncated_gzip_is_named(tmp_path):
    images_path, _ = _write_split(tmp_path, 5, 5)
    images_path.write_bytes(images_path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is truncated or not a gzip file"):
        load_fashion_mnist(tmp_path, "train")


def test_payload_shorter_or_longer_than_header_is_named(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_idx_bytes(IDX_IMAGES_MAGIC, (3, 28, 28), bytes(2 * 28 * 28))))
    with pytest.raises(ValueError, match=r"short.gz is truncated: its header declares shape \(3, 28, 28\)"):
        read_idx(path, IDX_IMAGES_MAGIC)
    path.write_bytes(gzip.compress(_idx_bytes(IDX_LABELS_MAGIC, (3,), bytes(4))))
    with pytest.raises(ValueError, match="longer than its header says"):
        read_idx(path, IDX_LABELS_MAGIC)
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(ValueError, match="shorter than the 4-byte idx magic"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_not_gzip_and_wrong_magic_are_named(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(_idx_bytes(IDX_LABELS_MAGIC, (2,), bytes(2)))
    with pytest.raises(ValueError, match="plain.gz is truncated or not a gzip file"):
        read_idx(path, IDX_LABELS_MAGIC)
    # Labels and images swapped: the magic numbers tell them apart.
    images_path, labels_path = _write_split(tmp_path, 4, 4)
    labels_path.write_bytes(images_path.read_bytes())
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz has idx magic number 2051, expected 2049"):
        load_fashion_mnist(tmp_path, "train")


def test_count_mismatch_and_bad_labels_are_named(tmp_path):
    _write_split(tmp_path, 6, 5)
    with pytest.raises(ValueError, match="holds 5 labels but .*train-images-idx3-ubyte.gz holds 6 images"):
        load_fashion_mnist(tmp_path, "train")
    _, labels_path = _write_split(tmp_path, 2, 2)
    labels_path.write_bytes(gzip.compress(_idx_bytes(IDX_LABELS_MAGIC, (2,), bytes([3, 10]))))
    with pytest.raises(ValueError, match="holds label 10; Fashion-MNIST labels are 0..9"):
        load_fashion_mnist(tmp_path, "train")
    images_path, _ = _write_split(tmp_path, 2, 2)
    images_path.write_bytes(gzip.compress(_idx_bytes(IDX_IMAGES_MAGIC, (2, 32, 32), bytes(2 * 32 * 32))))
    with pytest.raises(ValueError, match="holds images of 32x32 pixels"):
        load_fashion_mnist(tmp_path, "train")


def test_uniform_subset_is_deterministic_nested_and_distinct():
    first = subset_indices(1000, 100, seed=3)
    assert np.array_equal(first, subset_indices(1000, 100, seed=3))
    assert not np.array_equal(first, subset_indices(1000, 100, seed=4))
    assert len(np.unique(first)) == 100 and first.min() >= 0 and first.max() < 1000
    assert np.all(np.diff(first) > 0) and first.dtype == np.int64
    assert set(subset_indices(1000, 40, seed=3)) <= set(first)
    assert len(subset_indices(5, 5, seed=0)) == 5 and len(subset_indices(5, 0, seed=0)) == 0


def test_balanced_subset_is_balanced_deterministic_and_nested():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    subset = subset_indices(500, 43, seed=7, labels=labels)
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.sum() == 43 and set(counts.tolist()) == {4, 5}
    assert np.array_equal(subset, subset_indices(500, 43, seed=7, labels=labels))
    for smaller in (0, 9, 10, 20, 42):
        assert set(subset_indices(500, smaller, seed=7, labels=labels)) <= set(subset)


def test_subset_errors():
    with pytest.raises(ValueError, match="subset size 11 is larger than the 10 samples available"):
        subset_indices(10, 11, seed=0)
    with pytest.raises(ValueError, match="subset size must be a non-negative integer"):
        subset_indices(10, -1, seed=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        subset_indices(10, 2, seed=0, labels=np.zeros(9, int))
    with pytest.raises(ValueError, match="needs 2 samples of class 1, which has only 1"):
        subset_indices(10, 4, seed=0, labels=np.array([0] * 9 + [1]))
