"""Teacher targets of the distillation: computed per batch, or precomputed into shards? (issue 13)

``python -m benchmarks.teacher_targets --out benchmarks/teacher_targets.json [--samples 1024] [--repeats 30]``

The issue asks that the distillation's teacher targets be "computed on the fly per batch, or once into
shards beside the splats (a DVC output), whichever measures faster on the CPU default". This measures
both on the CPU default's shapes, ``params.yaml`` as it is: ``data.image_size`` x ``data.image_size``
images with ``data.channels`` channels (28x28 gray: Fashion-MNIST's own images when
``data.fashion_mnist_dir`` holds them, else synthetic ones), stored as PNG as the shards store them;
the default RGB model (``model.name``, untrained: the cost does not depend on the weights);
``align.distill.batch_size`` images per batch; token targets
(:func:`gsclip_lib.training.alignment.teacher_tokens` with ``side = sqrt(align.encoder.num_latents)``),
or embedding targets when ``align.distill_target`` says so.

- **On the fly**, per batch: decode the batch's PNG bytes (:func:`decode_image`, as
  :class:`gsclip_lib.data.splat_shards.PairedDecoder` does), stack them, compute the targets.
- **Precomputed**, per batch: read the batch's target members from a tar shard on disk through
  :func:`gsclip_lib.data.image_text_shards.iter_tar_samples` (one ``<key>.tok`` member of raw
  little-endian values per sample, as they would sit beside the splats) and turn them into one float32
  tensor; plus the one-off cost of computing every target once and writing the shard, amortized over
  the ``align.distill.epochs`` epochs that read it. Both fp32 (exact) and fp16 (half the bytes,
  rounded targets) storage are measured; the verdict takes the cheaper of the two.

Everything runs single-threaded (``torch.set_num_threads(1)``) and is timed in this process's CPU time
(``time.process_time``, user + system: the machine is shared); each way is timed batch by batch over
``--repeats`` passes over ``--samples`` samples, and the medians are reported (per batch and per
sample). The shard is read warm, from the page cache, as a training run reads its shards after the
first epoch. The JSON holds the per-sample costs (on the fly split into decoding and targets), the
storage per sample and what the targets would add to ``align.loader.shuffle_buffer`` raw samples held
in memory, the verdict (which is faster, by how much) and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import webdataset as wds

from benchmarks.machine import machine_info
from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.image_text_shards import SkipCounts, decode_image, encode_image, iter_tar_samples
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.params import Params, load_params
from gsclip_lib.training.alignment import teacher_embeddings, teacher_tokens

ROOT = Path(__file__).resolve().parents[1]
TARGET_EXTENSION = "tok"
# This process's CPU time (user + system): with one thread it is the time the work took, whatever else
# the shared machine runs (wall-clock medians moved by a third between two runs here).
CLOCK = time.process_time
FORMATS = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}


def source_images(params: Params, count: int) -> tuple[np.ndarray, str]:
    """``count`` uint8 images of the default's shape ``[count, S, S]`` (gray) or ``[count, S, S, 3]``."""
    size, channels = params.data.image_size, params.data.channels
    try:
        from gsclip_lib.data.fashion_mnist import load_fashion_mnist

        images, _ = load_fashion_mnist(params.data.fashion_mnist_dir, "test")
        if images.shape[1:] == (size, size) and len(images) >= count:
            images = images[:count]
            if channels == 3:
                images = np.repeat(images[..., None], 3, axis=-1)
            return np.ascontiguousarray(images), f"Fashion-MNIST test images from {params.data.fashion_mnist_dir}"
    except (OSError, ValueError):
        pass
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(count):  # a bright blob on black, with noise: a garment-like silhouette
        cy, cx, ry, rx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, *rng.uniform(0.2, 0.45, 2) * size
        mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
        image = np.clip(mask * rng.uniform(80, 255) + rng.normal(0, 10, (size, size)) * mask, 0, 255).astype(np.uint8)
        out.append(image if channels == 1 else np.repeat(image[..., None], 3, axis=-1))
    return np.stack(out), "synthetic gray blobs (Fashion-MNIST not found)"


def target_function(params: Params, rgb: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    if params.align.distill_target == "tokens":
        side = int(round(params.align.encoder.num_latents**0.5))
        return (lambda images: teacher_tokens(rgb, images, side=side)), f"teacher_tokens(rgb, images, side={side})"
    return (lambda images: teacher_embeddings(rgb, images)), "teacher_embeddings(rgb, images)"


def decode_batch_images(pngs: list[bytes], params: Params) -> torch.Tensor:
    data = params.data
    return torch.stack([decode_image(png, data.channels, data.image_size, data.resize_mode) for png in pngs])


def batches_of(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items) - size + 1, size)]  # whole batches only


def time_on_the_fly(pngs: list[bytes], params: Params, targets: Callable, batch_size: int,
                    repeats: int) -> tuple[list[float], list[float]]:
    """Per batch: the seconds of decoding and of the targets (their sum is the on-the-fly cost)."""
    decoding, computing = [], []
    for _ in range(repeats):
        for batch in batches_of(pngs, batch_size):
            started = CLOCK()
            images = decode_batch_images(batch, params)
            decoded = CLOCK()
            out = targets(images)
            decoding.append(decoded - started)
            computing.append(CLOCK() - decoded)
    assert out.shape[0] == batch_size
    return decoding, computing


def write_target_shard(path: Path, keys: list[str], pngs: list[bytes], params: Params, targets: Callable,
                       dtype: np.dtype, chunk: int) -> tuple[float, tuple[int, ...]]:
    """Compute every sample's targets (``chunk`` images at a time) and write them as one shard;
    the seconds it took and the shape of one sample's targets."""
    started = CLOCK()
    shape: tuple[int, ...] = ()
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for first in range(0, len(pngs), chunk):
            computed = targets(decode_batch_images(pngs[first : first + chunk], params)).numpy()
            shape = computed.shape[1:]
            for offset, values in enumerate(computed):
                writer.write({"__key__": keys[first + offset], TARGET_EXTENSION: values.astype(dtype).tobytes()})
    return CLOCK() - started, tuple(shape)


def time_precomputed(path: Path, shape: tuple[int, ...], dtype: np.dtype, batch_size: int, repeats: int,
                     expected: int) -> list[float]:
    times = []
    for _ in range(repeats):
        counts = SkipCounts()
        samples = iter_tar_samples(str(path), counts)
        read = 0
        while True:
            started = CLOCK()
            members = []
            for raw in samples:
                members.append(raw.members[TARGET_EXTENSION])
                if len(members) == batch_size:
                    break
            if len(members) < batch_size:
                break
            stacked = np.stack([np.frombuffer(m, dtype=dtype).reshape(shape) for m in members])  # a writable copy
            tensor = torch.from_numpy(stacked).float()
            times.append(CLOCK() - started)
            read += len(members)
        if read != expected or counts.corrupt_shards or counts.unreadable_shards:
            raise RuntimeError(f"read {read} target samples of {expected} from {path} ({counts.as_dict()})")
    assert tensor.shape == (batch_size, *shape)
    return times


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 4)


def measure(params: Params, samples: int, repeats: int, work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    batch_size, epochs = params.align.distill.batch_size, params.align.distill.epochs
    torch.manual_seed(0)
    rgb = create_rgb_clip(params.model, device="cpu")
    targets, targets_call = target_function(params, rgb)
    images, source = source_images(params, samples)
    pngs = [encode_image(image, "png") for image in images]
    keys = [f"sample{i:06d}" for i in range(samples)]
    if samples < batch_size:
        raise SystemExit(f"--samples {samples} holds no whole batch of {batch_size}")
    whole = samples // batch_size * batch_size

    targets(decode_batch_images(pngs[:batch_size], params))  # warm-up: first calls allocate
    decoding, computing = time_on_the_fly(pngs, params, targets, batch_size, repeats)
    fly = [a + b for a, b in zip(decoding, computing)]
    fly_batch = statistics.median(fly)
    on_the_fly = {
        "what": f"decode {batch_size} PNGs (decode_image) + {targets_call}",
        "batches_timed": len(fly),
        "median_ms_per_batch": median_ms(fly),
        "median_ms_per_batch_decoding": median_ms(decoding),
        "median_ms_per_batch_targets": median_ms(computing),
        "median_us_per_sample": round(1e6 * fly_batch / batch_size, 3),
        "per_epoch_us_per_sample": round(1e6 * fly_batch / batch_size, 3),
    }

    precomputed: dict[str, Any] = {}
    for name, dtype in FORMATS.items():
        path = work / f"targets-{name}.tar"
        write_seconds = []
        for _ in range(max(1, min(repeats, 3))):
            seconds, shape = write_target_shard(path, keys, pngs, params, targets, dtype, chunk=256)
            write_seconds.append(seconds)
        read = time_precomputed(path, shape, dtype, batch_size, repeats, whole)
        read_batch = statistics.median(read)
        one_off = statistics.median(write_seconds) / samples
        raw_bytes = int(np.prod(shape)) * dtype.itemsize
        precomputed[name] = {
            "what": f"iter_tar_samples over a shard of .{TARGET_EXTENSION} members ({name}, raw) + stack to float32",
            "target_shape": list(shape),
            "batches_timed": len(read),
            "median_ms_per_batch_read": median_ms(read),
            "median_us_per_sample_read": round(1e6 * read_batch / batch_size, 3),
            "one_off_us_per_sample": round(1e6 * one_off, 3),
            "one_off_amortized_us_per_sample": round(1e6 * one_off / epochs, 3),
            "per_epoch_us_per_sample": round(1e6 * (read_batch / batch_size + one_off / epochs), 3),
            "storage_raw_bytes_per_sample": raw_bytes,
            "storage_tar_bytes_per_sample": round(path.stat().st_size / samples, 1),
            # Stored in the splat samples, the targets would ride in the stream's shuffle buffer of raw bytes.
            "shuffle_buffer_extra_mib": round(params.align.loader.shuffle_buffer * raw_bytes / 2**20, 1),
        }

    best_name = min(precomputed, key=lambda n: precomputed[n]["per_epoch_us_per_sample"])
    best = precomputed[best_name]["per_epoch_us_per_sample"]
    fly_cost = on_the_fly["per_epoch_us_per_sample"]
    faster = "on_the_fly" if fly_cost <= best else f"precomputed_{best_name}"
    slow, fast = max(fly_cost, best), min(fly_cost, best)
    record = {
        "shape": {"image_size": params.data.image_size, "channels": params.data.channels, "model": params.model.name,
                  "batch_size": batch_size, "distill_epochs": epochs, "distill_target": params.align.distill_target},
        "images": source,
        "samples": samples,
        "repeats": repeats,
        "png_bytes_per_sample": round(sum(map(len, pngs)) / samples, 1),
        "on_the_fly": on_the_fly,
        "precomputed": precomputed,
        "verdict": {
            "faster": faster,
            "on_the_fly_us_per_sample": fly_cost,
            "precomputed_us_per_sample": best,
            "precomputed_format": best_name,
            "speedup": round(slow / fast, 3) if fast > 0 else None,
            "saved_us_per_sample_per_epoch": round(slow - fast, 3),
            "text": (f"{faster.replace('_', ' ')} is faster: {fast:.1f} against {slow:.1f} us per sample and epoch "
                     f"({slow / fast:.2f}x)" if fast > 0 else "no measurable cost"),
        },
    }
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/teacher_targets.json")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--samples", type=int, default=1024, help="samples per timed pass (whole batches are timed)")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes over the samples")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    started_wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gsclip-targets-") as folder:
        record = measure(params, args.samples, args.repeats, Path(folder))
    report = {
        "benchmark": "teacher_targets",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.teacher_targets", *(argv if argv is not None else sys.argv[1:])]),
        "method": (
            "single thread, CPU time (time.process_time); per batch of align.distill.batch_size: on the fly = decode_image of the batch's PNG "
            "bytes + the teacher's targets; precomputed = the batch's target members read through "
            "iter_tar_samples from a tar shard on disk (warm page cache) and stacked into a float32 tensor, "
            "plus the one-off cost of computing and writing every target once, divided by align.distill.epochs; "
            "medians over every whole batch of --repeats passes"
        ),
        **record,
        "seconds": round(time.perf_counter() - started_wall, 1),
        "machine": machine_info(),
    }
    write_json(args.out, report)
    print(report["verdict"]["text"])
    return report


if __name__ == "__main__":
    main()
