"""The one FLOP and byte model (benchmarks/cost_model.py): its counts against a hand count of the
Triton kernels' lines, its roofline arithmetic, and that every benchmark reporting FLOPs uses it."""

from __future__ import annotations

import math

import pytest

from benchmarks import cost_model, fitting, gpu_check, projection
from benchmarks.cost_model import device_peaks, flops_backward, flops_forward, pass_costs, roofline

# One splat-pixel evaluation, line by line as kernels/rasterize_triton.py writes it
# (+ - * count 1, exp 1, compares and selects 0).
WEIGHT = {
    "dx = px - mu_x": 1, "dy = py - mu_y": 1, "z1 = dx * inv_l11": 1,
    "z2 = (dy - l21 * z1) * inv_l22": 3, "d_sq = z1 * z1 + z2 * z2": 3, "-0.5 * d_sq": 1, "exp": 1,
}
PER_CHANNEL_FORWARD = {"w * col": 1, "sum over splats into acc": 1}
PER_CHANNEL_BACKWARD = {"w * g": 1, "sum into g_col": 1, "g * col": 1, "sum over channels": 1}
BACKWARD_FIXED = {
    "one add fewer in the channel sum of C terms": -1,
    "g_dsq = -0.5 * w * g_w": 2, "g_z2 = 2.0 * g_dsq * z2": 2, "g_z1 = 2.0 * g_dsq * z1 - g_z2 * f": 4,
    "g_dx += sum(g_z1)": 1, "g_l11 -= sum(g_z1 * z1)": 2, "g_dy += sum(g_z2)": 1,
    "g_l21 -= sum(g_z2 * z1)": 2, "g_l22 -= sum(g_z2 * z2)": 2,
}


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_flop_counts_match_the_hand_count(channels: int) -> None:
    weight = sum(WEIGHT.values())
    assert weight == cost_model.WEIGHT_FLOPS == 11
    assert flops_forward(channels) == weight + channels * sum(PER_CHANNEL_FORWARD.values())
    assert flops_backward(channels) == (weight + channels * sum(PER_CHANNEL_BACKWARD.values())
                                        + sum(BACKWARD_FIXED.values()))
    assert (flops_forward(channels), flops_backward(channels)) == (11 + 2 * channels, 26 + 4 * channels)


def test_the_byte_model_uses_the_kernels_block_sizes() -> None:
    from kernels import rasterize_triton

    assert cost_model.DENSE_FWD_BLOCK_P == rasterize_triton._FWD_BLOCK_P
    assert cost_model.DENSE_BWD_BLOCK_N == rasterize_triton._BWD_BLOCK_N


def test_every_benchmark_reporting_flops_uses_the_one_model() -> None:
    assert fitting.flops_forward is flops_forward and fitting.flops_backward is flops_backward
    assert gpu_check.pass_costs is pass_costs and gpu_check.roofline is roofline
    assert projection.roofline is roofline
    for module in (fitting, gpu_check, projection):
        own = [name for name, value in vars(module).items()
               if name.startswith("flops_") and getattr(value, "__module__", None) == module.__name__]
        assert not own, f"{module.__name__} defines its own FLOP count {own}"


def test_costs_and_roofline_follow_the_counts() -> None:
    counts = gpu_check.evaluation_counts(100, image_size=64, images=2, tile_size=16, cutoff=3.5)
    per_image = counts["per_image"]
    assert per_image["dense_forward"] == 100 * 64 * 64
    costs = pass_costs(counts)
    assert costs["tiled_forward"]["flops"] == per_image["tiled_forward"] * flops_forward(3)
    assert costs["dense_backward"]["flops"] == per_image["dense_backward"] * flops_backward(3)
    for cost in costs.values():
        assert cost["bytes_requested"] >= cost["bytes_unique"] > 0
    peaks = {"peak_fp32_flops": 1e12, "peak_bytes_per_s": math.inf}  # a pure compute roofline
    estimate = roofline(counts, peaks, steps=10)
    dense_seconds = (costs["dense_forward"]["flops"] + costs["dense_backward"]["flops"]) / 1e12
    assert estimate["cache_reuse"]["dense_images_per_s"] == pytest.approx(1 / (10 * dense_seconds))
    assert estimate["per_image_pass"]["dense_forward"]["cache_reuse"]["bound"] == "compute"


def test_device_peaks_match_names_and_mark_the_fallback() -> None:
    assert device_peaks("NVIDIA H100 80GB HBM3")["peak_bytes_per_s"] == 3.35e12
    assert device_peaks("NVIDIA H100 PCIe")["peak_fp32_flops"] == 51e12
    assert device_peaks("NVIDIA H200")["peak_bytes_per_s"] == 4.8e12
    assert device_peaks("NVIDIA A100-SXM4-80GB")["table_key"] == "A100-SXM4-80GB"
    unknown = device_peaks("Some Future GPU")
    assert unknown["table_key"] is None and unknown["source"].startswith("FALLBACK")
    assert unknown["peak_fp32_flops"] == device_peaks("H100")["peak_fp32_flops"]
