"""The old-against-new fitting benchmark (benchmarks/fitting.py): its quick mode end to end, and the
pieces its figures rest on.

The quick mode runs as a subprocess, as ``make bench`` would, with ``GSCLIP_COMPILE=0`` (compiling
the old windowed path would cost more than the whole quick run; the eager path computes the same).
The checks are on structure and internal consistency: derived figures recomputed here from the
curves, targets that follow from the measured values, curves ordered in steps and time, PSNRs in a
sane range, pruning without a refit no better than with one. Nothing here depends on the machine's
speed: quick-mode timings on a shared machine say nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.fitting import (
    GAIN_AT_EQUAL_TIME_DB,
    HALVING_COST_DB,
    OLD_PHOTO,
    OLD_SMALL,
    PAPER_PSNR_DB,
    PEAK_FRACTION_TARGET,
    PEAK_GFLOPS,
    SECTIONS,
    TIME_FRACTION,
    BenchmarkSettings,
    count_within_cutoff,
    flops_backward,
    flops_forward,
    main,
    photos_targets,
    prune_targets,
    psnr_at_time,
    time_to_reach,
)
from gsclip_lib.splats.container import Splats
from kernels.rasterize_torch import splat_weights_dense

QUICK = BenchmarkSettings.quick_settings()
PSNR_RANGE = (5.0, 60.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "fitting.json"
    env = dict(os.environ, GSCLIP_COMPILE="0")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fitting", "--out", str(out), "--quick", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "target small_gray.gain_at_equal_cpu_time" in done.stdout, "the summary table was not printed"
    return json.loads(out.read_text())


# Independent readings of a curve, to check the benchmark's own.
def last_within(curve: dict, budget: float, clock: str) -> float | None:
    value = None
    for psnr, seconds in zip(curve["psnr"], curve[clock]):
        if seconds <= budget:
            value = psnr
    return value


def first_at_least(curve: dict, target: float, key: str) -> float | None:
    for psnr, value in zip(curve["psnr"], curve[key]):
        if psnr >= target:
            return value
    return None


def check_target(target: dict) -> None:
    measured, threshold = target["measured"], target["threshold"]
    if measured is None:
        assert target["met"] is False
        return
    expected = {">=": measured >= threshold, "<=": measured <= threshold, ">": measured > threshold}
    assert target["met"] is expected[target["comparison"]]


def check_run(run: dict, steps: int) -> None:
    """A timed fit: its curve starts at step 0, ends at the fit, in order of steps and time."""
    curve = run["curve"]
    assert run["steps"] == steps
    assert curve["step"][0] == 0 and curve["step"][-1] == steps
    assert all(b > a for a, b in zip(curve["step"], curve["step"][1:])), "steps must increase"
    for clock in ("seconds", "cpu_seconds"):
        assert all(b >= a for a, b in zip(curve[clock], curve[clock][1:])), f"{clock} must not decrease"
        assert curve[clock][0] >= 0.0
    assert len(curve["psnr"]) == len(curve["step"])
    assert all(PSNR_RANGE[0] < value < PSNR_RANGE[1] for value in curve["psnr"])
    assert curve["psnr"][-1] == run["psnr_db"]
    assert curve["seconds"][-1] == run["seconds"] and curve["cpu_seconds"][-1] == run["cpu_seconds"]
    assert run["dropped"] == 0


def test_report_records_machine_threads_and_method(report):
    assert report["mode"] == "quick"
    assert report["sections"] == list(SECTIONS)
    assert set(SECTIONS) | {"machine", "settings", "threads", "fitters", "targets", "command"} <= set(report)
    assert report["command"].startswith("python -m benchmarks.fitting")
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["cpu_model"]
    assert machine["torch_version"] == torch.__version__
    assert machine["torch_threads"] == report["threads"]["torch_threads"] == 1, "single-threaded by default"
    assert "shared" in report["threads"]["why"]
    assert machine["GSCLIP_COMPILE"] == "0" and machine["compile_enabled"] is False
    assert machine["date"][:4].isdigit()
    for name in SECTIONS:
        assert isinstance(report[name]["method"], str) and report[name]["method"]
        assert len(report[name]["load_average"]["before"]) == len(report[name]["load_average"]["after"]) == 3
    # The old fitter is the landed main's algorithm.
    for key in ("old_small", "old_photo"):
        old = report["fitters"][key]
        assert (old["colour_solve"], old["reseed_every"], old["backend"]) == ("none", 0, "windowed")
    assert report["fitters"]["old_small"] == OLD_SMALL.model_dump()
    assert report["fitters"]["old_photo"] == OLD_PHOTO.model_dump()
    assert OLD_SMALL.iterations == 70 and OLD_SMALL.colour_l1 == 1e-6 and OLD_PHOTO.iterations == 80


def test_small_gray_curves_and_derived_figures(report):
    small = report["small_gray"]
    assert (small["images"], small["image_size"], small["num_splats"]) == (QUICK.images, 28, 22)
    runs = small["runs"]
    expected = {f"old_{QUICK.old_steps}": QUICK.old_steps, f"old_{QUICK.long_steps}": QUICK.long_steps,
                f"new_{QUICK.new_steps}": QUICK.new_steps, f"new_{QUICK.long_steps}": QUICK.long_steps}
    assert set(runs) == set(expected)
    for name, steps in expected.items():
        check_run(runs[name], steps)
        if runs[name]["fitter"] == "old":
            assert runs[name]["reseeded"] == 0
    old = runs[f"old_{QUICK.old_steps}"]
    new, new_long = runs[f"new_{QUICK.new_steps}"], runs[f"new_{QUICK.long_steps}"]
    derived = small["derived"]
    assert derived["old_psnr_db"] == old["psnr_db"] and derived["old_cpu_seconds"] == old["cpu_seconds"]
    for clock in ("seconds", "cpu_seconds"):
        at_time = last_within(new_long["curve"], old[clock], clock)
        assert derived[f"new_psnr_at_old_{clock}_db"] == at_time
        assert derived[f"gain_at_old_{clock}_db"] == pytest.approx(at_time - old["psnr_db"])
        to_reach = first_at_least(new["curve"], old["psnr_db"], clock)
        assert derived[f"new_{clock}_to_old_psnr"] == to_reach
        if to_reach is not None:
            assert derived[f"time_fraction_{clock}"] == pytest.approx(to_reach / old[clock])
    assert derived["new_step_reaching_old_psnr"] == first_at_least(new["curve"], old["psnr_db"], "step")
    assert derived["equal_time_beyond_curve"] == (new_long["cpu_seconds"] < old["cpu_seconds"])
    targets = small["targets"]
    assert targets["gain_at_equal_cpu_time"]["measured"] == derived["gain_at_old_cpu_seconds_db"]
    assert targets["gain_at_equal_cpu_time"]["threshold"] == GAIN_AT_EQUAL_TIME_DB
    assert targets["time_to_equal_quality"]["measured"] == derived["time_fraction_cpu_seconds"]
    assert targets["time_to_equal_quality"]["threshold"] == pytest.approx(TIME_FRACTION)
    for target in targets.values():
        check_target(target)


def test_photos_curves_derived_figures_and_target(report):
    photos = report["photos"]
    assert photos["image_size"] == QUICK.photo_size and photos["photos"] == list(QUICK.photos)
    assert [row["num_splats"] for row in photos["counts"]] == list(QUICK.photo_counts)
    for row in photos["counts"]:
        check_run(row["old"], QUICK.old_photo_steps)
        check_run(row["new"], QUICK.new_photo_steps)
        for role in ("old", "new"):
            per_photo = row[role]["per_image_psnr_db"]
            assert len(per_photo) == len(QUICK.photos)
            assert row[role]["psnr_db"] == pytest.approx(sum(per_photo) / len(per_photo), abs=1e-4)
        old, new, derived = row["old"], row["new"], row["derived"]
        assert derived["gain_db"] == pytest.approx(new["psnr_db"] - old["psnr_db"])
        assert derived["new_psnr_at_old_cpu_seconds_db"] == last_within(new["curve"], old["cpu_seconds"], "cpu_seconds")
        assert derived["new_step_reaching_old_psnr"] == first_at_least(new["curve"], old["psnr_db"], "step")
        assert derived["new_cpu_seconds_to_old_psnr"] == first_at_least(new["curve"], old["psnr_db"], "cpu_seconds")
    target = photos["targets"]["paper_psnr_within_1000_steps"]
    largest = max(photos["counts"], key=lambda row: row["num_splats"])
    assert target["measured"] == largest["new"]["psnr_db"] and target["threshold"] == PAPER_PSNR_DB
    assert target["first_step_reaching"] == first_at_least(largest["new"]["curve"], PAPER_PSNR_DB, "step")
    assert target["at_target_setting"] is False, "quick mode fits 64x64 photos"
    check_target(target)


@pytest.mark.parametrize("name", ["prune_small", "prune_photos"])
def test_pruning_cascades_are_consistent(report, name):
    section = report[name]
    levels = list(QUICK.prune_levels if name == "prune_small" else QUICK.prune_photo_levels)
    refit_steps = QUICK.prune_refit_steps if name == "prune_small" else QUICK.prune_photo_refit_steps
    large_steps = QUICK.new_steps if name == "prune_small" else QUICK.prune_photo_large_steps
    assert section["levels"] == levels and section["refit_steps"] == refit_steps
    assert section["large"]["steps"] == large_steps and section["large"]["num_splats"] == levels[0]
    assert section["scores"] == list(QUICK.prune_scores if name == "prune_small" else QUICK.prune_photo_scores)
    for count, total in zip(levels[1:], range(large_steps + refit_steps, 10**6, refit_steps)):
        small = section["fit_small"][str(count)]
        assert (small["num_splats"], small["steps"]) == (count, total)
        assert PSNR_RANGE[0] < small["psnr_db"] < PSNR_RANGE[1]
    for score, steps in section["cascades"].items():
        parent = section["large"]["psnr_db"]
        assert [step["num_splats"] for step in steps] == levels[1:]
        for step in steps:
            assert step["total_steps"] == section["fit_small"][str(step["num_splats"])]["steps"]
            assert step["refit"]["steps"] == refit_steps and step["refit_db"] == step["refit"]["psnr_db"]
            for key in ("pruned_no_refit_db", "pruned_solved_colours_db", "refit_db"):
                assert PSNR_RANGE[0] < step[key] < PSNR_RANGE[1], (score, step["num_splats"], key)
            # Pruning alone can only do worse than pruning and refitting.
            assert step["pruned_no_refit_db"] <= step["refit_db"], (score, step["num_splats"])
            assert step["pruned_solved_colours_db"] <= step["refit_db"], (score, step["num_splats"])
            assert step["fit_small_db"] == section["fit_small"][str(step["num_splats"])]["psnr_db"]
            assert step["margin_over_fit_small_db"] == pytest.approx(step["refit_db"] - step["fit_small_db"])
            assert step["drop_from_parent_db"] == pytest.approx(parent - step["refit_db"])
            parent = step["refit_db"]
    assert section["targets"] == json.loads(json.dumps(prune_targets(section)))
    halving = section["targets"]["halving_cost_after_refit"]
    assert halving["threshold"] == HALVING_COST_DB and halving["score"] == section["target_score"]
    assert halving["measured"] == pytest.approx(
        section["large"]["psnr_db"] - section["cascades"][section["target_score"]][0]["refit_db"]
    )
    beats = section["targets"]["prune_beats_fit_small"]
    assert beats["measured"] == min(
        step["margin_over_fit_small_db"] for step in section["cascades"][section["target_score"]]
    )
    for target in section["targets"].values():
        check_target(target)


def test_rasterizer_rates_follow_from_the_timings(report):
    section = report["rasterizer"]
    assert section["peak_gflops"] == PEAK_GFLOPS
    shapes = {"small_gray": (QUICK.images, 22, 28, 1), "photo": (1, QUICK.raster_photo_splats, QUICK.photo_size, 3)}
    for name, (batch, count, size, channels) in shapes.items():
        case = section["cases"][name]
        assert (case["batch"], case["num_splats"], case["height"], case["width"], case["channels"]) == (
            batch, count, size, size, channels)
        dense = batch * count * size * size
        inside = case["evaluations_within_cutoff"]
        assert case["dense_equivalent_evaluations"] == dense and 0 < inside <= dense
        assert case["clock"].startswith("cpu")
        # Both kernels render the same picture.
        assert case["max_abs_difference_cpp_vs_old"] < 1e-3
        for kernel in ("cpp", "old_windowed"):
            entry = case[kernel]
            forward, both = entry["forward_seconds"], entry["forward_backward_seconds"]
            assert forward > 0 and both > 0
            assert entry["dense_equivalent_evaluations_per_second_forward"] == pytest.approx(dense / forward)
            assert entry["within_cutoff_evaluations_per_second_forward_backward"] == pytest.approx(inside / both)
            gflops = inside * (flops_forward(channels) + flops_backward(channels)) / both / 1e9
            assert entry["useful_gflops_forward_backward"] == pytest.approx(gflops)
            assert entry["fraction_of_peak_two_cores_forward_backward"] == pytest.approx(gflops / 190.0)
            assert entry["fraction_of_peak_one_core_forward_backward"] == pytest.approx(gflops / 95.0)
        assert case["speedup_forward_backward"] == pytest.approx(
            case["old_windowed"]["forward_backward_seconds"] / case["cpp"]["forward_backward_seconds"])
    target = section["targets"]["fraction_of_peak"]
    assert target["threshold"] == PEAK_FRACTION_TARGET
    assert target["measured"] == section["cases"]["small_gray"]["cpp"]["fraction_of_peak_two_cores_forward_backward"]
    check_target(target)


def test_top_level_targets_gather_every_section(report):
    gathered = report["targets"]
    assert set(gathered) == {f"{name}.{key}" for name in SECTIONS for key in report[name]["targets"]}
    for key, target in gathered.items():
        section, name = key.split(".")
        assert target == report[section]["targets"][name]
        assert isinstance(target["met"], bool)


def test_curve_readings():
    curve = {"step": [0, 5, 10], "seconds": [1.0, 2.0, 3.0], "cpu_seconds": [0.5, 1.0, 1.5], "psnr": [10.0, 12.0, 11.5]}
    assert psnr_at_time(curve, 0.4) is None
    assert psnr_at_time(curve, 1.0) == 12.0
    assert psnr_at_time(curve, 9.0) == 11.5
    assert psnr_at_time(curve, 2.5, "seconds") == 12.0
    assert time_to_reach(curve, 11.0) == 1.0
    assert time_to_reach(curve, 12.5) is None


def test_a_missed_or_failed_measurement_misses_its_target():
    curve = {"step": [0, 10], "seconds": [0.1, 1.0], "cpu_seconds": [0.1, 1.0], "psnr": [20.0, 30.0]}
    photos = {"image_size": 224, "counts": [{"num_splats": 3136, "new": {"psnr_db": 30.0, "steps": 1000, "curve": curve}}]}
    target = photos_targets(photos)["paper_psnr_within_1000_steps"]
    assert target["met"] is False and target["first_step_reaching"] is None and target["at_target_setting"] is True
    section = {
        "levels": [22, 11], "target_score": "energy", "large": {"psnr_db": 26.0},
        "cascades": {"energy": [{"refit_db": 22.5, "margin_over_fit_small_db": -0.1}],
                     "luminance": [{"refit_db": 23.5, "margin_over_fit_small_db": 0.3}]},
    }
    targets = prune_targets(section)
    assert targets["halving_cost_after_refit"]["measured"] == pytest.approx(3.5)
    assert targets["halving_cost_after_refit"]["met"] is False
    assert targets["halving_cost_after_refit"]["by_score"]["luminance"] == pytest.approx(2.5)
    assert targets["prune_beats_fit_small"]["met"] is False


def test_within_cutoff_count_matches_the_dense_weights():
    generator = torch.Generator().manual_seed(1)
    batch, count, height, width, cutoff = 3, 7, 20, 17, 2.5
    positions = torch.rand(batch, count, 2, generator=generator) * torch.tensor([width, height])
    diagonal = 0.5 + 3 * torch.rand(batch, count, 2, generator=generator)
    shear = torch.randn(batch, count, 1, generator=generator)
    cholesky = torch.cat([diagonal[..., :1], shear, diagonal[..., 1:]], -1)
    valid = torch.rand(batch, count, generator=generator) > 0.2
    splats = Splats(positions, cholesky, torch.ones(batch, count, 1), valid)
    weights = splat_weights_dense(positions, cholesky, valid, height, width, cutoff)
    expected = int((weights > 0).sum())
    assert count_within_cutoff(splats, height, width, cutoff) == expected
    assert count_within_cutoff(splats, height, width, cutoff, chunk_pixels=height * width) == expected
    assert count_within_cutoff(splats, height, width, math.inf) == int(valid.sum()) * height * width


def test_unknown_sections_are_refused(tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["--sections", "small_gray,nonsense", "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert exited.value.code == 2
    assert not (tmp_path / "x.json").exists()
