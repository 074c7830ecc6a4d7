"""``gsclip render``, ``gsclip info`` and ``gsclip compare``: what a ``.gsplat`` file holds.

``render`` draws the image the bytes hold (or, with ``--ellipses``, each splat as its one-sigma
ellipse in its colour); ``info`` reads the header and checks the record; ``compare`` fits an image and
sets the splats beside JPEG and a thumbnail of the same bytes (:mod:`gsclip_lib.evaluation.jpeg_baseline`,
:mod:`gsclip_lib.evaluation.matched_bytes`: the evaluate stage's baselines), PSNR against the image read.
The budget is the whole ``.gsplat`` file, header included: what a device would send (the evaluate
stage's default accounting counts the payload alone, 18 bytes less).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gsclip_lib import api
from gsclip_lib.atomic_files import write_bytes
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import (
    FORMAT_VERSION,
    DecodedSplats,
    compression_ratio,
    header_fields,
    payload_bytes,
    source_bytes,
)

ELLIPSE_SIGMAS = 1.0  # each splat drawn out to one standard deviation


def add_parsers(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    render = commands.add_parser("render", help="the image a .gsplat file holds, as PNG")
    render.add_argument("file", metavar="FILE.gsplat")
    render.add_argument("-o", "--out", required=True, help="the picture to write (.png, .jpg, ...)")
    render.add_argument("--size", type=int, default=None, help="longer side in pixels (default: as stored)")
    render.add_argument("--ellipses", action="store_true", help="draw each splat as its one-sigma ellipse")
    add_common(render)
    render.set_defaults(run=run_render, text=lambda r: f"{r['out']}: {r['width']}x{r['height']} from "
                        f"{r['splats']} splats ({r['bytes']} bytes) in {r['seconds']:.3f} s")
    info = commands.add_parser("info", help="splat count, channels, size, bytes, ratio, version and checksum")
    info.add_argument("file", metavar="FILE.gsplat")
    add_common(info)
    info.set_defaults(run=run_info, text=info_text)
    compare = commands.add_parser("compare", help="splats against JPEG and a thumbnail of the same bytes")
    compare.add_argument("image", metavar="IMAGE")
    compare.add_argument("--splats", "-n", type=int, required=True)
    compare.add_argument("--steps", type=int, default=None)
    compare.add_argument("--size", type=int, default=None)
    compare.add_argument("--channels", type=int, choices=(1, 3), default=None)
    compare.add_argument("--settings", choices=api.OPTIMIZER_GROUPS, default="fit")
    compare.add_argument("-o", "--out", default=None, help="a side-by-side picture (.png)")
    add_common(compare)
    compare.set_defaults(run=run_compare, text=compare_text)


def picture_bytes(pixels: np.ndarray, path: Path) -> bytes:  # pixels uint8 [H, W] or [H, W, 3]
    """``pixels`` encoded in the format ``path``'s suffix names (PNG, JPEG, ...)."""
    from PIL import Image

    formats = Image.registered_extensions()
    if path.suffix.lower() not in formats:
        raise InputError(f"cannot tell a picture format from {path.name!r}: end it in .png (or .jpg, .webp, ...)")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=formats[path.suffix.lower()])
    return buffer.getvalue()


def as_uint8(image: torch.Tensor) -> np.ndarray:  # [C, H, W] in [0, 1] -> [H, W] or [H, W, 3]
    from gsclip_lib.data.image_decoding import images_to_uint8

    pixels = images_to_uint8(image[None])[0]
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def ellipse_picture(decoded: DecodedSplats, size: int | None) -> np.ndarray:  # uint8 [H', W', 3]
    """Each splat as its one-sigma ellipse, filled with its colour, on black, ``size`` on the longer side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gsclip_lib.reporting.splat_figures import draw_splat_ellipses

    _, height, width = api.scaled_to(decoded, max(decoded.height, decoded.width, 256) if size is None else size)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="black")
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_facecolor("black")
    axis.set_xlim(0, decoded.width)
    axis.set_ylim(decoded.height, 0)
    axis.set_axis_off()
    draw_splat_ellipses(axis, decoded.splats, 0, sigmas=ELLIPSE_SIGMAS)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def run_render(args: argparse.Namespace) -> dict[str, Any]:
    out = api.check_output_path(args.out)
    started = time.perf_counter()
    record = api.read_record(args.file)
    decoded = api.decode(record, name=args.file)
    pixels = ellipse_picture(decoded, args.size) if args.ellipses else as_uint8(api.render(decoded, args.size))
    write_bytes(out, picture_bytes(pixels, out))
    return {"file": args.file, "out": str(out), "splats": decoded.num_splats, "bytes": len(record),
            "height": int(pixels.shape[0]), "width": int(pixels.shape[1]), "ellipses": args.ellipses,
            "seconds": round(time.perf_counter() - started, 4)}


def run_info(args: argparse.Namespace) -> dict[str, Any]:
    record = api.read_record(args.file)  # checked: magic, version, lengths, CRC
    decoded = api.decode(record, name=args.file)
    header = header_fields(record)
    source = source_bytes(decoded.height, decoded.width, decoded.channels)
    payload = payload_bytes(decoded.num_splats, decoded.channels)
    return {"file": args.file, "format_version": header["version"], "supported_version": FORMAT_VERSION,
            "splats": decoded.num_splats, "channels": decoded.channels, "height": decoded.height,
            "width": decoded.width, "bytes": len(record), "payload_bytes": payload, "source_bytes": source,
            "ratio": round(compression_ratio(source, len(record)), 4),
            "payload_ratio": round(compression_ratio(source, payload), 4),
            "crc32": f"{header['crc32']:#010x}", "checksum_ok": True}


def info_text(r: dict[str, Any]) -> str:
    return (f"{r['file']}: gsclip splat record, format version {r['format_version']}\n"
            f"  {r['splats']} splats, {r['channels']} channel(s), image {r['width']}x{r['height']}\n"
            f"  {r['bytes']} bytes ({r['payload_bytes']} payload), source {r['source_bytes']} bytes: ratio "
            f"{r['ratio']:.2f}x ({r['payload_ratio']:.2f}x payload)\n"
            f"  CRC32 {r['crc32']}: checksum ok")


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    from gsclip_lib.evaluation.jpeg_baseline import jpeg_at_budget
    from gsclip_lib.evaluation.matched_bytes import thumbnail_at_budget
    from gsclip_lib.splats.quality import psnr_uint8

    out = api.check_output_path(args.out) if args.out else None
    params, _ = api.read_params(args.params)
    image = api.read_image(args.image, api.image_settings(params, args.size, args.channels), min_pixels=args.splats)
    encoded = api.encode(image, args.splats, params=params, steps=args.steps, group=args.settings)
    budget = len(encoded.record)
    original = as_uint8(image)
    splat_pixels = as_uint8(api.render(encoded.record))
    jpeg = jpeg_at_budget(original, budget)
    thumbnail = thumbnail_at_budget(original, budget)

    def quality(pixels: np.ndarray) -> float:
        return round(psnr_uint8(original, pixels), 3)

    rows = [{"method": "splats", "bytes": budget, "psnr_db": quality(splat_pixels), "fits_budget": True,
             "detail": f"{encoded.num_splats} splats, {encoded.seconds:.2f} s fit"},
            {"method": "jpeg", "bytes": jpeg.num_bytes, "psnr_db": quality(jpeg.decoded), "fits_budget": jpeg.fits_budget,
             "detail": f"quality {jpeg.quality}" if jpeg.fits_budget else "no quality fits; the smallest shown"},
            {"method": "thumbnail", "bytes": thumbnail.num_bytes, "psnr_db": quality(thumbnail.decoded),
             "fits_budget": thumbnail.fits_budget, "detail": "{}x{} upsampled back".format(*thumbnail.size)}]
    if out is not None:
        panels = [original, splat_pixels, jpeg.decoded.reshape(original.shape), thumbnail.decoded.reshape(original.shape)]
        write_bytes(out, side_by_side(panels, ["image"] + [f"{r['method']} {r['bytes']} B, {r['psnr_db']:.1f} dB"
                                                           for r in rows]))
    return {"image": args.image, "budget_bytes": budget, "source_bytes": encoded.source_bytes,
            "ratio": round(encoded.ratio, 4), "rows": rows, "out": str(out) if out else None}


def side_by_side(panels: list[np.ndarray], titles: list[str]) -> bytes:  # PNG of the panels in a row
    from gsclip_lib.reporting.figures import new_figure

    figure, axes = new_figure(1, len(panels), figsize=(2.4 * len(panels), 2.7))
    for axis, pixels, title in zip(axes, panels, titles):
        axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def compare_text(r: dict[str, Any]) -> str:
    lines = [f"{r['image']}: {r['source_bytes']} bytes read; splats in {r['budget_bytes']} bytes ({r['ratio']:.2f}x)"]
    for row in r["rows"]:
        fits = "" if row["fits_budget"] else " (over the budget)"
        lines.append(f"  {row['method']:<9} {row['bytes']:>6} bytes  PSNR {row['psnr_db']:6.2f} dB  {row['detail']}{fits}")
    if r["out"]:
        lines.append(f"  side by side: {r['out']}")
    return "\n".join(lines)
