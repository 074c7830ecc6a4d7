"""The benchmark's quick mode end to end, and the pieces its figures rest on.

The quick mode runs as a subprocess, as ``make bench`` would, with ``GSCLIP_COMPILE=0``: compiling
the fast path costs 10-40 s per process and the benchmark starts several processes, which would
take the test past a minute; the eager fast path exercises the same code and the same JSON. The
checks are on structure and consistency (ratios computed from the reported timings, targets that
follow from the ratios), not on speed: quick-mode timings on a shared machine say nothing.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.windowed_vs_dense import (
    NO_WORSE_TARGET,
    SPEEDUP_TARGET,
    BenchmarkSettings,
    PeakRss,
    current_rss_mb,
    evaluate_targets,
    gray_photo_crops,
    read_idx_images,
)

QUICK = BenchmarkSettings.quick_settings()


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "windowed_vs_dense.json"
    env = dict(os.environ, GSCLIP_COMPILE="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.windowed_vs_dense", "--out", str(out), "--quick", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "target photos_speedup_10x" in done.stdout, "the summary table was not printed"
    return json.loads(out.read_text())


def test_report_records_machine_and_mode(report):
    assert report["mode"] == "quick"
    assert {"machine", "settings", "small_gray", "photos_224", "targets", "load_average", "runtime_seconds"} <= set(report)
    machine = report["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["torch_version"] == torch.__version__
    assert machine["device"] == "cpu"
    assert machine["GSCLIP_COMPILE"] == "0" and machine["compile_enabled"] is False
    assert machine["date"][:4].isdigit()
    assert len(report["load_average"]["start"]) == 3


def test_small_gray_figures_are_consistent(report):
    small = report["small_gray"]
    assert (small["image_size"], small["num_splats"], small["batch"]) == (28, 22, QUICK.small_batch)
    assert small["source"]["name"] in ("fashion-mnist", "scikit-image photos")
    for role in ("fast", "dense"):
        entry = small[role]
        assert positive_finite(entry["seconds"]) and positive_finite(entry["images_per_second"])
        assert entry["images_per_second"] == pytest.approx(small["batch"] / entry["seconds"], rel=1e-9)
        assert 10.0 < entry["mean_psnr_db"] < 60.0
    assert small["speedup"] == pytest.approx(small["dense"]["seconds"] / small["fast"]["seconds"], rel=1e-9)
    # The two backends compute the same render (same cutoff): the fits must agree.
    assert abs(small["fast"]["mean_psnr_db"] - small["dense"]["mean_psnr_db"]) < 0.05


def test_photo_timings_ratios_and_memory_are_consistent(report):
    photos = report["photos_224"]
    assert photos["image_size"] == QUICK.photo_size
    assert {"timing", "memory", "psnr"} <= set(photos["method"])
    assert photos["paper_reference"]["psnr_db"] == 37.4
    assert [row["num_splats"] for row in photos["counts"]] == list(QUICK.photo_counts)
    for row in photos["counts"]:
        for role, timed in (("dense", QUICK.dense_timed), ("fast", QUICK.fast_timed)):
            entry = row[role]
            assert "error" not in entry, entry.get("error")
            assert entry["timed_iterations"] == timed == len(entry["iteration_seconds"])
            assert all(positive_finite(seconds) for seconds in entry["iteration_seconds"])
            assert entry["seconds_per_iteration"] == statistics.median(entry["iteration_seconds"])
            assert positive_finite(entry["peak_rss_mb"])
            # The high-water mark starts from the RSS at its reset, right after rss_after_warmup_mb.
            assert entry["peak_extra_mb"] > -5.0
            assert entry["peak_over_baseline_mb"] == pytest.approx(
                entry["peak_rss_mb"] - entry["baseline_rss_mb"], abs=1e-9
            )
        expected = row["dense"]["seconds_per_iteration"] / row["fast"]["seconds_per_iteration"]
        assert row["speedup"] == pytest.approx(expected, rel=1e-12)
        assert row["fit_psnr_db"] == row["fast"]["fit"]["psnr_db"]
        assert row["fast"]["fit"]["iterations"] == QUICK.fit_iterations
        assert 5.0 < row["fit_psnr_db"] < 60.0


def test_targets_follow_the_measured_ratios(report):
    targets = report["targets"]
    largest = max(report["photos_224"]["counts"], key=lambda row: row["num_splats"])
    speed = targets["photos_speedup_10x"]
    assert speed["measured"] == largest["speedup"]
    assert speed["threshold"] == SPEEDUP_TARGET
    assert speed["met"] == (speed["measured"] >= SPEEDUP_TARGET)
    assert speed["at_target_setting"] is False, "quick mode does not measure at 224x224 with 3136 splats"
    no_worse = targets["small_gray_no_worse"]
    assert no_worse["measured"] == report["small_gray"]["speedup"]
    assert no_worse["met"] == (no_worse["measured"] >= NO_WORSE_TARGET)


def test_a_failed_measurement_misses_its_target():
    small = {"speedup": 0.5, "image_size": 28, "num_splats": 22, "batch": 8}
    photos = {"image_size": 224, "counts": [{"num_splats": 3136, "speedup": None}, {"num_splats": 400, "speedup": 30.0}]}
    targets = evaluate_targets(small, photos)
    assert targets["photos_speedup_10x"]["met"] is False
    assert targets["photos_speedup_10x"]["at_target_setting"] is True
    assert "failed" in targets["photos_speedup_10x"]["note"]
    assert targets["small_gray_no_worse"]["met"] is False


def test_idx_reader_round_trips_a_written_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    header = b"".join(value.to_bytes(4, "big") for value in (2051, 5, 28, 28))
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(header + pixels.tobytes())
    images = read_idx_images(path, 3)
    assert images.shape == (3, 1, 28, 28)
    torch.testing.assert_close(images[:, 0], torch.from_numpy(pixels[:3]).float() / 255.0, rtol=0, atol=0)
    with gzip.open(path, "wb") as stream:
        stream.write((2049).to_bytes(4, "big") + header[4:] + pixels.tobytes())
    with pytest.raises(ValueError, match="idx magic number 2049, expected 2051"):
        read_idx_images(path, 3)


def test_gray_crops_are_deterministic_real_pictures():
    first = gray_photo_crops(16, 28, seed=3)
    assert first.shape == (16, 1, 28, 28)
    assert torch.equal(first, gray_photo_crops(16, 28, seed=3))
    assert not torch.equal(first, gray_photo_crops(16, 28, seed=4))
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert float(first.flatten(1).std(1).median()) > 0.01, "crops should hold picture detail, not flat fill"


def test_peak_rss_sees_a_short_lived_allocation():
    before = current_rss_mb()
    with PeakRss() as peak:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched, then freed before the block ends
        del block
    assert peak.method
    assert current_rss_mb() - before < 50.0, "the block should be gone by now"
    assert peak.peak_mb - before >= 190.0
