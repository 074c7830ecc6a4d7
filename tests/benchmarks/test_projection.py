"""The paper-scale projection (benchmarks/projection.py): its arithmetic and structure, on the real
fitting.json and gpu_check.json but with the heavy parts (the ViT-B-16 FLOP count, the JPEG timing)
replaced by fixed numbers; the FLOP counter itself on tiny models. No timing assertions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from benchmarks import projection
from benchmarks.cost_model import ROOFLINE_DEVICE, device_peaks, roofline
from benchmarks.harness import paper_splat_counts
from benchmarks.projection import (
    NUM_GPUS,
    PAPER_IMAGES,
    count_flops,
    gpu_pass_seconds,
    fit_passes,
    roofline_pass_seconds,
)
from gsclip_lib.params import load_params

ROOT = Path(__file__).resolve().parents[2]
FAKE_FLOPS = {
    "teacher_forward_flops": 35e9,
    "text_forward_flops": 6e9,
    "student": {str(count): {"forward_backward_flops": flops}  # the paper's levels, largest first
                for count, flops in zip(paper_splat_counts(), (218e9, 163e9, 138e9, 120e9))},
}
LARGEST, SMALLEST = max(paper_splat_counts()), min(paper_splat_counts())
FAKE_DECODE = {"loader_decode_224_seconds": 3e-4, "loader_decode_512_to_224_seconds": 3e-3}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("projection") / "projection.json"
    projection.run(
        out, ROOT / "benchmarks/fitting.json", ROOT / "benchmarks/gpu_check.json", ROOT / "params.yaml",
        ROOT / "profiles/paper.yaml",
        flops_fn=lambda params, levels: copy.deepcopy(FAKE_FLOPS) | {"levels_asked": levels},
        decode_fn=lambda repeats: dict(FAKE_DECODE),
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml", profile=ROOT / "profiles/paper.yaml")


def test_structure_and_inputs(report, params) -> None:
    for key in ("inputs", "assumptions", "machine", "fitting", "training", "decode", "loader", "summary"):
        assert key in report
    for name in ("fitting", "gpu_check", "params", "profile"):
        assert len(report["inputs"][name]["sha256"]) == 64
    assert report["images"] == PAPER_IMAGES and report["gpus"] == NUM_GPUS
    assert report["training_flops"]["levels_asked"] == [params.fit.num_splats, *params.prune.levels]
    plan = report["fitting"]["plan"]
    assert {k: plan[0][k] for k in ("num_splats", "steps", "role")} == {
        "num_splats": params.fit.num_splats, "steps": params.fit.optimizer.iterations, "role": "top"}
    assert [p["num_splats"] for p in plan[1:-1]] == list(params.prune.levels)
    assert all(p["steps"] == params.prune.refit_iterations and p["role"] == "refit" for p in plan[1:-1])
    alone = plan[-1]
    assert alone["role"] == "alone" and alone["num_splats"] == min(params.levels())
    fitting = json.loads((ROOT / "benchmarks/fitting.json").read_text())
    needed = [entry["steps_to_needed"]["chosen"] for group in fitting["schedules"]["sets"].values()
              for entry in group["counts"] if entry["num_splats"] == alone["num_splats"]]
    assert alone["steps"] == (None if None in needed else max(needed))
    for fit in plan:
        assert fit["passes"] == fit_passes(params.fit.optimizer, fit["steps"] or 0)
    items = [row["item"] for row in report["summary"]]
    assert any(item.startswith("paper") for item in items) and any(item.startswith("total") for item in items)


def test_the_paper_profile_fits_the_steps_its_benchmark_found(params) -> None:
    """profiles/paper.yaml's top-level step count is the most any photo set needed at that count in the
    committed benchmarks/fitting.json, and its schedule is the one measured there."""
    fitting = json.loads((ROOT / "benchmarks/fitting.json").read_text())
    schedules = fitting["schedules"]
    needed = [entry["steps_to_needed"]["chosen"] for group in schedules["sets"].values()
              for entry in group["counts"] if entry["num_splats"] == params.fit.num_splats]
    assert needed and None not in needed
    assert params.fit.optimizer.iterations == params.fit_photos.optimizer.iterations == max(needed)
    measured = {key: value for key, value in schedules["schedules"]["chosen"].items()
                if key not in ("iterations", "backend")}  # the benchmark fits on the CPU
    assert {key: value for key, value in params.fit.optimizer.model_dump(mode="json").items()
            if key in measured} == measured


def test_the_passes_are_the_fitters_own_counts(params) -> None:
    # periodic, solve_every 1, 3 CG iterations: a step renders once for the loss and once per product
    # of its solve (1 + 3), takes one backward and runs 4 adjoints (one per product, the first also
    # giving the weight norms); the fit ends with one more solve.
    settings = params.fit.optimizer.replace(colour_solve="periodic", solve_every=1, cg_iterations=3, reseed_every=0)
    assert fit_passes(settings, 2) == {"forward": 2 * 5 + 4, "backward": 2, "adjoint": 2 * 4 + 4}
    every_other = settings.replace(solve_every=2)  # solves before steps 0 and 2, and at the end
    assert fit_passes(every_other, 3) == {"forward": 3 + 3 * 4, "backward": 3, "adjoint": 3 * 4}
    adam_only = settings.replace(colour_solve="none")
    assert fit_passes(adam_only, 2) == {"forward": 2, "backward": 2, "adjoint": 0}


def test_fitting_arithmetic(report) -> None:
    fitting = report["fitting"]
    table = fitting["pass_seconds_per_image"]
    plan = {fit["role"] + str(fit["num_splats"]): fit for fit in fitting["plan"]}
    for variant in fitting["variants"].values():
        expected = 0.0
        for level in variant["per_image"]["levels"]:
            one = table[str(level["num_splats"])][variant["kernel"]][variant["roofline_model"]]
            passes = plan[level["role"] + str(level["num_splats"])]["passes"]
            if variant["step"] == "render_only":
                passes = {"forward": level["steps"], "backward": level["steps"]}
            seconds = sum(n * one[kind] for kind, n in passes.items())
            assert level["seconds"] == pytest.approx(seconds)
            expected += seconds
        assert variant["seconds_per_sample"] == pytest.approx(expected)
        assert variant["samples"] == PAPER_IMAGES
        assert variant["gpu_hours"] == pytest.approx(expected * PAPER_IMAGES / 3600)
        assert variant["gpu_hours"] == pytest.approx(variant["wall_hours"] * NUM_GPUS)
    v = fitting["variants"]
    # The full step does more passes than the render alone; the dense kernel more work than the tiled.
    assert v["tiled/no_cache_reuse/full_step"]["gpu_hours"] > v["tiled/no_cache_reuse/render_only"]["gpu_hours"]
    assert v["dense/no_cache_reuse/full_step"]["gpu_hours"] > v["tiled/no_cache_reuse/full_step"]["gpu_hours"]
    paper = fitting["paper_fit_400"]
    assert paper["ms_per_image"] == pytest.approx(25.6 * 3600 / 12.8e6 * 1e3)
    alone, targets = fitting["alone"], fitting["targets"]
    headline = v["tiled/no_cache_reuse/full_step"]
    assert targets["cascade_within_paper"] == {"measured": headline["gpu_hours"], "threshold": 25.6,
                                               "met": headline["gpu_hours"] <= 25.6}
    if alone["fit"]["steps"] is None:
        assert alone["projections"] == {} and targets["alone_within_a_third"]["met"] is False
    else:
        direct = alone["projections"]["tiled/no_cache_reuse"]
        one = table[str(alone["fit"]["num_splats"])]["tiled"]["no_cache_reuse"]
        assert direct["seconds_per_sample"] == pytest.approx(sum(n * one[k] for k, n in alone["fit"]["passes"].items()))
        assert targets["alone_within_a_third"]["measured"] == direct["gpu_hours"]
        assert targets["alone_within_a_third"]["met"] is (direct["gpu_hours"] <= 25.6 / 3)
    cpu = fitting["cpu_only"]
    assert cpu["core_seconds_per_image"] == pytest.approx(sum(level["core_seconds"] for level in cpu["levels"]))
    assert cpu["core_hours"] == pytest.approx(cpu["core_seconds_per_image"] * PAPER_IMAGES / 3600)


def test_roofline_table_is_the_cost_models_on_gpu_checks_counts() -> None:
    gpu_check = json.loads((ROOT / "benchmarks/gpu_check.json").read_text())
    table = roofline_pass_seconds(gpu_check)
    assert sorted(table) == sorted(paper_splat_counts())
    for counts, entry in zip(gpu_check["evaluation_counts"], gpu_check["roofline_estimate"]["per_count"]):
        render = table[entry["num_splats"]]["tiled"]["no_cache_reuse"]
        expected = roofline(counts, device_peaks(ROOFLINE_DEVICE))["per_image_pass"]["tiled_forward"]
        assert render["forward"] == expected["no_cache_reuse"]["seconds"]
        # The committed gpu_check.json was written with the same model: its images/s (a 1000-step fit of
        # render passes only) agree.
        images_per_s = 1.0 / (entry["steps"] * (render["forward"] + render["backward"]))
        assert images_per_s == pytest.approx(entry["no_cache_reuse"]["tiled_images_per_s"])


def test_cpu_seconds_per_step_prefers_the_schedules_section() -> None:
    refit = {"cpu_seconds": 20.0, "steps": 10}
    fitting = {"prune_photos": {"images": 2, "cascades": {"luminance": [
                   {"num_splats": 1600, "refit": refit}, {"num_splats": 400, "refit": refit}]}},
               "schedules": {"sets": {name: {"photos": ["a", "b", "c", "d"], "counts": [
                   {"num_splats": 400, "runs": {"chosen": {"steps": [5, 10], "cpu_seconds": [1.0, rate]}}}]}
                   for name, rate in (("stage", 8.0), ("other", 16.0))}}}
    table = projection.cpu_seconds_per_step(fitting)
    assert table[1600]["core_seconds_per_step"] == pytest.approx(1.0) and table[1600]["source"] == "prune_photos refit"
    assert table[400]["core_seconds_per_step"] == pytest.approx((0.2 + 0.4) / 2)  # the two sets' mean


def test_a_measured_gpu_run_replaces_the_roofline() -> None:
    gpu_check = json.loads((ROOT / "benchmarks/gpu_check.json").read_text())
    roof = roofline_pass_seconds(gpu_check)
    batch = 4096
    gpu_check["gpu"] = {"device": "H100", "passed": True, "benchmark": {
        "batch": batch, "num_splats": SMALLEST,
        "dense": {"forward_seconds_per_step": 0.5, "backward_seconds_per_step": 1.0},
        "tiled": {"forward_seconds_per_step": 0.01, "backward_seconds_per_step": 0.03}}}
    table, source = gpu_pass_seconds(gpu_check)
    assert "measured" in source
    assert table[SMALLEST]["tiled"]["no_cache_reuse"]["forward"] == pytest.approx(0.01 / batch)
    assert table[SMALLEST]["dense"]["cache_reuse"]["backward"] == pytest.approx(1.0 / batch)
    ratio = (0.03 / batch) / roof[SMALLEST]["tiled"]["no_cache_reuse"]["backward"]
    assert table[LARGEST]["tiled"]["no_cache_reuse"]["backward"] == pytest.approx(
        roof[LARGEST]["tiled"]["no_cache_reuse"]["backward"] * ratio)
    gpu_check["gpu"]["smoke"] = True  # an interpreter smoke run says nothing about speed
    assert "roofline" in gpu_pass_seconds(gpu_check)[1]


def test_training_arithmetic(report, params) -> None:
    training = report["training"]
    epochs = {"distill": params.align.distill.epochs, "contrastive": params.align.contrastive.epochs}
    assert training["epochs"] == epochs
    peak = projection.PEAK_FLOPS
    for count, stages in training["levels"].items():
        student = FAKE_FLOPS["student"][count]["forward_backward_flops"]
        assert stages["distill"]["flops_per_sample"] == pytest.approx(FAKE_FLOPS["teacher_forward_flops"] + student)
        assert stages["contrastive"]["flops_per_sample"] == pytest.approx(student + FAKE_FLOPS["text_forward_flops"])
        for stage, n_epochs in epochs.items():
            for case, mfu in projection.MFU.items():
                entry = stages[stage][case]
                assert entry["samples"] == PAPER_IMAGES * n_epochs
                assert entry["seconds_per_sample"] == pytest.approx(stages[stage]["flops_per_sample"] / (peak * mfu))
                assert entry["gpu_hours"] == pytest.approx(entry["seconds_per_sample"] * entry["samples"] / 3600)
                assert entry["gpu_hours"] == pytest.approx(entry["wall_hours"] * NUM_GPUS)
        for case in projection.MFU:
            assert stages["both"][case]["gpu_hours"] == pytest.approx(
                stages["distill"][case]["gpu_hours"] + stages["contrastive"][case]["gpu_hours"])
    for case in projection.MFU:
        assert training["all_levels"][case]["gpu_hours"] == pytest.approx(
            sum(stages["both"][case]["gpu_hours"] for stages in training["levels"].values()))
    # Pessimistic utilization, more hours.
    assert training["all_levels"]["pessimistic"]["gpu_hours"] > training["all_levels"]["expected"]["gpu_hours"]
    # The total row adds the headline fit to both stages.
    fit = report["fitting"]["variants"][report["fitting"]["headline"]]["gpu_hours"]
    total = next(row for row in report["summary"] if row["item"].startswith("total") and "40%" in row["item"])
    assert total["gpu_hours"] == pytest.approx(fit + training["all_levels"]["expected"]["gpu_hours"])


def test_loader_cores(report) -> None:
    for stage in report["loader"]["per_stage"].values():
        assert stage["cores_per_gpu_224"] == pytest.approx(stage["samples_per_s_per_gpu"] * 3e-4)
        assert stage["cores_per_gpu_512_source"] == pytest.approx(stage["samples_per_s_per_gpu"] * 3e-3)


def test_count_flops_on_small_modules() -> None:
    linear = torch.nn.Linear(4, 8)
    assert count_flops(lambda: linear(torch.rand(2, 4)))["flops"] == 2 * 2 * 4 * 8
    inputs = torch.rand(2, 4, requires_grad=True)
    forward_backward = count_flops(lambda: linear(inputs).sum().backward())["flops"]
    assert forward_backward == 3 * 2 * 2 * 4 * 8  # input and weight gradients: twice the forward
    linear.requires_grad_(False)  # frozen, as the shared blocks: only the input gradient
    frozen = count_flops(lambda: linear(inputs).sum().backward())["flops"]
    assert frozen == 2 * 2 * 2 * 4 * 8
    q = torch.rand(1, 2, 5, 4)
    attention = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))["flops"]
    assert attention == 2 * (2 * 1 * 2 * 5 * 5 * 4)  # Q K^T and A V, counted on the CPU kernels too


def test_training_flops_on_the_tiny_model() -> None:
    """The real counting path on params.yaml's tiny 28x28 model (seconds on the CPU)."""
    params = load_params(ROOT / "params.yaml")
    flops = projection.training_flops(params, [params.fit.num_splats])
    student = flops["student"][str(params.fit.num_splats)]
    assert flops["teacher_forward_flops"] > 0 and flops["text_forward_flops"] > 0
    assert student["forward_backward_flops"] > student["forward_flops"] > 0
    assert student["trainable_parameters"] > 0
