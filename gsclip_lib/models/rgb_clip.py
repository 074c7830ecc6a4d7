"""RGB CLIP models: the pixel baseline and the teacher whose frozen blocks the splat tower borrows.

The paper's RGB teacher is a ViT CLIP trained "with standard OpenCLIP settings" on the same data
(METHOD.md sections 2 and 4). Model sizes live as open_clip JSON configs in ``model_configs/``,
registered with ``open_clip.add_model_config`` the way open_clip keeps ``model_configs/ViT-B-32.json``;
one factory, :func:`create_rgb_clip`, builds a model from a name in one of three ways:

- **from scratch** (the default): random weights, to be trained by :mod:`gsclip_lib.stages.pretrain`;
- **an open_clip pretrained tag** (``pretrained="laion2b_s34b_b79k"`` with ``name="ViT-B-32"``): the
  weights are taken from the local cache only (the Hugging Face hub cache or ``~/.cache/clip``);
  nothing is downloaded, and a tag missing from the cache raises ``FileNotFoundError`` saying where
  it was looked for (fetch it once with ``open_clip.create_model(name, pretrained=tag)`` on a
  machine with a network);
- **a local checkpoint** (``checkpoint="data/models/rgb/model.pt"``): this project's saved models
  (:func:`save_rgb_clip`), training checkpoints of :func:`gsclip_lib.training.loop.train` (``last.pt``),
  or open_clip checkpoints (its training ``epoch_N.pt``, state dicts, ``.safetensors``). When both a
  checkpoint and a tag are given, the checkpoint's weights are used and the tag only names the
  preprocessing (mean and std) if the checkpoint does not store it.

The default, ``gsclip-vit-tiny-28``, is sized for 28x28 gray Fashion-MNIST on two CPU cores:
a ViT with 4x4 patches (49 tokens + CLS), width 128 (4 heads of 32), 4 layers; a text transformer of
width 128, 4 heads, 4 layers over 32 tokens with open_clip's bundled BPE vocabulary (49,408 tokens,
no download); a 128-d joint space. 7.96 M parameters, 6.3 M of them the token embedding (a lookup,
cheap), so the compute is in the eight blocks. Pretrained for 5 epochs on the 6,000 default images
(``rgb_pretrain``'s defaults) it reaches 83 % zero-shot top-1 on the 1,000 eval images, after about
320 CPU-seconds (one thread). ``gsclip-vit-tiny-28-p7`` is the same model with 7x7 patches (16 tokens):
the same accuracy (83 %) for about 205 CPU-seconds, the choice when the RGB tower should see as many
tokens as the splat tower's 16 latents. A wider, deeper ViT (width 192, 6 layers) costs 1.7x per
step on the CPU and was not needed for the target.

Models whose tokenizer comes from Hugging Face (SigLIP, ...) need that tokenizer in the local cache.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from gsclip_lib.atomic_files import save_torch
from gsclip_lib.params import RgbModelConfig
from gsclip_lib.distributed import default_device

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "gsclip-vit-tiny-28"
MODEL_FORMAT = "gsclip-rgb-clip"  # the "format" key of files written by save_rgb_clip
MODEL_FORMAT_VERSION = 1
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 1/100

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class RgbClip:
    model: open_clip.CLIP  # in eval mode as created
    tokenizer: Callable[..., Tensor]  # captions -> [B, context_length] int64 token ids
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: int  # the (square) input size of the image tower
    name: str  # the open_clip model config name

    def prepare_images(self, images: Tensor) -> Tensor:  # [B, C, S, S] in [0, 1] -> [B, 3, S', S']
        """Data images as the image tower wants them: gray repeated to 3 channels, resized to
        ``image_size`` (bicubic with antialiasing, when the sizes differ), normalized by mean and std."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        mean = images.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (images - mean) / std

    def tokenize(self, captions: str | list[str]) -> Tensor:  # [B, context_length]
        return self.tokenizer(captions)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def list_rgb_models() -> list[str]:
    """Every model config name open_clip knows, ours included."""
    return open_clip.list_models()


def project_models() -> list[str]:
    """The model configs this project ships in ``model_configs/``."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def create_rgb_clip(
    config: RgbModelConfig, device: torch.device | str | None = None, *, cache_dir: str | None = None
) -> RgbClip:
    """Build the model ``config`` names (see the module docstring); ``device`` defaults to the
    available accelerator (``cuda:<LOCAL_RANK>``) or the CPU. ``cache_dir`` is where open_clip's
    pretrained weights are cached, if not in the default places."""
    name = config.name
    model_config = open_clip.get_model_config(name)
    if model_config is None:
        raise ValueError(
            f"unknown model {name!r}; the registered ones are this project's {project_models()} "
            f"and open_clip's {[m for m in list_rgb_models() if m not in project_models()]}"
        )
    device = torch.device(device) if device is not None else default_device()
    mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    tag_config = {}
    if config.pretrained:
        tag_config = open_clip.get_pretrained_cfg(name, config.pretrained)
        if not tag_config:
            raise ValueError(
                f"unknown pretrained tag {config.pretrained!r} for {name!r}; "
                f"open_clip knows {open_clip.list_pretrained_tags_by_model(name)}"
            )
        mean, std = tag_config.get("mean", mean), tag_config.get("std", std)

    if tag_config and bool(tag_config.get("quick_gelu", False)) != bool(model_config.get("quick_gelu", False)):
        warnings.warn(
            f"{name!r} and the pretrained tag {config.pretrained!r} disagree on QuickGELU; the -quickgelu "
            "variant of the model name probably fits the weights",
            UserWarning,
            stacklevel=2,
        )

    if config.checkpoint:
        checkpoint = _read_checkpoint(config.checkpoint, name)
        model = _random_model(name)
        stored = checkpoint.load_into(model)
        mean, std = stored.get("image_mean", mean), stored.get("image_std", std)
    elif config.pretrained:
        weights = cached_pretrained_file(name, config.pretrained, cache_dir)
        model = open_clip.create_model(name, pretrained=weights, device="cpu")
    else:
        model = _random_model(name)
    model.to(device).eval()

    image_size = model.visual.image_size
    if isinstance(image_size, (tuple, list)):
        if image_size[0] != image_size[1]:
            raise ValueError(f"{name!r} has a non-square input {tuple(image_size)}; only square inputs are supported")
        image_size = image_size[0]
    return RgbClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(name, cache_dir=cache_dir),
        image_mean=tuple(float(v) for v in mean),
        image_std=tuple(float(v) for v in std),
        image_size=int(image_size),
        name=name,
    )


def save_rgb_clip(clip: RgbClip, path: str | Path) -> Path:
    """Write ``clip`` as a self-describing checkpoint (atomically) that ``RgbModelConfig(checkpoint=path)``
    loads; open_clip's own loaders read it too (the weights sit under ``state_dict``)."""
    path = Path(path)
    save_torch(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "name": clip.name,
            "model_config": open_clip.get_model_config(clip.name),
            "image_mean": list(clip.image_mean),
            "image_std": list(clip.image_std),
            "image_size": clip.image_size,
            "state_dict": {key: value.detach().cpu() for key, value in clip.model.state_dict().items()},
        },
        path,
    )
    return path


@dataclass(frozen=True)
class _CheckedCheckpoint:
    """A model checkpoint read and checked before any model is built (a wrong file fails fast).

    ``state_dict`` is the weights of a checkpoint this project wrote (``None``: open_clip's own
    loader reads the file); ``preprocessing`` is the image mean and std stored beside them, if any.
    """

    path: Path
    name: str
    state_dict: dict[str, Tensor] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def load_into(self, model: torch.nn.Module) -> dict[str, Any]:
        """Load the weights into ``model`` (of ``name``); return the stored preprocessing."""
        if self.state_dict is None:
            _load_open_clip_checkpoint(model, self.path, self.name)
        else:
            _load_strict(model, self.state_dict, self.path, self.name)
        return self.preprocessing


def _read_checkpoint(path: str | Path, name: str) -> _CheckedCheckpoint:
    """Read and check the checkpoint at ``path`` for a model of ``name``, before any model is built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return _CheckedCheckpoint(path, name)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and weights_only errors alike
        raise ValueError(f"cannot read the model checkpoint {path}: {error}") from error
    if isinstance(contents, dict) and contents.get("format") == MODEL_FORMAT:
        if contents.get("name") != name:
            raise ValueError(
                f"the model checkpoint {path} holds a {contents.get('name')!r} model, not {name!r}; "
                f"set the model name to {contents.get('name')!r}"
            )
        preprocessing = {"image_mean": contents["image_mean"], "image_std": contents["image_std"]}
        return _CheckedCheckpoint(path, name, contents["state_dict"], preprocessing)
    if isinstance(contents, dict) and contents.get("format") == "gsclip-train-checkpoint":
        return _CheckedCheckpoint(path, name, contents["model"])
    # open_clip's own formats (and plain state dicts), through its loader and its conversions.
    return _CheckedCheckpoint(path, name)


def cached_pretrained_file(name: str, tag: str, cache_dir: str | None = None) -> str:
    """The local file of open_clip's pretrained ``tag`` for ``name``; never downloads.

    Looks where open_clip's downloads go: the Hugging Face hub cache (for tags hosted there, also
    their ``.safetensors`` twin) or ``cache_dir`` / ``~/.cache/clip`` (for tags with a URL).
    """
    tag_config = open_clip.get_pretrained_cfg(name, tag)
    if not tag_config:
        raise ValueError(f"unknown pretrained tag {tag!r} for {name!r}; open_clip knows "
                         f"{open_clip.list_pretrained_tags_by_model(name)}")
    if tag_config.get("file"):
        return tag_config["file"]
    looked: list[str] = []
    hub = tag_config.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
            looked.append(f"hf-hub:{repo_id}/{candidate}")
    url = tag_config.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
        looked.append(target)
    raise FileNotFoundError(
        f"the weights of {name!r} / {tag!r} are not in the local cache (looked for {looked}); this "
        f"project never downloads them. Fetch them once with open_clip.create_model({name!r}, "
        f"pretrained={tag!r}) where a network is available, or pass a checkpoint path instead."
    )


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _random_model(name: str) -> open_clip.CLIP:
    """open_clip's model with fresh weights (on the CPU, so the seed decides them on any machine),
    without its warning that no weights were loaded: here that is the intent."""
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        # pretrained_text=False: models with a Hugging Face text tower would otherwise fetch its weights.
        return open_clip.create_model(name, pretrained=None, pretrained_text=False, device="cpu")
    finally:
        root.removeFilter(notice)


def _load_strict(model: torch.nn.Module, state_dict: dict[str, Tensor], path: Path, name: str) -> None:
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"the model checkpoint {path} does not fit the model {name!r}: {error}") from error


def _load_open_clip_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"the model checkpoint {path} does not fit the model {name!r}: {error}") from error
