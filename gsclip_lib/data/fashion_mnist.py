"""Fashion-MNIST read from its four idx ``.gz`` files, and deterministic subsets of it.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747) is this project's small, offline
stand-in for the paper's DataComp pairs: 28x28 grayscale product photos in ten classes, 60,000 for
training and 10,000 for testing. Debian ships it as the package ``dataset-fashion-mnist``, which puts
the four standard files in ``/usr/share/datasets/fashion-mnist``; the folder actually read comes from
``params.yaml`` (``data.fashion_mnist_dir``), ``DEFAULT_FASHION_MNIST_DIR`` is only a config default.

The idx format (LeCun's MNIST page): a big-endian header of a magic number ``0x0000TTDD`` -- two zero
bytes, a type code (``0x08`` = unsigned byte) and the number of dimensions -- then one big-endian
uint32 per dimension, then the values in C order. Images use magic 2051 (``0x00000803``, three
dimensions: count, rows, columns), labels 2049 (``0x00000801``, one dimension: count). The parser here
is a few lines of gzip + numpy so that no dataset library (and no download) is needed.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

# The official class names, in label order (label i is FASHION_MNIST_OFFICIAL_NAMES[i]).
FASHION_MNIST_OFFICIAL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The same classes as they read inside a caption or a zero-shot prompt ("a photo of a t-shirt.").
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = 28
# split -> (images file, labels file), the names Zalando publishes and Debian installs.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The official split sizes; a folder whose files hold other counts still loads (tests use tiny
# hand-made files), the sizes are recorded here for callers and tests.
FASHION_MNIST_SIZES = {"train": 60_000, "test": 10_000}

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_HOW_TO_GET_IT = (
    "install the Debian package (`sudo apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{DEFAULT_FASHION_MNIST_DIR}), or point `data.fashion_mnist_dir` in params.yaml at a folder holding "
    f"the four files {', '.join(name for pair in FASHION_MNIST_FILES.values() for name in pair)}"
)


def read_idx(path: str | Path, magic: int) -> np.ndarray:  # uint8, shape from the header
    """The array stored in the gzip-compressed idx file at ``path``, checked against ``magic``.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file if it is not
    gzip, is truncated, has another magic number or holds more or fewer bytes than its header declares.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}; {_HOW_TO_GET_IT}")
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is truncated or not a gzip file ({error}); {_HOW_TO_GET_IT}") from error
    if len(data) < 4:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte idx magic number")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has idx magic number {found}, expected {magic}; is it the right file?")
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header_bytes}-byte idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_bytes + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: its header declares shape {shape} ({expected} bytes in all), "
            f"the file holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def load_fashion_mnist(
    folder: str | Path, split: Literal["train", "test"]
) -> tuple[np.ndarray, np.ndarray]:  # images [N, 28, 28] uint8, labels [N] int64 in 0..9
    """One split of Fashion-MNIST from the four idx ``.gz`` files in ``folder``."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(FASHION_MNIST_FILES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder not found: {folder}; {_HOW_TO_GET_IT}")
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images_path, labels_path = folder / images_name, folder / labels_name
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{images_path} holds images of {images.shape[1]}x{images.shape[2]} pixels, "
            f"Fashion-MNIST's are {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images; "
            "the two files of a split must match"
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{labels_path} holds label {int(labels.max())}; "
            f"Fashion-MNIST labels are 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    # np.frombuffer views are read-only; copies own writable memory that torch.from_numpy accepts.
    return images.copy(), labels.astype(np.int64)


def subset_indices(
    num_available: int, size: int, seed: int, labels: np.ndarray | None = None  # labels: [num_available]
) -> np.ndarray:  # [size] int64, ascending
    """``size`` distinct indices into ``range(num_available)``, the same for the same arguments.

    Without ``labels`` the subset is a uniform draw. With ``labels`` it is class-balanced: each class
    gets ``size // K`` samples of the K classes present, and the ``size % K`` left over go one each to
    classes in a seeded order. Either way subsets are nested: with the same seed, the subset of size
    m is contained in the subset of size n >= m, so growing a run's data keeps the samples it had.
    The indices are returned in ascending order (dataset order), not drawing order.
    """
    if isinstance(num_available, bool) or not isinstance(num_available, (int, np.integer)) or num_available < 0:
        raise ValueError(f"num_available must be a non-negative integer, got {num_available!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"subset size must be a non-negative integer, got {size!r}")
    if size > num_available:
        raise ValueError(f"subset size {size} is larger than the {num_available} samples available")
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(num_available)[:size]).astype(np.int64)

    labels = np.asarray(labels)
    if labels.shape != (num_available,):
        raise ValueError(f"labels must have shape ({num_available},) to match num_available, got {labels.shape}")
    classes = np.unique(labels)
    # classes[order[r]] has rank r; the first size % K ranks take one of the left-over samples each.
    order = rng.permutation(len(classes))
    base, remainder = divmod(size, len(classes)) if len(classes) else (0, 0)
    chosen = []
    for rank, position in enumerate(order):
        cls = classes[position]
        members = np.flatnonzero(labels == cls)
        quota = base + (1 if rank < remainder else 0)
        if quota > len(members):
            raise ValueError(
                f"a class-balanced subset of {size} needs {quota} samples of class {cls}, "
                f"which has only {len(members)}"
            )
        chosen.append(members[rng.permutation(len(members))[:quota]])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
