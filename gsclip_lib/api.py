"""The gsclip Python API: an image to splat bytes, the bytes back to splats and pixels, and zero-shot
classes read straight from the bytes (the paper's edge-to-cloud case, METHOD.md sections 1 and 4).

The verbs the ``gsclip`` command (:mod:`gsclip_lib.command.main`) calls: encode, decode, render,
and classify with the classifier ``load_classifier`` builds::

    from gsclip_lib import api
    encoded = api.encode("photo.png", 400, size=96, channels=3,   # fit 400 splats with the
                         group="fit_photos")                       # photo stage's settings: Encoded
    splats = api.decode(encoded.record)                            # DecodedSplats, float32
    picture = api.render(encoded.record, size=192)                 # [C, 192, 192] in [0, 1]
    classifier = api.load_classifier("data/models/align/N22", "fashion_mnist")
    api.classify([coat_record], classifier, top=3)                 # [Prediction], no pixels drawn

Units: images are floats in [0, 1], channels first; splat positions and Cholesky factors are in
pixels of the image the splats were fitted to (:mod:`gsclip_lib.splats.container`); a record is the
codec's bytes (:mod:`gsclip_lib.splats.codec`, FORMAT.md), the contents of a ``.gsplat`` file.
Settings come from ``params.yaml``: an image is read as its ``data`` group says (size, channels,
resize mode: the prepare stage's reading), fitted with ``fit.optimizer`` (the fit stage's settings)
or ``fit_photos.optimizer``, and classified with the text tower and prompts the evaluate stage uses.
The trained RGB model's path in a parameter file is taken from that file's folder, the project root.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from gsclip_lib.errors import InputError
from gsclip_lib.params import FitSettings, Params, load_params
from gsclip_lib.splats.codec import (
    CodecError,
    DecodedSplats,
    compression_ratio,
    decode_batch,
    decode_splats,
    payload_bytes,
    source_bytes,
)
from gsclip_lib.splats.container import Splats, check_splat_count

DEFAULT_PARAMS = "params.yaml"
SPLAT_SUFFIX = ".gsplat"
OPTIMIZER_GROUPS = ("fit", "fit_photos")  # params.yaml groups whose ``optimizer`` an encode may use
TOWER_FILE = "splat_encoder.pt"  # what makes a folder a trained level (the align stage writes it)
PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ImageSettings:
    """How an image file is read: the ``data`` group's size, channels and resize mode."""

    size: int  # square side, pixels
    channels: int  # 1 gray, 3 RGB
    resize_mode: str  # center_crop | resize


def read_params(params: Params | PathLike | None = None) -> tuple[Params, Path]:
    """``(params, root)``: a parameter file (default ``params.yaml``) and the folder its paths start from."""
    if isinstance(params, Params):
        return params, Path.cwd()
    path = Path(params or DEFAULT_PARAMS)
    if not path.is_file():
        raise InputError(f"no parameter file {path}: run from the project root or pass --params PATH")
    return load_params(path), path.resolve().parent


def image_settings(params: Params, size: int | None = None, channels: int | None = None) -> ImageSettings:
    """``params.data``'s reading of images, with ``size`` or ``channels`` changed."""
    data = params.data
    chosen = ImageSettings(data.image_size if size is None else size, data.channels if channels is None else channels,
                           data.resize_mode)
    if chosen.channels not in (1, 3):
        raise InputError(f"channels must be 1 (gray) or 3 (RGB), got {chosen.channels}")
    if chosen.size < 1:
        raise InputError(f"the image size must be a positive number of pixels, got {chosen.size}")
    return chosen


def fit_settings(params: Params, group: str = "fit", steps: int | None = None) -> FitSettings:
    """The ``optimizer`` settings of ``group`` (``fit`` or ``fit_photos``), ``steps`` replacing its iterations."""
    if group not in OPTIMIZER_GROUPS:
        raise InputError(f"unknown settings group {group!r}; choose one of {', '.join(OPTIMIZER_GROUPS)}")
    settings = getattr(params, group).optimizer
    return settings if steps is None else settings.replace(iterations=steps)


# ----------------------------------------------------------------------------------------------
# Files


def read_image(path: PathLike, image: ImageSettings, min_pixels: int = 1) -> Tensor:  # [C, S, S] in [0, 1]
    """An image file read the way the pipeline reads its images (decode, channels, resize).

    Refuses, with an :class:`InputError` naming the file, a missing or unreadable file, bytes that are
    no image, and an image of fewer than ``min_pixels`` pixels (fewer pixels than splats).
    """
    from PIL import Image

    from gsclip_lib.data.image_text_shards import decode_image
    from gsclip_lib.data.skip_counts import SkipSample

    data = read_file(path)
    try:
        pixels = decode_image(data, image.channels, image.size, image.resize_mode)
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except SkipSample as skip:
        raise InputError(f"{path} is not an image that can be read ({skip})") from None
    if width * height < min_pixels:
        raise InputError(f"{path} is {width}x{height} = {width * height} pixels, too small for "
                         f"{min_pixels} splats (a splat count above the pixel count stores more than the image)")
    return pixels


def read_file(path: PathLike) -> bytes:
    """A file's bytes; an :class:`InputError` naming it when it is missing, a folder or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def read_record(path: PathLike) -> bytes:
    """A ``.gsplat`` file's record, checked (magic, version, lengths, CRC) before it is returned."""
    record = read_file(path)
    decode(record, name=str(path))
    return record


def check_output_path(path: PathLike) -> Path:
    """``path`` when its folder exists: an output is never written into a folder the user did not make."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    return path


# ----------------------------------------------------------------------------------------------
# encode


@dataclass(frozen=True)
class Encoded:
    """One image's splats as stored bytes, and what the fit measured."""

    record: bytes  # the .gsplat contents: codec header + N * (5 + C) fp16 values
    num_splats: int
    channels: int
    height: int  # pixels of the image fitted
    width: int
    psnr: float  # dB of the fit against the image, before fp16 (the fit stage's .json "psnr")
    psnr_stored: float  # dB of the stored (fp16) splats rendered against the image
    seconds: float  # fit wall time per image (a batch's time shared among its images)

    @property
    def source_bytes(self) -> int:
        return source_bytes(self.height, self.width, self.channels)

    @property
    def ratio(self) -> float:
        """Source image bytes over the whole record's bytes (header counted)."""
        return compression_ratio(self.source_bytes, len(self.record))

    @property
    def payload_ratio(self) -> float:
        """The paper's ratio: source bytes over ``N * (5 + C) * 2``."""
        return compression_ratio(self.source_bytes, payload_bytes(self.num_splats, self.channels))


def encode_images(images: Tensor, num_splats: int, settings: FitSettings, *,
                  progress: bool = False) -> list[Encoded | None]:  # images [B, C, H, W] in [0, 1]
    """Fit ``num_splats`` splats to every image of a batch, under one optimizer, as the fit stage does
    (:func:`gsclip_lib.splats.records.fit_records`, the same bytes); ``None`` for an image whose fit
    was dropped (it turned non-finite) or cannot be stored in fp16."""
    from gsclip_lib.splats.quality import psnr
    from gsclip_lib.splats.records import fit_records

    batch, channels, height, width = images.shape
    check_splat_count(num_splats, height, width)
    fitted = fit_records(images, num_splats, settings, progress=progress, description=f"encode {num_splats} splats")
    kept = [index for index, record in enumerate(fitted.records) if record is not None]
    stored = torch.full((batch,), float("nan"))
    if kept:
        decoded, _, _ = decode_batch([fitted.records[index] for index in kept])
        rendered = _render(decoded, height, width, settings.backend, settings.cutoff)
        stored[kept] = psnr(images[kept].cpu().float(), rendered).float()
    seconds = fitted.fit.seconds / batch
    return [None if record is None else
            Encoded(record, fitted.kept_splats[index], channels, height, width, float(fitted.fit.psnr[index]),
                    float(stored[index]), seconds)
            for index, record in enumerate(fitted.records)]


def encode(image: Tensor | PathLike, num_splats: int, *, params: Params | PathLike | None = None,
           size: int | None = None, channels: int | None = None, steps: int | None = None,
           group: str = "fit") -> Encoded:
    """One image (a ``[C, H, W]`` tensor in [0, 1], or an image file read as ``params.data`` says,
    ``size`` and ``channels`` overriding it) fitted with ``num_splats`` splats, with the settings of
    ``params``' ``group.optimizer`` (``steps`` overriding its iterations): its record and what the fit
    measured."""
    params, _ = read_params(params)
    if not isinstance(image, Tensor):
        image = read_image(image, image_settings(params, size, channels), min_pixels=num_splats)
    if image.ndim != 3:
        raise InputError(f"encode takes one image [C, H, W], got shape {tuple(image.shape)}")
    (encoded,) = encode_images(image[None], num_splats, fit_settings(params, group, steps))
    if encoded is None:
        raise InputError(f"the fit of {num_splats} splats diverged (non-finite) and was dropped")
    return encoded


# ----------------------------------------------------------------------------------------------
# decode and render


def decode(record: bytes, *, name: str = "the record") -> DecodedSplats:
    """A record's splats: ``splats`` a batch of 1, ``[1, N, ...]`` float32, all valid, with the
    source image's ``height`` and ``width``. A damaged or foreign record is an :class:`InputError`."""
    try:
        return decode_splats(record)
    except CodecError as error:
        raise InputError(f"{name}: {error}") from None


def scaled_to(decoded: DecodedSplats, size: int | None) -> tuple[Splats, int, int]:
    """The splats scaled so that the longer side of their image is ``size`` pixels (``None``: as
    stored), and the new height and width. Colours are peak values, so they do not scale."""
    height, width = decoded.height, decoded.width
    if size is None:
        return decoded.splats, height, width
    if size < 1:
        raise InputError(f"the render size must be a positive number of pixels, got {size}")
    scale = size / max(height, width)
    splats = decoded.splats
    scaled = Splats(splats.positions * scale, splats.cholesky * scale, splats.colours, splats.valid)
    return scaled, max(1, round(height * scale)), max(1, round(width * scale))


def render(record: bytes | DecodedSplats, size: int | None = None,
           backend: str = "auto") -> Tensor:  # [C, H', W'] in [0, 1]
    """The image a record holds, clamped to [0, 1]: at its stored size, or with its longer side
    ``size`` pixels (the splats scaled, not the pixels)."""
    decoded = record if isinstance(record, DecodedSplats) else decode(record)
    splats, height, width = scaled_to(decoded, size)
    return _render(splats, height, width, backend)[0]


def _render(splats: Splats, height: int, width: int, backend: str,
            cutoff: float | None = None) -> Tensor:  # [B, C, H, W] in [0, 1]
    """The render clamped to [0, 1], at ``cutoff`` (the fit's; default: the render's own)."""
    from gsclip_lib.splats.render import render_splats

    options = {} if cutoff is None else {"cutoff": cutoff}
    with torch.no_grad():
        return render_splats(splats, height, width, backend=backend, **options).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# classify


@dataclass
class SplatClassifier:
    """A trained level's splat tower with the zero-shot classifier of a set of class names."""

    tower: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # positions, cholesky, colours, valid -> [B, D]
    weights: Tensor  # [D, K] unit-norm columns, one per class (CLIP's prompt ensemble)
    class_names: tuple[str, ...]  # K names, in label order
    temperature: float  # the tower's learned logit scale (exp'd): logits = temperature * cosine
    image_shape: tuple[int, int, int]  # (C, H, W) of the splats the tower reads
    level_dir: Path
    cached: bool  # loaded from the classifier cache (gsclip_lib.evaluation.cached_classifier)


@dataclass(frozen=True)
class Prediction:
    """One record's top-K classes, best first."""

    labels: tuple[int, ...]  # class indices
    names: tuple[str, ...]
    probabilities: tuple[float, ...]  # softmax over all K classes at the tower's temperature


def load_classifier(model_dir: PathLike, classes: str = "fashion_mnist", *,
                    params: Params | PathLike | None = None, rgb_checkpoint: PathLike | None = None,
                    cache: bool = True) -> SplatClassifier:
    """The splat tower of a trained level (``align.checkpoint_dir/N<count>``) on the trained RGB model
    (``pretrain.checkpoint_dir/model.pt``, or ``rgb_checkpoint``), and the zero-shot classifier of
    ``classes`` (``fashion_mnist``, ``imagenet`` or a file of names) built as the evaluate stage builds it.

    A names file names the labels of the data the level was evaluated on, so it must hold as many
    names as ``evaluate.eval_classes`` does; the named vocabularies are taken as asked. With ``cache``
    the classifier is kept after its first build and loaded from there while none of its inputs
    changes (:mod:`gsclip_lib.evaluation.cached_classifier`: torch alone, no open_clip).
    """
    from gsclip_lib.evaluation import cached_classifier

    params, root = read_params(params)
    level_dir = Path(model_dir)
    if not (level_dir / TOWER_FILE).is_file():
        raise InputError(f"{level_dir} is not a trained level: it holds no {TOWER_FILE} (the align stage "
                         f"writes one into {params.align.checkpoint_dir}/N<count>)")
    checkpoint = Path(rgb_checkpoint) if rgb_checkpoint else root / params.trained_rgb_model().checkpoint
    if not checkpoint.is_file():
        raise InputError(f"no trained RGB model at {checkpoint} (the pretrain stage writes it; or pass --rgb PATH)")
    # class_prompts.CLASS_SOURCES, spelled out: importing that module imports open_clip, which a cache hit avoids
    names_file = [] if classes in ("fashion_mnist", "imagenet") else [Path(classes)]
    try:
        key = cached_classifier.cache_key([level_dir / TOWER_FILE, checkpoint, *names_file],
                                          [classes, params.evaluate.eval_classes, params.model.model_dump_json()])
    except OSError as error:
        raise InputError(f"cannot read {error.filename}: {error.strerror}") from None
    stored = cached_classifier.load_cached(key) if cache else None
    if stored is not None:
        return SplatClassifier(stored.tower, stored.weights, stored.class_names, stored.temperature,
                               stored.image_shape, level_dir, cached=True)
    clip, class_names, weights = _build_classifier(level_dir, classes, params, checkpoint)
    built = cached_classifier.CachedClassifier(
        lambda *tensors: clip.encode_image(Splats(*tensors)), weights, class_names,
        float(clip.temperature_scale().detach()), (clip.image.channels, clip.image.height, clip.image.width))
    if cache:
        cached_classifier.save_cached(key, clip.image, built)
    return SplatClassifier(built.tower, built.weights, built.class_names, built.temperature, built.image_shape,
                           level_dir, cached=False)


def _build_classifier(level_dir: Path, classes: str, params: Params,
                      checkpoint: Path) -> tuple[Any, tuple[str, ...], Tensor]:
    """The level's SplatClip, the class names and the [D, K] class weights, as the evaluate stage builds them."""
    from gsclip_lib.evaluation.class_prompts import CLASS_SOURCES, class_names_and_templates
    from gsclip_lib.evaluation.zero_shot import build_classifier

    try:
        names, templates = class_names_and_templates(classes)
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the class names in {classes}: {error}") from None
    if classes not in CLASS_SOURCES:
        expected, _ = class_names_and_templates(params.evaluate.eval_classes)
        if len(names) != len(expected):
            raise InputError(f"{classes} names {len(names)} classes, the model's labels are "
                             f"{len(expected)} ({params.evaluate.eval_classes}): one name per label, in label order")
    clip, tokenizer = _load_tower(level_dir, params, checkpoint)
    with torch.no_grad():
        weights = build_classifier(clip, tokenizer, names, templates)
    return clip, tuple(names), weights


def _load_tower(level_dir: Path, params: Params, checkpoint: Path) -> tuple[Any, Any]:
    """The level's SplatClip in eval mode, and the RGB model's tokenizer."""
    from gsclip_lib.models.rgb_clip import create_rgb_clip
    from gsclip_lib.models.splat_clip import load_splat_clip

    try:
        rgb = create_rgb_clip(params.model.replace(checkpoint=str(checkpoint), pretrained=""))
    except Exception as error:  # noqa: BLE001 - pickle, zip, key and shape errors alike: not the model
        raise InputError(f"{checkpoint} is not a trained RGB model {params.model.name}: {_first_line(error)}") from None
    try:
        clip = load_splat_clip(level_dir / TOWER_FILE, rgb).eval()
    except Exception as error:  # noqa: BLE001 - as above: the file is not a level of this model
        raise InputError(f"{level_dir} is not a trained level of the model {params.model.name}: "
                         f"{_first_line(error)}") from None
    return clip, rgb.tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__} {text}".rstrip()


def classify(records: Sequence[bytes], classifier: SplatClassifier, *, top: int = 5,
             batch_size: int = 256, names: Sequence[str] | None = None) -> list[Prediction]:
    """Zero-shot top-``top`` classes of each record, from its splats (no pixels are drawn).

    Records are decoded in batches of ``batch_size`` (padded with invalid slots to the batch's largest
    count, as the evaluate stage batches them); each must be splats of the tower's image size and
    channels. ``names`` label records in error messages.
    """
    names = list(names) if names is not None else [f"record {index}" for index in range(len(records))]
    if batch_size < 1:
        raise InputError(f"the batch size must be a positive number of records, got {batch_size}")
    top = max(1, min(int(top), len(classifier.class_names)))
    decoded = [decode(record, name=name) for record, name in zip(records, names)]
    channels, height, width = classifier.image_shape
    for item, name in zip(decoded, names):
        if (item.channels, item.height, item.width) != (channels, height, width):
            raise InputError(f"{name} holds {item.height}x{item.width} splats with C = {item.channels}; the tower "
                             f"in {classifier.level_dir} reads {height}x{width} with C = {channels}")
    predictions: list[Prediction] = []
    device = classifier.weights.device
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            splats, _, _ = decode_batch(records[start:start + batch_size], device=device)
            raw = classifier.tower(splats.positions, splats.cholesky, splats.colours, splats.valid)
            embeddings = torch.nn.functional.normalize(raw.float(), dim=-1)
            probabilities = (classifier.temperature * embeddings @ classifier.weights).softmax(-1)  # [B, K]
            values, labels = probabilities.topk(top, dim=-1)
            predictions.extend(
                Prediction(tuple(row.tolist()), tuple(classifier.class_names[i] for i in row.tolist()),
                           tuple(float(v) for v in chance))
                for row, chance in zip(labels.cpu(), values.cpu()))
    return predictions


__all__ = [
    "Encoded", "ImageSettings", "Prediction", "SplatClassifier", "classify", "decode", "encode", "encode_images",
    "fit_settings", "image_settings", "load_classifier", "read_image", "read_params", "read_record", "render",
]
