"""Sequence length and attention cost of the RGB and splat image towers (METHOD.md "Why" and 2).

The paper's second motivation is that patch tokenization makes long sequences. Both towers here
share the transformer blocks of a CLIP ViT; they differ in what enters them:

- RGB: ``(image_size // patch_size) ** 2`` patches plus a CLS token (open_clip's conv stem drops a
  remainder that does not fill a patch, hence the floor);
- splats: the Perceiver resampler's ``K`` latents plus a CLS token, whatever the number of splats
  ``N``; the resampler itself pays for reading the N splats (K queries against N keys per layer).

What is counted, in FLOPs with one multiply-add = 2 FLOPs, per image (batch 1), matmuls only:

- attention, per transformer layer of width ``d`` over ``T`` tokens:
  QKV and output projections ``4 * 2 * T * d**2``, plus the scores ``Q K^T`` and the weighted sum
  ``A V``, ``2 * 2 * T**2 * d`` (summed over heads, so the head count does not enter);
- MLP, reported separately: two matmuls ``d -> r d -> d``, ``2 * 2 * T * d * (r * d)`` per layer
  (``r`` = ``mlp_ratio``, 4 in CLIP's ViTs);
- the resampler's cross-attention, reported separately, per layer of width ``d_r``: projections
  ``2 * K * d_r**2`` (queries) + ``2 * 2 * M * d_r**2`` (keys and values of ``M`` inputs) +
  ``2 * K * d_r**2`` (output), and ``2 * 2 * K * M * d_r`` for scores and weighted sum; ``M = N``,
  or ``N + K`` when the latents also attend to themselves (Flamingo's variant,
  ``latents_in_keys=True``); its MLP on the K latents, ``2 * 2 * K * d_r * (r * d_r)``, separately;
- the RGB patch embedding, ``2 * P * (p**2 * C) * d`` for P patches, separately.

Not counted: softmax, scaling, normalization, biases, residual adds, positional embeddings, the
splat stem (a Fourier encoding and one linear map per splat, linear in N and small beside the rest)
and the final projection into the joint space (the same for both towers).
"""

from __future__ import annotations

from typing import Any


def rgb_tokens(image_size: int, patch_size: int) -> int:
    """Tokens into the transformer of a ViT: ``(image_size // patch_size) ** 2`` patches + CLS."""
    _check_positive(image_size=image_size, patch_size=patch_size)
    if patch_size > image_size:
        raise ValueError(f"patch_size {patch_size} is larger than the image ({image_size})")
    return (image_size // patch_size) ** 2 + 1


def splat_tokens(num_latents: int) -> int:
    """Tokens into the transformer of the splat tower: the resampler's K latents + CLS."""
    _check_positive(num_latents=num_latents)
    return num_latents + 1


def attention_flops(tokens: int, width: int, layers: int) -> int:
    """Self-attention matmul FLOPs of ``layers`` layers: ``L * (4*2*T*d^2 + 2*2*T^2*d)``."""
    _check_positive(tokens=tokens, width=width, layers=layers)
    projections = 4 * 2 * tokens * width**2
    scores_and_values = 2 * 2 * tokens**2 * width
    return layers * (projections + scores_and_values)


def mlp_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """MLP matmul FLOPs of ``layers`` layers: ``L * 2*2*T*d*(r*d)``."""
    _check_positive(tokens=tokens, width=width, layers=layers, mlp_ratio=mlp_ratio)
    hidden = int(mlp_ratio * width)
    return layers * 2 * 2 * tokens * width * hidden


def cross_attention_flops(queries: int, keys: int, width: int, layers: int) -> int:
    """Cross-attention matmul FLOPs: ``L * (2*2*Q*d^2 + 2*2*M*d^2 + 2*2*Q*M*d)`` for Q queries, M keys."""
    _check_positive(queries=queries, keys=keys, width=width, layers=layers)
    query_and_output = 2 * 2 * queries * width**2
    key_and_value = 2 * 2 * keys * width**2
    scores_and_values = 2 * 2 * queries * keys * width
    return layers * (query_and_output + key_and_value + scores_and_values)


def patch_embed_flops(image_size: int, patch_size: int, width: int, channels: int = 3) -> int:
    """The ViT stem's matmul FLOPs: ``2 * P * (p^2 * C) * d``."""
    _check_positive(width=width, channels=channels)
    patches = rgb_tokens(image_size, patch_size) - 1
    return 2 * patches * patch_size**2 * channels * width


def token_report(
    rgb_image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    num_latents: int,
    num_splats: int,
    resampler_layers: int,
    *,
    mlp_ratio: float = 4.0,
    resampler_width: int | None = None,
    channels: int = 3,
    latents_in_keys: bool = False,
) -> dict[str, Any]:
    """Tokens and FLOPs per image of the RGB tower and the splat tower on the same transformer.

    ``width``/``layers`` describe the shared transformer, ``resampler_width`` the resampler
    (default: ``width``, as :mod:`gsclip_lib.models.splat_encoder` builds it). ``num_splats`` is the number
    of keys the resampler reads: the paper's N for the cost of the representation, or the padded
    slot count of a batch (plus one for the encoder's all-zero ``add_zero_attn`` key) for what a
    padded batch actually computes. Every FLOP count is per image; see the module docstring for what
    each includes. ``*_total_flops`` add every part listed for that tower; the ratios are RGB over splats.
    """
    _check_positive(num_splats=num_splats, resampler_layers=resampler_layers)
    resampler_width = width if resampler_width is None else resampler_width
    rgb_t = rgb_tokens(rgb_image_size, patch_size)
    splat_t = splat_tokens(num_latents)
    keys = num_splats + num_latents if latents_in_keys else num_splats
    report: dict[str, Any] = {
        "rgb_image_size": rgb_image_size,
        "patch_size": patch_size,
        "width": width,
        "layers": layers,
        "mlp_ratio": mlp_ratio,
        "num_latents": num_latents,
        "num_splats": num_splats,
        "resampler_layers": resampler_layers,
        "resampler_width": resampler_width,
        "resampler_keys": keys,
        "rgb_tokens": rgb_t,
        "splat_tokens": splat_t,
        "token_ratio": rgb_t / splat_t,
        "rgb_attention_flops": attention_flops(rgb_t, width, layers),
        "splat_attention_flops": attention_flops(splat_t, width, layers),
        "rgb_mlp_flops": mlp_flops(rgb_t, width, layers, mlp_ratio),
        "splat_mlp_flops": mlp_flops(splat_t, width, layers, mlp_ratio),
        "rgb_patch_embed_flops": patch_embed_flops(rgb_image_size, patch_size, width, channels),
        "resampler_cross_attention_flops": cross_attention_flops(
            num_latents, keys, resampler_width, resampler_layers
        ),
        "resampler_mlp_flops": mlp_flops(num_latents, resampler_width, resampler_layers, mlp_ratio),
    }
    report["rgb_total_flops"] = (
        report["rgb_attention_flops"] + report["rgb_mlp_flops"] + report["rgb_patch_embed_flops"]
    )
    report["splat_total_flops"] = (
        report["splat_attention_flops"]
        + report["splat_mlp_flops"]
        + report["resampler_cross_attention_flops"]
        + report["resampler_mlp_flops"]
    )
    report["attention_flops_ratio"] = report["rgb_attention_flops"] / report["splat_attention_flops"]
    report["total_flops_ratio"] = report["rgb_total_flops"] / report["splat_total_flops"]
    return report


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
