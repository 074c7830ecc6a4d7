"""The fitting benchmark (benchmarks/fitting.py): its quick mode end to end, and the pieces its
figures rest on.

The quick mode runs as a subprocess, as ``make bench`` would, with ``GSCLIP_COMPILE=0`` (nothing
here needs the compiled windowed path). The checks are on structure and internal consistency:
curves ordered in steps and time, rates recomputed from the timings with the one FLOP model, targets
that follow from the measured values, pruning without a refit no better than with one. Nothing here
depends on the machine's speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.cost_model import CPU_PEAK_GFLOPS, flops_backward, flops_forward
from benchmarks.fitting import (
    HALVING_COST_DB,
    PEAK_FRACTION_TARGET,
    SECTIONS,
    BenchmarkSettings,
    count_within_cutoff,
    first_reaching,
    main,
    target,
)
from benchmarks.harness import paper_splat_counts
from gsclip_lib.splats.container import Splats
from kernels.rasterize_torch import splat_weights_dense

QUICK = BenchmarkSettings.quick_settings()
PSNR_RANGE = (5.0, 60.0)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fitting") / "fitting.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.fitting", "--out", str(out), "--quick", "--no-progress"],
                          env=dict(os.environ, GSCLIP_COMPILE="0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "target rasterizer.fraction_of_peak" in done.stdout, "the summary table was not printed"
    return json.loads(out.read_text())


def check_target(entry: dict) -> None:
    measured, threshold = entry["measured"], entry["threshold"]
    expected = {">=": lambda: measured >= threshold, "<=": lambda: measured <= threshold,
                ">": lambda: measured > threshold}[entry["comparison"]]
    assert entry["met"] is (measured is not None and expected())


def check_run(run: dict, steps: int) -> None:
    """A timed fit: its curve starts at step 0, ends at the fit, in order of steps and time."""
    curve = run["curve"]
    assert run["steps"] == steps and curve["step"][0] == 0 and curve["step"][-1] == steps
    assert all(b > a for a, b in zip(curve["step"], curve["step"][1:])), "steps must increase"
    for clock in ("seconds", "cpu_seconds"):
        assert all(b >= a >= 0 for a, b in zip(curve[clock], curve[clock][1:])), f"{clock} must not decrease"
    assert len(curve["psnr"]) == len(curve["step"])
    assert all(PSNR_RANGE[0] < value < PSNR_RANGE[1] for value in curve["psnr"])
    assert curve["psnr"][-1] == run["psnr_db"]
    assert curve["seconds"][-1] == run["seconds"] and curve["cpu_seconds"][-1] == run["cpu_seconds"]
    assert run["dropped"] == 0


def test_the_full_settings_come_from_the_profiles() -> None:
    full = BenchmarkSettings()
    assert full.photo_counts == paper_splat_counts()
    assert full.raster_photo_splats == max(paper_splat_counts())


def test_report_records_machine_threads_and_method(result) -> None:
    assert result["mode"] == "quick" and result["sections"] == list(SECTIONS)
    assert result["command"].startswith("python -m benchmarks.fitting")
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_version"] == torch.__version__
    assert machine["torch_threads"] == result["threads"]["torch_threads"] == 1, "single-threaded by default"
    assert machine["compile_enabled"] is False and set(machine["git"]) == {"commit", "dirty"}
    for name in SECTIONS:
        assert isinstance(result[name]["method"], str) and result[name]["method"]
        assert len(result[name]["load_average"]["before"]) == len(result[name]["load_average"]["after"]) == 3
    assert list(result)[-2:] == ["targets", "runtime_seconds"]


def test_small_gray_curves(result) -> None:
    small = result["small_gray"]
    assert (small["images"], small["image_size"], small["num_splats"]) == (QUICK.images, 28, QUICK.small_splats)
    assert set(small["runs"]) == {f"fit_{steps}" for steps in QUICK.small_steps}
    for steps in QUICK.small_steps:
        run = small["runs"][f"fit_{steps}"]
        check_run(run, steps)
        assert small["cpu_seconds_per_step"][f"fit_{steps}"] == pytest.approx(run["cpu_seconds"] / steps)


def test_schedules_compare_the_recipe_the_previous_and_the_chosen_schedule(result) -> None:
    section = result["schedules"]
    assert section["step_grid"] == list(QUICK.step_grid) and section["margin_db"] == QUICK.margin_db
    assert {name: group["photos"] for name, group in section["sets"].items()} == {
        "stage": list(QUICK.stage_photos), "other": list(QUICK.other_photos)}
    assert section["schedules"]["paper_recipe"]["colour_solve"] == "none"
    assert section["schedules"]["paper_recipe"]["reseed_every"] == 0
    for name, group in section["sets"].items():
        assert [entry["num_splats"] for entry in group["counts"]] == list(QUICK.schedule_counts)
        for entry in group["counts"]:
            runs = entry["runs"]
            check_run(runs["paper_recipe"], QUICK.recipe_steps)
            check_run(runs["previous"], max(QUICK.step_grid))
            chosen = runs["chosen"]
            assert chosen["steps"] == list(QUICK.step_grid) and len(chosen["psnr_db"]) == len(QUICK.step_grid)
            assert all(PSNR_RANGE[0] < value < PSNR_RANGE[1] for value in chosen["psnr_db"])
            assert entry["published_db"] is None, "quick mode fits 64x64 photos, not the paper's setting"
            assert entry["reference_db"] == runs["paper_recipe"]["psnr_db"]
            assert entry["needed_db"] == pytest.approx(entry["reference_db"] + QUICK.margin_db)
            assert entry["steps_to_needed"]["chosen"] == first_reaching(
                {"step": chosen["steps"], "psnr": chosen["psnr_db"]}, entry["needed_db"])
            assert entry["steps_to_needed"]["previous"] == first_reaching(runs["previous"]["curve"], entry["needed_db"])
            # the previous schedule solves before every step; the chosen (sparse) one rarely
            assert entry["passes"]["previous"]["adjoint"] > entry["passes"]["chosen"]["adjoint"]
            assert entry["passes"]["previous"]["backward"] == entry["passes"]["chosen"]["backward"] == 1
            check_target(section["targets"][f"{name}_{entry['num_splats']}_reached"])


def test_the_published_figure_floors_only_the_stage_photos_at_the_largest_count() -> None:
    from benchmarks.fitting import PAPER_PSNR_DB, needed_psnr
    from benchmarks.harness import paper_splat_counts

    largest, smallest = max(paper_splat_counts()), min(paper_splat_counts())
    assert needed_psnr(34.0, largest, True, 0.3) == (PAPER_PSNR_DB, PAPER_PSNR_DB, pytest.approx(PAPER_PSNR_DB + 0.3))
    assert needed_psnr(39.0, largest, True, 0.3) == (39.0, PAPER_PSNR_DB, pytest.approx(39.3))  # a floor, not a cap
    assert needed_psnr(34.0, largest, False, 0.3) == (34.0, None, pytest.approx(34.3))  # another photo set
    assert needed_psnr(27.0, smallest, True, 0.3) == (27.0, None, pytest.approx(27.3))  # no published figure there


@pytest.mark.parametrize("name", ["prune_small", "prune_photos"])
def test_pruning_cascades_are_consistent(result, name) -> None:
    section = result[name]
    small = name == "prune_small"
    levels = list(QUICK.prune_levels if small else QUICK.photo_counts)
    refit_steps = QUICK.prune_refit_steps if small else QUICK.prune_photo_refit_steps
    large_steps = QUICK.small_steps[0] if small else QUICK.prune_photo_large_steps
    assert section["levels"] == levels and section["refit_steps"] == refit_steps
    assert section["large"]["steps"] == large_steps and section["large"]["num_splats"] == levels[0]
    for depth, count in enumerate(levels[1:], start=1):
        assert section["fit_small"][str(count)]["steps"] == large_steps + depth * refit_steps
    for score, steps in section["cascades"].items():
        parent = section["large"]["psnr_db"]
        assert [step["num_splats"] for step in steps] == levels[1:]
        for step in steps:
            assert step["refit"]["steps"] == refit_steps and step["refit_db"] == step["refit"]["psnr_db"]
            for key in ("pruned_no_refit_db", "pruned_solved_colours_db", "refit_db", "fit_small_db"):
                assert PSNR_RANGE[0] < step[key] < PSNR_RANGE[1], (score, step["num_splats"], key)
            # Pruning alone can only do worse than pruning and refitting.
            assert max(step["pruned_no_refit_db"], step["pruned_solved_colours_db"]) <= step["refit_db"]
            assert step["margin_over_fit_small_db"] == pytest.approx(step["refit_db"] - step["fit_small_db"])
            assert step["drop_from_parent_db"] == pytest.approx(parent - step["refit_db"])
            parent = step["refit_db"]
    targets, chosen = section["targets"], section["cascades"][section["target_score"]]
    assert targets["halving_cost_after_refit"]["threshold"] == HALVING_COST_DB
    assert targets["halving_cost_after_refit"]["measured"] == pytest.approx(
        section["large"]["psnr_db"] - chosen[0]["refit_db"])
    assert targets["prune_beats_fit_small"]["measured"] == min(step["margin_over_fit_small_db"] for step in chosen)
    for entry in targets.values():
        check_target(entry)


def test_rasterizer_rates_follow_from_the_timings(result) -> None:
    section = result["rasterizer"]
    shapes = {"small_gray": (QUICK.images, QUICK.small_splats, 28, 1),
              "photo": (1, QUICK.raster_photo_splats, QUICK.photo_size, 3)}
    for name, (batch, count, size, channels) in shapes.items():
        case = section["cases"][name]
        assert (case["batch"], case["num_splats"], case["height"], case["width"], case["channels"]) == (
            batch, count, size, size, channels)
        dense, inside = batch * count * size * size, case["evaluations_within_cutoff"]
        assert case["dense_equivalent_evaluations"] == dense and 0 < inside <= dense
        assert case["flops_per_evaluation"] == {"forward": flops_forward(channels), "backward": flops_backward(channels)}
        both = case["forward_backward_seconds"]
        assert case["forward_seconds"] > 0 and both > 0 and case["clock"].startswith("cpu")
        gflops = inside * (flops_forward(channels) + flops_backward(channels)) / both / 1e9
        assert case["useful_gflops_forward_backward"] == pytest.approx(gflops)
        assert case["within_cutoff_evaluations_per_second_forward_backward"] == pytest.approx(inside / both)
        assert case["fraction_of_peak_two_cores_forward_backward"] == pytest.approx(gflops / CPU_PEAK_GFLOPS["two_cores"])
    entry = section["targets"]["fraction_of_peak"]
    assert entry["threshold"] == PEAK_FRACTION_TARGET
    assert entry["measured"] == section["cases"]["small_gray"]["fraction_of_peak_two_cores_forward_backward"]
    check_target(entry)


def test_top_level_targets_gather_every_section(result) -> None:
    gathered = result["targets"]
    assert set(gathered) == {f"{name}.{key}" for name in SECTIONS for key in result[name]["targets"]}
    for key, entry in gathered.items():
        section, name = key.split(".")
        assert entry == result[section]["targets"][name] and isinstance(entry["met"], bool)


def test_targets_and_curve_readings() -> None:
    curve = {"step": [0, 5, 10], "psnr": [10.0, 12.0, 11.5]}
    assert first_reaching(curve, 11.0) == 5 and first_reaching(curve, 12.5) is None
    assert target("x", None, ">=", 1.0)["met"] is False, "a missing measurement misses its target"
    assert target("x", 1.0, ">", 1.0)["met"] is False and target("x", 1.0, "<=", 1.0)["met"] is True


def test_within_cutoff_count_matches_the_dense_weights() -> None:
    generator = torch.Generator().manual_seed(1)
    batch, count, height, width, cutoff = 3, 7, 20, 17, 2.5
    positions = torch.rand(batch, count, 2, generator=generator) * torch.tensor([width, height])
    diagonal = 0.5 + 3 * torch.rand(batch, count, 2, generator=generator)
    shear = torch.randn(batch, count, 1, generator=generator)
    cholesky = torch.cat([diagonal[..., :1], shear, diagonal[..., 1:]], -1)
    valid = torch.rand(batch, count, generator=generator) > 0.2
    splats = Splats(positions, cholesky, torch.ones(batch, count, 1), valid)
    expected = int((splat_weights_dense(positions, cholesky, valid, height, width, cutoff) > 0).sum())
    assert count_within_cutoff(splats, height, width, cutoff) == expected
    assert count_within_cutoff(splats, height, width, cutoff, chunk_pixels=height * width) == expected
    assert count_within_cutoff(splats, height, width, math.inf) == int(valid.sum()) * height * width


def test_unknown_sections_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--sections", "small_gray,nonsense", "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert exited.value.code == 2
    assert not (tmp_path / "x.json").exists()
