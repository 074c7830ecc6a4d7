"""A trained level's zero-shot classifier kept as one TorchScript file, so that classifying splat
records afterwards needs torch alone.

Building the classifier (:func:`gsclip_lib.api.load_classifier`) imports open_clip, and through it
torchvision and ``torch._dynamo`` (about 2 s on a 2-core machine), builds the RGB model and the
splat CLIP, and runs the text tower over every prompt. What classifying needs afterwards is small:
the splat image tower, a function of the four splat tensors, and the ``[D, K]`` class weights. So
after the first build the tower is traced (``torch.jit.trace``, checked against the eager tower at
two batch sizes) and saved with the weights, class names and temperature, under the user's cache
folder (``$GSCLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/gsclip`` or ``~/.cache/gsclip``), named by a
digest of every input it was made from: the level's and the RGB model's files, the class names
file, the vocabulary and evaluation settings, the prompt code and the torch and open_clip versions.
Changing any of them makes a new entry; deleting the folder only costs the next build.

``torch.jit`` is deprecated in favour of ``torch.export``, but loading an exported program imports
``torch._dynamo`` again (3.5 s here), which is what this cache exists to avoid; torch is pinned.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from gsclip_lib.atomic_files import write_bytes
from gsclip_lib.progress import report
from gsclip_lib.splats.container import Splats

CACHE_FORMAT = 1  # bump when what an entry holds changes
SUFFIX = ".classifier.pt"
_INFO = "classifier.json"
TRACE_TOLERANCE = 1e-4  # the traced tower must match the eager one this closely (max abs, embeddings)


@dataclass(frozen=True)
class CachedClassifier:
    """What classifying needs: the splat image tower on tensors, the class weights and their names."""

    tower: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # positions, cholesky, colours, valid -> [B, D]
    weights: Tensor  # [D, K] unit-norm columns, one per class
    class_names: tuple[str, ...]
    temperature: float
    image_shape: tuple[int, int, int]  # (C, H, W) of the splats the tower reads


def cache_folder() -> Path:
    """Where entries live: ``$GSCLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/gsclip``, else ``~/.cache/gsclip``."""
    explicit = os.environ.get("GSCLIP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gsclip"


def cache_key(files: Sequence[Path], settings: Sequence[str]) -> str:
    """A digest of the files' bytes and the settings' text, with the versions an entry depends on."""
    digest = hashlib.sha256(f"gsclip classifier {CACHE_FORMAT}, torch {torch.__version__}, "
                            f"open_clip {_version('open_clip_torch')}".encode())
    prompt_code = Path(__file__).with_name("class_prompts.py"), Path(__file__).with_name("zero_shot.py")
    for path in (*files, *prompt_code):
        data = Path(path).read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    for text in settings:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:40]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def load_cached(key: str) -> CachedClassifier | None:
    """The entry for ``key``, or None where there is none or it cannot be read (then it is rebuilt)."""
    path = cache_folder() / f"{key}{SUFFIX}"
    if not path.is_file():
        return None
    extra = {_INFO: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        info = json.loads(extra[_INFO])
        return CachedClassifier(module, module.class_weights, tuple(info["class_names"]), float(info["temperature"]),
                                tuple(info["image_shape"]))
    except Exception as error:  # noqa: BLE001 - a damaged or foreign entry is rebuilt, never trusted
        report(f"ignoring the unreadable classifier cache {path} ({type(error).__name__}); rebuilding it")
        return None


class _TowerOnTensors(nn.Module):
    """The splat image tower as a function of the four splat tensors, with the class weights beside it."""

    def __init__(self, image_tower: nn.Module, weights: Tensor) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.register_buffer("class_weights", weights.detach().clone())

    def forward(self, positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor) -> Tensor:
        return self.image_tower(Splats(positions, cholesky, colours, valid))


def example_splats(batch: int, count: int, image_shape: tuple[int, int, int], seed: int) -> Splats:
    """``batch`` sets of ``count`` random splats inside a ``(C, H, W)`` image, the last slot invalid."""
    channels, height, width = image_shape
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([width, height], dtype=torch.float32)
    positions = torch.rand(batch, count, 2, generator=generator) * scale
    cholesky = torch.stack([1 + 2 * torch.rand(batch, count, generator=generator),
                            0.5 * torch.randn(batch, count, generator=generator),
                            1 + 2 * torch.rand(batch, count, generator=generator)], -1)
    colours = torch.rand(batch, count, channels, generator=generator)
    valid = torch.ones(batch, count, dtype=torch.bool)
    valid[:, -1] = False
    return Splats(positions, cholesky, colours, valid)


def save_cached(key: str, image_tower: nn.Module, classifier: CachedClassifier) -> bool:
    """Trace ``image_tower`` on random splats, check it against the eager tower on other random splats
    of another batch size and splat count, and write the entry whole; False (and nothing written)
    where tracing fails or disagrees, or the folder cannot be written."""
    wrapper = _TowerOnTensors(image_tower, classifier.weights).eval()

    def tensors(splats: Splats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return splats.positions, splats.cholesky, splats.colours, splats.valid

    traced_on = tensors(example_splats(2, 8, classifier.image_shape, seed=0))
    checked_on = tensors(example_splats(3, 13, classifier.image_shape, seed=1))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values; checked below instead
            traced = torch.jit.trace(wrapper, traced_on, check_trace=False)
            for inputs in (traced_on, checked_on):
                difference = (traced(*inputs) - wrapper(*inputs)).abs().max().item()
                if not difference <= TRACE_TOLERANCE:
                    report(f"not caching the classifier: the traced tower differs by {difference:.2e}")
                    return False
            buffer = io.BytesIO()
            info = {"class_names": list(classifier.class_names), "temperature": classifier.temperature,
                    "image_shape": list(classifier.image_shape)}
            torch.jit.save(traced, buffer, _extra_files={_INFO: json.dumps(info)})
        cache_folder().mkdir(parents=True, exist_ok=True)
        write_bytes(cache_folder() / f"{key}{SUFFIX}", buffer.getvalue())
        return True
    except Exception as error:  # noqa: BLE001 - a cache that cannot be made costs only time
        report(f"not caching the classifier ({type(error).__name__}: {error})")
        return False
