"""The one-command GPU check (benchmarks/gpu_check.py) without a GPU: its no-CUDA path end to end,
its --smoke mode (the GPU part on the CPU under the Triton interpreter, tests/conftest.py sets it),
and the helpers its figures rest on (the cost model has its own tests). Nothing here depends on the
machine's speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import PAPER_SPLAT_COUNTS, TOLERANCE, check_case, compare, fitted_like_splats
from benchmarks.harness import paper_splat_counts


def test_without_cuda_writes_the_cpu_part_and_exits_0(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    out.write_text(json.dumps({"gpu": {"device": "an earlier GPU run", "passed": True}}))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the no-CUDA path even on a GPU machine
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA device" in done.stdout and "skipped" in done.stdout
    report = json.loads(out.read_text())
    assert report["gpu"] == {"device": "an earlier GPU run", "passed": True}, "an earlier GPU section is kept"
    assert report["machine"]["cpu_count"] >= 1
    counts = {entry["num_splats"]: entry for entry in report["evaluation_counts"]}
    assert PAPER_SPLAT_COUNTS == paper_splat_counts() and sorted(counts) == sorted(PAPER_SPLAT_COUNTS)
    for n, entry in counts.items():
        per_image = entry["per_image"]
        assert per_image["dense_forward"] == per_image["dense_backward"] == n * gpu_check.IMAGE_SIZE**2
        assert 0 < per_image["box"] < per_image["tiled_backward"] == per_image["tiled_forward"] < per_image["dense_forward"]
        assert entry["forward_ratio_dense_over_tiled"] == pytest.approx(n * gpu_check.IMAGE_SIZE**2 / per_image["tiled_forward"])
    estimates = report["roofline_estimate"]["per_count"]
    assert [e["num_splats"] for e in estimates] == list(PAPER_SPLAT_COUNTS)
    for estimate in estimates:
        for model in ("no_cache_reuse", "cache_reuse"):
            assert estimate[model]["speedup_tiled_over_dense"] > 1
        assert estimate["cache_reuse"]["tiled_images_per_s"] >= estimate["no_cache_reuse"]["tiled_images_per_s"]
    # Fewer splats, fewer dense evaluations: dense throughput rises as N falls.
    dense = [e["cache_reuse"]["dense_images_per_s"] for e in estimates]
    assert dense == sorted(dense)


def test_smoke_mode_runs_the_gpu_part_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "smoke.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    gpu = report["gpu"]
    assert gpu["smoke"] and gpu["passed"]
    assert [(c["batch"], c["num_splats"]) for c in gpu["correctness"]] == [(1, 9), (3, 9)]
    assert gpu["correctness"][1]["twin_images"] == [0, 2]
    for case in gpu["correctness"]:
        for group in ("tiled_vs_dense_whole_batch", "tiled_vs_twin", "dense_vs_twin"):
            assert set(case[group]) == {"image", "grad_positions", "grad_cholesky", "grad_colours"}
            assert all(entry["max_abs_error"] < 1e-4 for entry in case[group].values())
            assert all(entry["reference_max_abs"] > 0 for entry in case[group].values())
    bench = gpu["benchmark"]
    for kind in ("dense", "tiled"):
        entry = bench[kind]
        assert entry["forward_seconds_per_step"] > 0 and entry["backward_seconds_per_step"] > 0
        step = entry["forward_seconds_per_step"] + entry["backward_seconds_per_step"]
        assert entry["images_per_s_1000_step_fit"] == pytest.approx(bench["batch"] / (1000 * step))
        assert entry["images_per_s_2_step_fit"] == pytest.approx(500 * entry["images_per_s_1000_step_fit"])
    # A smoke run's GPU section is not kept by a later no-CUDA run.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        assert gpu_check.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["gpu"] is None


def test_a_wrong_kernel_fails_the_check(monkeypatch) -> None:
    import kernels.rasterize_triton_tiled as tiled_module

    honest = tiled_module.rasterize_triton_tiled
    assert check_case(2, 9, 19, "cpu")["passed"]
    monkeypatch.setattr(tiled_module, "rasterize_triton_tiled", lambda *a, **k: honest(*a, **k) * 1.001)
    case = check_case(2, 9, 19, "cpu")
    assert not case["passed"]
    assert not case["tiled_vs_twin"]["image"]["passed"]
    assert case["dense_vs_twin"]["image"]["passed"]


def test_compare_scales_the_tolerance() -> None:
    reference = [torch.tensor([1000.0, 0.0]), torch.tensor([0.5])]
    ok = compare([reference[0] + 0.9 * TOLERANCE * 1000, reference[1]], reference)
    assert ok["image"]["passed"] and ok["grad_positions"]["passed"]
    bad = compare([reference[0], reference[1] + 2 * TOLERANCE], reference)
    assert not bad["grad_positions"]["passed"]
    assert bad["grad_positions"]["max_abs_error"] == pytest.approx(2 * TOLERANCE, rel=1e-3)  # fp32 rounding


def test_fitted_like_splats_overlap_like_a_grid_fit() -> None:
    splats = fitted_like_splats(2, 400, 224, 224, seed=5)
    again = fitted_like_splats(2, 400, 224, 224, seed=5)
    assert torch.equal(splats.positions, again.positions) and torch.equal(splats.cholesky, again.cholesky)
    assert splats.positions.shape == (2, 400, 2) and splats.colours.shape == (2, 400, 3)
    l11, l21, l22 = splats.cholesky.unbind(-1)
    assert torch.all(l11 > 0) and torch.all(l22 > 0)
    # Sigma's eigenvalues are the drawn variances: their geometric mean is about (cell / 2)^2.
    sigma_xx, sigma_xy, sigma_yy = l11**2, l11 * l21, l21**2 + l22**2
    determinant = sigma_xx * sigma_yy - sigma_xy**2
    mean_sigma = determinant.pow(0.25).log().mean().exp()
    assert mean_sigma == pytest.approx(224 / 20 / 2, rel=0.1)
    # Jittered by at most 0.3 cell from the 20 x 20 grid's centres.
    cell = 224 / 20
    offset = (splats.positions / cell - 0.5) - torch.round(splats.positions / cell - 0.5)
    assert offset.abs().max() <= 0.3 + 1e-5
