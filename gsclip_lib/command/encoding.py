"""``gsclip encode``: image files to ``.gsplat`` files, or a folder of images to splat shards.

Files named on the command line are all read and checked first, then fitted a batch at a time
(``fit.batch_size`` images under one optimizer, as the fit stage fits them), then written, so a bad
file stops the run before anything is written. One image may go to ``-o NAME.gsplat``; several go to
``-o FOLDER`` as ``<stem>.gsplat`` each.

A folder becomes webdataset splat shards in the fit stage's layout (:mod:`gsclip_lib.data.splat_shards`:
``<key>.gs``, ``<key>.txt``, ``<key>.json``, the image's own bytes), ``--per-shard`` images each,
keys from the images' paths under the folder, captions from a ``<stem>.txt`` beside an image (else its
file name). The output folder records what it was made from
(``config.json``: splat count, reading, fit settings, the image list's digest); a second run with the
same inputs keeps the shards already complete and writes the rest (a run stopped midway resumes), and
a run with other inputs or settings is refused rather than mixed in. An unreadable file inside the
folder is skipped and counted, as the prepare stage skips bad samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from statistics import fmean
from typing import Any, Callable

import torch

from gsclip_lib import api
from gsclip_lib.atomic_files import write_bytes, write_json
from gsclip_lib.errors import InputError
from gsclip_lib.params import FitSettings
from gsclip_lib.progress import progress_bar, report
from gsclip_lib.splats.codec import payload_bytes
from gsclip_lib.splats.container import check_splat_count

CONFIG_FILE = "config.json"
SHARD_NAME = "splats-{:06d}.tar"


def add_parsers(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = commands.add_parser("encode", help="fit images with splats: .gsplat files, or shards for a folder",
                                 description=__doc__.split("\n\n")[1])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or one folder of images")
    parser.add_argument("--splats", "-n", type=int, required=True, help="splats per image")
    parser.add_argument("-o", "--out", required=True, help="NAME.gsplat (one image) or a folder")
    parser.add_argument("--steps", type=int, default=None, help="fit steps (default: the settings group's iterations)")
    parser.add_argument("--size", type=int, default=None, help="square side images are read at (default: data.image_size)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 gray, 3 RGB (default: data.channels)")
    parser.add_argument("--settings", choices=api.OPTIMIZER_GROUPS, default="fit",
                        help="whose optimizer settings: fit (28x28 data, the default) or fit_photos (photographs)")
    parser.add_argument("--batch-size", type=int, default=None, help="images fitted together (default: fit.batch_size)")
    parser.add_argument("--per-shard", type=int, default=None, help="images per shard (default: data.images_per_shard)")
    add_common(parser)
    parser.set_defaults(run=run_encode, text=encode_text)


def run_encode(args: argparse.Namespace) -> dict[str, Any]:
    params, _ = api.read_params(args.params)
    image = api.image_settings(params, args.size, args.channels)
    check_splat_count(args.splats, image.size, image.size)  # an image read at this size has too few pixels
    if args.steps is not None and args.steps < 0:
        raise InputError(f"--steps must be 0 or more, got {args.steps}")
    settings = api.fit_settings(params, args.settings, args.steps)
    batch_size = _positive(params.fit.batch_size if args.batch_size is None else args.batch_size, "--batch-size")
    inputs = [Path(name) for name in args.inputs]
    summary = {"splats": args.splats, "settings": args.settings, "steps": settings.iterations,
               "image_size": image.size, "channels": image.channels, "resize_mode": image.resize_mode}
    folders = [path for path in inputs if path.is_dir()]
    if folders:
        if len(inputs) != 1:
            raise InputError("give image files, or one folder (not both, not several folders)")
        per_shard = _positive(params.data.images_per_shard if args.per_shard is None else args.per_shard,
                              "--per-shard")
        return {**summary, **encode_folder(inputs[0], Path(args.out), args.splats, image, settings, batch_size,
                                           per_shard)}
    return {**summary, **encode_files(inputs, Path(args.out), args.splats, image, settings, batch_size)}


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise InputError(f"{name} must be a positive integer, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Files


def output_files(inputs: list[Path], out: Path) -> list[Path]:
    """Where each image's ``.gsplat`` goes: ``out`` itself for one image named ``*.gsplat``, else
    ``out/<stem>.gsplat`` (``out`` is made when its parent exists)."""
    if out.suffix == api.SPLAT_SUFFIX:
        if len(inputs) != 1:
            raise InputError(f"-o {out} names one file, but {len(inputs)} images were given: name a folder")
        return [api.check_output_path(out)]
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a folder (a single image's output must end in .gsplat)")
    if not out.exists():
        api.check_output_path(out)  # its parent must exist
    targets = [out / (path.stem + api.SPLAT_SUFFIX) for path in inputs]
    if len(set(targets)) != len(targets):
        raise InputError("two images share a file name stem, and would write the same .gsplat file")
    return targets


def encode_files(inputs: list[Path], out: Path, num_splats: int, image: api.ImageSettings, settings: FitSettings,
                 batch_size: int) -> dict[str, Any]:
    """Every image read (and checked) first, fitted a batch at a time, then every file written."""
    targets = output_files(inputs, out)
    images = torch.stack([api.read_image(path, image, min_pixels=num_splats) for path in inputs])  # [B, C, S, S]
    started = time.perf_counter()
    encoded = fit_in_batches(images, num_splats, settings, batch_size)
    dropped = [str(path) for path, item in zip(inputs, encoded) if item is None]
    if dropped:
        raise InputError(f"the fits of {', '.join(dropped)} diverged (non-finite) and were dropped; nothing written")
    seconds = time.perf_counter() - started
    if out.suffix != api.SPLAT_SUFFIX:
        out.mkdir(exist_ok=True)
    for target, item in zip(targets, encoded):
        write_bytes(target, item.record)
    rows = [{"image": str(path), "output": str(target), **encoded_row(item)}
            for path, target, item in zip(inputs, targets, encoded)]
    return {"images": rows, "total": _total(encoded, seconds)}


def fit_in_batches(images: torch.Tensor, num_splats: int, settings: FitSettings, batch_size: int,
                   progress: bool = True) -> list[api.Encoded | None]:  # images [B, C, S, S]
    bar = progress_bar(total=len(images), desc=f"encode {num_splats} splats", unit="image",
                       disable=not progress or len(images) < 2)
    encoded: list[api.Encoded | None] = []
    for start in range(0, len(images), batch_size):
        encoded += api.encode_images(images[start:start + batch_size], num_splats, settings, progress=progress)
        bar.update(len(images[start:start + batch_size]))
    bar.close()
    return encoded


def encoded_row(item: api.Encoded) -> dict[str, Any]:
    return {"splats": item.num_splats, "bytes": len(item.record),
            "payload_bytes": payload_bytes(item.num_splats, item.channels), "source_bytes": item.source_bytes,
            "ratio": round(item.ratio, 4), "payload_ratio": round(item.payload_ratio, 4),
            "psnr_db": round(item.psnr, 3), "psnr_stored_db": round(item.psnr_stored, 3),
            "seconds": round(item.seconds, 4)}


def _total(encoded: list[api.Encoded], seconds: float) -> dict[str, Any]:
    if not encoded:
        return {"images": 0, "seconds": round(seconds, 3)}
    return {"images": len(encoded), "bytes": sum(len(item.record) for item in encoded),
            "ratio": round(fmean(item.ratio for item in encoded), 4),
            "psnr_db": round(fmean(item.psnr for item in encoded), 3),
            "psnr_stored_db": round(fmean(item.psnr_stored for item in encoded), 3),
            "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(encoded), 4)}


# ----------------------------------------------------------------------------------------------
# A folder: shards


def folder_images(folder: Path) -> dict[str, Path]:
    """Sample key -> image file, for every image file under ``folder``, in name order."""
    from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS

    files = sorted(path for path in folder.rglob("*") if path.is_file()
                   and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{folder} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    keys: dict[str, Path] = {}
    for path in files:
        key = path.relative_to(folder).with_suffix("").as_posix().replace(".", "_")  # webdataset: no dot in a key
        if key in keys:
            raise InputError(f"{keys[key]} and {path} would share the sample key {key!r}")
        keys[key] = path
    return keys


def prepare_output_folder(out: Path, manifest: dict[str, Any]) -> None:
    """Make ``out`` (its parent must exist) and record ``manifest``; refuse a folder made from other inputs."""
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a folder")
    if not out.exists():
        api.check_output_path(out)
        out.mkdir()
    config = out / CONFIG_FILE
    if config.is_file():
        try:
            recorded = json.loads(config.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{config} cannot be read ({error}): encode into a new folder") from None
        if recorded != manifest:
            raise InputError(f"{out} holds shards of other images or settings ({config}): encode into a new folder")
    elif any(out.iterdir()):
        raise InputError(f"{out} is not empty and was not written by gsclip encode: encode into a new folder")
    else:
        write_json(config, manifest)


def encode_folder(folder: Path, out: Path, num_splats: int, image: api.ImageSettings, settings: FitSettings,
                  batch_size: int, per_shard: int) -> dict[str, Any]:
    """Every image under ``folder`` into shards of ``per_shard`` images in ``out``, resuming."""
    from gsclip_lib.data.splat_shards import shard_is_complete

    images = folder_images(folder)
    listing = [[key, path.stat().st_size] for key, path in images.items()]
    manifest = {"splats": num_splats, "image": vars(image), "settings": settings.model_dump(mode="json"),
                "per_shard": per_shard, "images": len(images),
                "images_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    prepare_output_folder(out, manifest)
    keys = list(images)
    chunks = [keys[start:start + per_shard] for start in range(0, len(keys), per_shard)]
    encoded: list[api.Encoded] = []
    skipped_files, kept_shards = 0, 0
    started = time.perf_counter()
    bar = progress_bar(total=len(keys), desc=f"encode {num_splats} splats", unit="image", disable=len(keys) < 2)
    for number, chunk in enumerate(chunks):
        final = out / SHARD_NAME.format(number)
        if shard_is_complete(str(final)):
            kept_shards += 1
        else:
            written, skipped = write_shard(final, {key: images[key] for key in chunk}, num_splats, image, settings,
                                           batch_size)
            encoded += written
            skipped_files += skipped
        bar.update(len(chunk))
    bar.close()
    return {"output": str(out), "shards": len(chunks), "shards_kept": kept_shards, "skipped_files": skipped_files,
            "total": _total(encoded, time.perf_counter() - started)}


def write_shard(final: Path, images: dict[str, Path], num_splats: int, image: api.ImageSettings,
                settings: FitSettings, batch_size: int) -> tuple[list[api.Encoded], int]:
    """One shard of ``images`` (key -> file), written whole; returns the encodings and the files skipped."""
    from gsclip_lib.data.image_text_shards import EncodedImage
    from gsclip_lib.data.splat_shards import open_splat_shard
    from gsclip_lib.splats.records import shard_metadata

    readable: dict[str, torch.Tensor] = {}
    for key, path in images.items():
        try:
            readable[key] = api.read_image(path, image, min_pixels=num_splats)
        except InputError as error:
            report(f"skipping {error}")
    keys = list(readable)
    encoded = fit_in_batches(torch.stack(list(readable.values())), num_splats, settings, batch_size) if keys else []
    with open_splat_shard(final) as writer:
        for key, item in zip(keys, encoded):
            if item is None:
                report(f"skipping {images[key]}: its fit diverged and was dropped")
                continue
            path = images[key]
            metadata = shard_metadata(item.record, item.num_splats, item.channels, item.height, item.width, item.psnr,
                                      key=key, label=None, image_size=image.size, resize_mode=image.resize_mode,
                                      source_file=path.name)
            writer.write(key, item.record, caption_of(path), metadata,
                         EncodedImage(path.read_bytes(), path.suffix.lower()[1:]))
    kept = [item for item in encoded if item is not None]
    return kept, len(images) - len(kept)


def caption_of(path: Path) -> str:
    """The caption a shard sample carries: the text of ``<stem>.txt`` beside the image, else its file name."""
    sidecar = path.with_suffix(".txt")
    text = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
    return text or path.name


def encode_text(result: dict[str, Any]) -> str:
    """Per image (or per folder): bytes, ratio, PSNR and seconds per image."""
    head = (f"{result['splats']} splats, {result['channels']} channel(s) at {result['image_size']}x"
            f"{result['image_size']}, {result['steps']} steps of the {result['settings']} settings")
    lines = [head]
    for row in result.get("images", []):
        lines.append(f"  {row['output']}: {row['bytes']} bytes (payload {row['payload_bytes']}), ratio {row['ratio']:.2f}x"
                     f" (payload {row['payload_ratio']:.2f}x), PSNR {row['psnr_stored_db']:.2f} dB stored "
                     f"({row['psnr_db']:.2f} dB before fp16), {row['seconds']:.3f} s")
    total = result["total"]
    if "output" in result:
        lines.append(f"  {result['output']}: {result['shards']} shard(s), {result['shards_kept']} kept from an earlier "
                     f"run, {result['skipped_files']} file(s) skipped")
    if total["images"]:
        lines.append(f"  {total['images']} image(s): {total['bytes']} bytes, mean ratio {total['ratio']:.2f}x, mean PSNR "
                     f"{total['psnr_stored_db']:.2f} dB stored, {total['seconds_per_image']:.4f} s per image")
    return "\n".join(lines)
