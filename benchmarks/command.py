"""The ``gsclip`` command measured on this machine, and checked against the pipeline (issue 20).

- **One file, end to end**: ``gsclip classify one.gsplat --model data/models/align/N22`` in a fresh
  process, imports and model loading included (target: under 5 s), the wall time of each repeat: the
  first with an empty classifier cache (it builds the classifier and caches it), the rest from the
  cache (:mod:`gsclip_lib.evaluation.cached_classifier`), which is what the target is held to.
- **Many files**: the same command on the 1,000 evaluation images' ``.gsplat`` files; the command's
  own timing once the model is loaded, reading the files included (target: 200 files/s or more).
- **Agreement**: the evaluation images (the PNG bytes the prepare stage stored) encoded by ``gsclip
  encode`` at the fit stage's settings: how many records are byte-identical to the fit stage's shards
  (and the largest difference of a decoded value where not), then classified by ``gsclip classify``:
  how many top-1 hits equal the evaluate stage's (``reports/evaluate/per_image.csv``, column N22).

Needs the default run's outputs (``make repro``). ``--quick`` takes 20 images and one repeat (the
test's mode). Writes ``benchmarks/command.json``:

    python -m benchmarks.command --out benchmarks/command.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line, machine_info, timed_section
from gsclip_lib.atomic_files import write_json

LEVEL = ROOT / "data" / "models" / "align" / "N22"
EVAL_SHARD = ROOT / "data" / "shards" / "eval-000000.tar"
FITTED = ROOT / "data" / "splats" / "fitted" / "N22" / "eval"
PER_IMAGE = ROOT / "reports" / "evaluate" / "per_image.csv"
TARGETS = {"one_file_seconds": 5.0, "files_per_second": 200.0}


def gsclip(*args: Any, cache: Path) -> tuple[dict[str, Any], float]:
    """``gsclip args --json`` in a fresh process from the project root, its classifier cache in
    ``cache``: its JSON and its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "gsclip"), *map(str, args), "--json"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "GSCLIP_CACHE_DIR": str(cache)})
    if done.returncode != 0:
        raise RuntimeError(f"gsclip {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - started


def eval_images(folder: Path, count: int) -> dict[str, int]:
    """The first ``count`` evaluation images as ``<key>.png`` (the stored bytes); key -> label."""
    folder.mkdir(parents=True)
    labels: dict[str, int] = {}
    with tarfile.open(EVAL_SHARD) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            if extension == "json" and len(labels) < count:
                labels[key] = json.loads(archive.extractfile(member).read())["label"]
                (folder / f"{key}.png").write_bytes(archive.extractfile(f"{key}.png").read())
    return labels


def byte_agreement(ours: dict[str, bytes]) -> dict[str, Any]:
    """Our records against the fit stage's, by key: identical count, largest decoded difference."""
    from gsclip_lib.data.splat_shards import splat_dataset
    from gsclip_lib.splats.codec import decode_splats

    stage = {sample.key: sample.record for sample in splat_dataset(str(FITTED), rank=0, world_size=1)}
    differ = [key for key in ours if ours[key] != stage.get(key)]
    largest = 0.0
    for key in (key for key in differ if key in stage):
        a, b = (decode_splats(record).splats for record in (ours[key], stage[key]))
        if a.positions.shape == b.positions.shape:
            pairs = zip((a.positions, a.cholesky, a.colours), (b.positions, b.cholesky, b.colours))
            largest = max(largest, *(float((x - y).abs().max()) for x, y in pairs))
    return {"images": len(ours), "bytes_identical": len(ours) - len(differ), "differing_keys": differ[:20],
            "max_abs_difference": largest}


def evaluate_hits() -> dict[str, int]:
    with open(PER_IMAGE, newline="") as stream:
        return {row["key"]: int(row["N22"]) for row in csv.DictReader(stream) if row["set"] == "eval"}


def agreement_and_throughput(work: Path, count: int) -> dict[str, Any]:
    labels = eval_images(work / "png", count)
    pngs = sorted((work / "png").glob("*.png"))
    encoded, encode_wall = gsclip("encode", *pngs, "--splats", 22, "-o", work / "gsplat", cache=work / "cache")
    files = sorted((work / "gsplat").glob("*.gsplat"))
    record = byte_agreement({path.stem: path.read_bytes() for path in files})
    classified, classify_wall = gsclip("classify", *files, "--model", LEVEL, "--top", 1, cache=work / "cache")
    hits = {Path(row["file"]).stem: int(row["top"][0]["label"] == labels[Path(row["file"]).stem])
            for row in classified["files"]}
    stage_hits = evaluate_hits()
    paired = [key for key in hits if key in stage_hits]
    with_reading = classified["read_seconds"] + classified["classify_seconds"]
    return {
        "encode": {"images": len(pngs), "wall_seconds": round(encode_wall, 2), **encoded["total"]},
        "bytes": record,
        "top1": {"images": len(hits), "paired_with_evaluate": len(paired),
                 "agree_with_evaluate": sum(hits[key] == stage_hits[key] for key in paired),
                 "gsclip_top1": sum(hits.values()) / len(hits),
                 "evaluate_top1_same_images": sum(stage_hits[key] for key in paired) / max(1, len(paired))},
        "many_files": {"files": len(files), "wall_seconds": round(classify_wall, 2),
                       "load_seconds": classified["load_seconds"], "read_seconds": classified["read_seconds"],
                       "classify_seconds": classified["classify_seconds"],
                       "classifier_cached": classified["classifier_cached"],
                       "files_per_second": round(len(files) / with_reading, 1),
                       "files_per_second_without_reading": classified["images_per_second"]},
    }


def one_file(work: Path, repeats: int) -> dict[str, Any]:
    """One file classified ``1 + repeats`` times, each in a fresh process: first with an empty
    classifier cache, then from it."""
    path = sorted((work / "gsplat").glob("*.gsplat"))[0]
    runs = []
    for _ in range(1 + repeats):
        result, wall = gsclip("classify", path, "--model", LEVEL, "--top", 3, cache=work / "one_file_cache")
        runs.append({"wall_seconds": round(wall, 3),
                     **{key: result[key] for key in ("classifier_cached", "read_seconds", "load_seconds",
                                                     "classify_seconds")}})
    cold, warm = runs[0], [run["wall_seconds"] for run in runs[1:]]
    return {"file": str(path.name), "cold_cache_seconds": cold["wall_seconds"], "wall_seconds": warm,
            "best_seconds": min(warm), "median_seconds": sorted(warm)[len(warm) // 2], "runs": runs}


def run(quick: bool) -> dict[str, Any]:
    missing = [str(p.relative_to(ROOT)) for p in (LEVEL / "splat_encoder.pt", EVAL_SHARD, FITTED, PER_IMAGE)
               if not p.exists()]
    if missing:
        raise SystemExit(f"benchmarks.command needs the default run's outputs (make repro); missing {missing}")
    count, repeats = (20, 1) if quick else (1000, 3)
    with tempfile.TemporaryDirectory(prefix="gsclip-command-") as folder:
        work = Path(folder)
        checks = timed_section(agreement_and_throughput, work, count)
        single = timed_section(one_file, work, repeats)
    many, record, top1 = checks["many_files"], checks["bytes"], checks["top1"]
    return {
        "benchmark": "gsclip command (issue 20)", "quick": quick, "targets": TARGETS,
        "one_file": single, "many_files": many, "encode": checks["encode"], "agreement": {"bytes": record, "top1": top1},
        "load_average": {"agreement_and_many_files": checks["load_average"], "one_file": single["load_average"]},
        "verdicts": {
            "one_file_under_target": single["median_seconds"] < TARGETS["one_file_seconds"],
            "one_file_from_cache": all(run["classifier_cached"] for run in single["runs"][1:]),
            "files_per_second_at_target": many["files_per_second"] >= TARGETS["files_per_second"],
            "bytes_identical": record["bytes_identical"] == record["images"],
            "top1_agrees": top1["agree_with_evaluate"] == top1["paired_with_evaluate"] == top1["images"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "command.json"))
    parser.add_argument("--quick", action="store_true", help="20 images, one repeat (the test's mode)")
    args = parser.parse_args(argv)
    result = {**run(args.quick), "command": command_line("benchmarks.command", argv), "machine": machine_info()}
    write_json(args.out, result)
    one, many, agree = result["one_file"], result["many_files"], result["agreement"]
    print(f"one file end to end: {one['median_seconds']:.2f} s median of {one['wall_seconds']} from the classifier "
          f"cache (target < {TARGETS['one_file_seconds']} s); {one['cold_cache_seconds']:.2f} s building it")
    print(f"{many['files']} files: {many['files_per_second']:.0f} files/s once loaded (target >= "
          f"{TARGETS['files_per_second']:.0f}); model loaded in {many['load_seconds']:.2f} s")
    print(f"bytes identical: {agree['bytes']['bytes_identical']}/{agree['bytes']['images']} (max difference "
          f"{agree['bytes']['max_abs_difference']:g}); top-1 agrees with evaluate: "
          f"{agree['top1']['agree_with_evaluate']}/{agree['top1']['paired_with_evaluate']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
