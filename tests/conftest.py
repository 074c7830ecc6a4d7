"""Test set-up shared by the whole suite: the folders mirror the library's (tests/splats for
gsclip_lib/splats, ...), and the fixtures every folder uses live here.

TRITON_INTERPRET must be set before the module that defines the Triton kernels is imported, so it is
set here, at the top of the first file pytest loads. On a machine with CUDA, export
TRITON_INTERPRET=0 to test the compiled kernels instead.
"""

import json
import os
import tarfile

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gsclip_lib.params import (  # noqa: E402
    FitSettings,
    OptimConfig,
    Params,
    RgbModelConfig,
    SplatEncoderConfig,
    load_params,
)
from gsclip_lib.splats.container import Splats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def make_random_splats(
    batch: int,
    count: int,
    channels: int = 1,
    *,
    height: int = 32,
    width: int = 32,
    scale: tuple[float, float] = (0.8, 4.0),  # range of the Cholesky diagonal, pixels
    shear: float = 1.0,  # the off-diagonal term is uniform in [-shear, shear] * scale[1]
    beyond: float = 0.1,  # centres reach this fraction of the image past each border
    invalid: float = 0.0,  # share of invalid slots (at least one per image when > 0)
    seed: int = 0,
) -> Splats:
    """Rotated, anisotropic random splats on an ``height x width`` image; ``[B, N]`` slots."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    extent = torch.tensor([width, height], dtype=torch.float32)
    positions = (uniform(batch, count, 2) * (1 + 2 * beyond) - beyond) * extent
    low, high = scale
    l11 = low + (high - low) * uniform(batch, count)
    l22 = low + (high - low) * uniform(batch, count)
    l21 = (2.0 * uniform(batch, count) - 1.0) * shear * high
    colours = torch.randn(batch, count, channels, generator=generator)
    valid = torch.ones(batch, count, dtype=torch.bool)
    if invalid > 0 and count > 0:
        valid = uniform(batch, count) >= invalid
        valid[:, 0] = False
    return Splats(positions, torch.stack([l11, l21, l22], -1), colours, valid)


@pytest.fixture
def random_splats():
    """The factory :func:`make_random_splats` (``random_splats(batch, count, channels, ...)``)."""
    return make_random_splats


class Defaults:
    """params.yaml's values as typed configs, with some fields changed for a test.

    params.yaml is the one source of values: tests take it from here rather than writing configs
    out in full, e.g. ``defaults.fit_settings(iterations=5)`` or ``defaults.params("fit.num_splats=8")``.
    """

    def __init__(self, params: Params) -> None:
        self.values = params

    def params(self, *overrides: str) -> Params:
        """The whole of params.yaml with ``group.key=value`` overrides."""
        return load_params(ROOT / "params.yaml", overrides=list(overrides))

    def fit_settings(self, **changes) -> FitSettings:
        """The fit stage's ``fit.optimizer``."""
        return self.values.fit.optimizer.replace(**changes)

    def photo_fit_settings(self, **changes) -> FitSettings:
        """The photo stage's ``fit_photos.optimizer`` (step sizes for 224x224 photos)."""
        return self.values.fit_photos.optimizer.replace(**changes)

    def optim(self, **changes) -> OptimConfig:
        """``align.distill``, a training run's settings."""
        return self.values.align.distill.replace(**changes)

    def encoder(self, **changes) -> SplatEncoderConfig:
        """``align.encoder``, the splat tower."""
        return self.values.align.encoder.replace(**changes)

    def model(self, **changes) -> RgbModelConfig:
        """``model``, the RGB CLIP."""
        return self.values.model.replace(**changes)


@pytest.fixture(scope="session")
def defaults() -> Defaults:
    return Defaults(load_params(ROOT / "params.yaml"))


def read_splat_shard(path) -> dict[str, tuple[bytes, dict]]:
    """key -> (codec record, .json metadata) of every sample of a splat shard, read as plain tar."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for info in archive.getmembers():
            key, extension = info.name.split(".", 1)
            members.setdefault(key, {})[extension] = archive.extractfile(info).read()
    return {key: (value["gs"], json.loads(value["json"])) for key, value in members.items()}


@pytest.fixture
def shard_samples():
    """The reader :func:`read_splat_shard`: ``shard_samples(path)[key] -> (record, metadata)``."""
    return read_splat_shard


@pytest.fixture(scope="session")
def fashion_mnist(defaults: Defaults) -> Path:
    """The folder of Fashion-MNIST's four idx files (params.yaml's); skips the test where it is missing."""
    folder = Path(defaults.values.data.fashion_mnist_dir)
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {folder} (make test installs Debian's dataset-fashion-mnist)")
    return folder


@pytest.fixture
def make_rgb(defaults: Defaults):
    """``make_rgb()``: params.yaml's RGB CLIP with fresh weights from seed 0, on the CPU."""
    from gsclip_lib.models.rgb_clip import create_rgb_clip

    def make():
        torch.manual_seed(0)
        return create_rgb_clip(defaults.model(), device="cpu")

    return make
