"""The one cost model of the rasterizer: FLOPs and bytes of a render pass, and the roofline built on them.

Every benchmark that reports FLOPs, a fraction of a peak or a roofline uses this module
(``fitting``'s rasterizer section, ``gpu_check``, ``projection``), so their figures compare.

**FLOPs per splat-pixel evaluation**, counted from the Triton kernels' shared lines
(``kernels/triton_common.py``). An add, a subtract or a multiply counts 1 (a fused multiply-add 2),
``tl.exp`` 1; compares, selects, index and integer work 0; per-splat factors hoisted out of the
pixel loop and the padding lanes of ``C_PAD`` are not; a reduction's adds count 1 per element
summed. With C channels (the colour adjoint: the weight and 2 per channel and 2 for ``w^2``):

- the weight, :data:`WEIGHT_FLOPS` = 11: ``dx, dy`` 2; ``z1 = dx * inv_l11`` 1;
  ``z2 = (dy - l21 z1) * inv_l22`` 3; ``d^2 = z1^2 + z2^2`` 3; ``-0.5 d^2`` 1; ``exp`` 1.
- forward = weight + a multiply and an add per channel into the pixel's sum: **11 + 2C**.
- backward = the weight again, the colour gradient ``sum_p w g`` (2 per channel), ``dL/dw =
  sum_c g col`` (2C - 1), then :data:`CHAIN_FLOPS` = 16: ``g_dsq = -0.5 w g_w`` 2, ``g_z2 = 2 g_dsq
  z2`` 2, ``g_z1 = 2 g_dsq z1 - g_z2 (l21/l22)`` 4, and the five pixel sums (``g_dx``, ``g_dy`` 1
  each; ``g_l11``, ``g_l21``, ``g_l22`` a multiply and an add each) 8: **26 + 4C**.

At C = 3: 17 forward, 38 backward. These are the operations the algorithm needs, whichever kernel
runs it: the C++ CPU kernel computes the same quantities (its exp is a polynomial of several FMAs,
not counted beyond 1), so its "useful GFLOP/s" use the same count.

**Bytes** (:func:`pass_costs`): ``bytes_requested`` is every global-memory read and write a Triton
kernel issues, as if no cache served any (:data:`METHOD` spells it out per pass); ``bytes_unique``
each tensor once per pass and image plus the binning's sort and lists. **Roofline**
(:func:`roofline`): a pass takes ``max(flops / peak FLOP/s, bytes / bandwidth)``; no launch
overhead, 100 % of peak: a lower bound on time.
"""

from __future__ import annotations

import math
from typing import Any

WEIGHT_FLOPS = 11  # one splat's weight at one pixel (module docstring)
CHAIN_FLOPS = 16  # backward: dL/dw to the sums of (mu, L) gradients


def flops_forward(channels: int) -> int:
    """FLOPs of one splat-pixel evaluation in the forward pass: 11 + 2C."""
    return WEIGHT_FLOPS + 2 * channels


def flops_backward(channels: int) -> int:
    """FLOPs of one splat-pixel evaluation in the backward pass: 11 + 2C + (2C - 1) + 16 = 26 + 4C."""
    return WEIGHT_FLOPS + 2 * channels + (2 * channels - 1) + CHAIN_FLOPS


def flops_adjoint(channels: int) -> int:
    """FLOPs of one splat-pixel evaluation in the colour adjoint: 11 + 2C + 2 (the weight, ``w r`` into
    the C sums, ``w^2`` into the norm)."""
    return WEIGHT_FLOPS + 2 * channels + 2


def splat_record_bytes(channels: int) -> int:
    """Bytes a kernel reads per splat: centre (2 fp32), Cholesky factor (3), colour (C), valid (1 byte)."""
    return 4 * (5 + channels) + 1


# Kernel block sizes the byte model needs (kernels/rasterize_triton.py; a test keeps them equal).
DENSE_FWD_BLOCK_P = 64
DENSE_BWD_BLOCK_N = 16
SORT_BYTES_PER_PAIR = 128  # binning: radix sort of 8-byte keys, ~8 passes reading and writing

# Peak fp32 (non-tensor-core) FLOP/s and memory bandwidth in bytes/s, from NVIDIA's data sheets.
# Matched in order on the CUDA device name, so the more specific names come first.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 67e12, 4.8e12),
    ("H100 PCIe", 51e12, 2.0e12),
    ("H100 NVL", 60e12, 3.9e12),
    ("H100", 67e12, 3.35e12),  # SXM5
    ("A100-SXM4-80GB", 19.5e12, 2.039e12),
    ("A100 80GB PCIe", 19.5e12, 1.935e12),
    ("A100", 19.5e12, 1.555e12),  # 40 GB
    ("L40S", 91.6e12, 0.864e12),
    ("L4", 30.3e12, 0.3e12),
    ("RTX 4090", 82.6e12, 1.008e12),
)
ROOFLINE_DEVICE = "H100"  # the assumed device of the CPU-side estimate (H100 SXM5)
# This machine's nominal CPU fp32 peak: 2 AVX2 FMA units x 8 lanes x 2 flops x ~3 GHz per core.
CPU_PEAK_GFLOPS = {"two_cores": 190.0, "one_core": 95.0}

METHOD = {  # written into gpu_check.json beside the figures
    "evaluation": "one splat's weight computed at one pixel (padding lanes not counted)",
    "flops_per_evaluation": {"forward": "11 + 2C (17 at C = 3)", "backward": "26 + 4C (38 at C = 3)",
                             "adjoint": "13 + 2C (19 at C = 3)",
                             "counting": "add, multiply and exp 1; compares, selects, integer work 0 (cost_model.py)"},
    "bytes_model": {
        "meaning": "bytes requested from global memory, as if no cache served any of them",
        "splat_record": "4 * (5 + C) + 1 bytes (centre, factor, colour, valid)",
        "dense_forward": f"every {DENSE_FWD_BLOCK_P}-pixel program reads all N records; + the image written",
        "dense_backward": (f"every {DENSE_BWD_BLOCK_N}-splat program reads the whole image cotangent (4C bytes a "
                           "pixel); + records read and gradients written once"),
        "tiled_forward": (f"per (tile, splat) pair: a record and a 4-byte index; {SORT_BYTES_PER_PAIR} bytes of "
                          "binning sort per pair; records read once for the boxes; + the image written"),
        "tiled_backward": ("per (tile, splat) pair: a record and a 4-byte index, and its partial gradients "
                           "written (4 (5 + C) bytes); the image cotangent read once; the partials summed per "
                           "splat: read, permuted to splat order (8-byte index) and read again, + the gradients "
                           "written"),
        "adjoint": ("the tiled forward's binning and lists; per pair its partial sums (4 (C + 1) bytes) written "
                    "and summed per splat as the backward's; the image read once; + the results written"),
    },
    "bytes_unique": "each tensor once per pass per image, plus the binning's sort and lists (caches hold one image)",
    "roofline": ("time of a pass = max(flops / peak FLOP/s, bytes / peak bandwidth), with requested bytes "
                 "(no_cache_reuse, pessimistic) or bytes_unique (cache_reuse, optimistic); no launch overhead"),
    "achieved_bandwidth": "requested bytes over the measured time: may exceed DRAM peak where caches serve",
}


def device_peaks(name: str) -> dict[str, Any]:
    """Peak fp32 FLOP/s and bandwidth of a CUDA device, by name; the H100's, marked, when unknown."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return {"device": name, "table_key": key, "peak_fp32_flops": flops, "peak_bytes_per_s": bandwidth,
                    "source": "table"}
    _, flops, bandwidth = next(entry for entry in DEVICE_PEAKS if entry[0] == ROOFLINE_DEVICE)
    return {"device": name, "table_key": None, "peak_fp32_flops": flops, "peak_bytes_per_s": bandwidth,
            "source": f"FALLBACK: {name!r} is not in DEVICE_PEAKS; {ROOFLINE_DEVICE} SXM figures assumed"}


def pass_costs(counts: dict[str, Any], channels: int = 3) -> dict[str, dict[str, float]]:
    """FLOPs and bytes per image of each pass (dense/tiled x forward/backward) from an evaluation count
    (``gpu_check.evaluation_counts``: ``num_splats``, ``image_size``, ``per_image`` evaluations and
    (tile, splat) ``pairs``). Caches help the dense kernels most: each image's cotangent and splat
    records fit in L2 many times over, and a launch's programs run image by image."""
    per_image = counts["per_image"]
    n_splats, size = counts["num_splats"], counts["image_size"]
    pixels = size * size
    record = splat_record_bytes(channels)
    image_bytes = 4 * channels * pixels
    grad_bytes = 4 * (5 + channels)
    binning = per_image["pairs"] * (4 + SORT_BYTES_PER_PAIR)
    return {
        "dense_forward": {
            "flops": per_image["dense_forward"] * flops_forward(channels),
            "bytes_requested": n_splats * record * math.ceil(pixels / DENSE_FWD_BLOCK_P) + image_bytes,
            "bytes_unique": n_splats * record + image_bytes,
        },
        "dense_backward": {
            "flops": per_image["dense_backward"] * flops_backward(channels),
            "bytes_requested": image_bytes * math.ceil(n_splats / DENSE_BWD_BLOCK_N) + n_splats * (record + grad_bytes),
            "bytes_unique": image_bytes + n_splats * (record + grad_bytes),
        },
        "tiled_forward": {
            "flops": per_image["tiled_forward"] * flops_forward(channels),
            "bytes_requested": per_image["pairs"] * (record + 4) + binning + n_splats * record + image_bytes,
            "bytes_unique": binning + n_splats * record + image_bytes,
        },
        "tiled_backward": {  # one program per tile (kernels/rasterize_triton_tiled.py), partials summed per splat
            "flops": per_image["tiled_backward"] * flops_backward(channels),
            "bytes_requested": per_image["pairs"] * (record + 4) + image_bytes
            + pair_sums_bytes(per_image["pairs"], grad_bytes) + n_splats * (record + grad_bytes),
            "bytes_unique": image_bytes + pair_sums_bytes(per_image["pairs"], grad_bytes) + n_splats * (record + grad_bytes),
        },
        "adjoint": {  # the tile-culled colour adjoint: binned per call, then the backward's shape
            "flops": per_image["tiled_backward"] * flops_adjoint(channels),
            "bytes_requested": binning + per_image["pairs"] * (record + 4) + n_splats * record + image_bytes
            + pair_sums_bytes(per_image["pairs"], 4 * (channels + 1)) + n_splats * 4 * (channels + 1),
            "bytes_unique": binning + n_splats * record + image_bytes
            + pair_sums_bytes(per_image["pairs"], 4 * (channels + 1)) + n_splats * 4 * (channels + 1),
        },
    }


def pair_sums_bytes(pairs: float, row_bytes: int) -> float:
    """Bytes of a tile-parallel kernel's per-pair partial sums: written by the kernel, then read,
    scattered into splat order by an 8-byte index and read again by the per-splat sum."""
    return pairs * (4 * row_bytes + 8)


def roofline(counts: dict[str, Any], peaks: dict[str, Any], steps: int = 1000) -> dict[str, Any]:
    """Estimated images/s of a ``steps``-step fit (render passes only), dense and tiled: with every
    requested byte from DRAM (``no_cache_reuse``, a lower bound on speed) and with each byte from DRAM
    once (``cache_reuse``, an upper bound); ``per_image_pass`` holds each pass's costs and seconds."""
    costs = pass_costs(counts)
    result: dict[str, Any] = {"num_splats": counts["num_splats"], "steps": steps, "per_image_pass": {}}
    for model, byte_key in (("no_cache_reuse", "bytes_requested"), ("cache_reuse", "bytes_unique")):
        step_seconds = {"dense": 0.0, "tiled": 0.0}
        for name, cost in costs.items():
            compute = cost["flops"] / peaks["peak_fp32_flops"]
            memory = cost[byte_key] / peaks["peak_bytes_per_s"]
            entry = result["per_image_pass"].setdefault(name, {**cost})
            entry[model] = {"seconds": max(compute, memory), "bound": "compute" if compute >= memory else "memory",
                            "flops_per_byte": cost["flops"] / cost[byte_key]}
            if name != "adjoint":  # the images/s below are of the render passes only
                step_seconds[name.split("_")[0]] += max(compute, memory)
        result[model] = {
            "dense_images_per_s": 1.0 / (steps * step_seconds["dense"]),
            "tiled_images_per_s": 1.0 / (steps * step_seconds["tiled"]),
            "speedup_tiled_over_dense": step_seconds["dense"] / step_seconds["tiled"],
        }
    return result
