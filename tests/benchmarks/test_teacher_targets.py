"""The teacher-target benchmark on a tiny repeat count: both ways are timed on the default's shapes,
the shard holds what it should, and the verdict follows from the measured numbers."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import teacher_targets
from gsclip_lib.params import load_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "teacher_targets.json"
    result = teacher_targets.main(["--out", str(out), "--samples", "64", "--repeats", "1"])
    return result, json.loads(out.read_text())


def test_both_ways_are_timed_on_the_default_shapes(report):
    result, saved = report
    assert saved == json.loads(json.dumps(result))
    params = load_params(ROOT / "params.yaml")
    batch = params.align.distill.batch_size
    assert saved["shape"]["batch_size"] == batch and saved["shape"]["distill_epochs"] == params.align.distill.epochs
    assert saved["shape"]["image_size"] == params.data.image_size and saved["shape"]["model"] == params.model.name
    assert saved["on_the_fly"]["batches_timed"] == 64 // batch
    assert saved["on_the_fly"]["median_us_per_sample"] > 0
    side = int(round(params.align.encoder.num_latents**0.5))
    for name, itemsize in (("fp32", 4), ("fp16", 2)):
        entry = saved["precomputed"][name]
        assert entry["batches_timed"] == 64 // batch
        assert entry["median_us_per_sample_read"] > 0 and entry["one_off_us_per_sample"] > 0
        if params.align.distill_target == "tokens":
            assert entry["target_shape"][0] == 1 + side * side
        assert entry["storage_raw_bytes_per_sample"] == int(np.prod(entry["target_shape"])) * itemsize
        assert entry["storage_tar_bytes_per_sample"] >= entry["storage_raw_bytes_per_sample"]
        expected = entry["median_us_per_sample_read"] + entry["one_off_us_per_sample"] / params.align.distill.epochs
        assert entry["per_epoch_us_per_sample"] == pytest.approx(expected, abs=0.01)
    assert saved["machine"]["cpu_count"] >= 1


def test_the_verdict_follows_from_the_numbers(report):
    saved = report[1]
    verdict = saved["verdict"]
    fly = saved["on_the_fly"]["per_epoch_us_per_sample"]
    best = min(entry["per_epoch_us_per_sample"] for entry in saved["precomputed"].values())
    assert verdict["on_the_fly_us_per_sample"] == fly and verdict["precomputed_us_per_sample"] == best
    assert verdict["faster"] == ("on_the_fly" if fly <= best else f"precomputed_{verdict['precomputed_format']}")
    assert verdict["speedup"] == pytest.approx(max(fly, best) / min(fly, best), rel=1e-3)


def test_synthetic_images_stand_in_without_fashion_mnist(tmp_path):
    params = load_params(ROOT / "params.yaml")
    params = params.replace(data=params.data.replace(fashion_mnist_dir=str(tmp_path)))
    images, source = teacher_targets.source_images(params, 5)
    size = params.data.image_size
    assert source.startswith("synthetic") and images.dtype == np.uint8
    assert images.shape[:3] == (5, size, size) and images.max() > 0
