"""Token counts and attention FLOPs (gsclip_lib/evaluation/token_budget.py), by hand and against torch's counter."""

import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gsclip_lib.evaluation.token_budget import (
    attention_flops,
    cross_attention_flops,
    mlp_flops,
    patch_embed_flops,
    rgb_tokens,
    splat_tokens,
    token_report,
)


def counted_flops(module: torch.nn.Module, *inputs: torch.Tensor, **kwargs) -> int:
    """Matmul FLOPs torch counts for one forward, on paths whose matmuls it can see: the math SDPA
    backend (the fused CPU kernel has no FLOP formula and would count zero for the scores), and
    gradients on (under no_grad, an eval-mode MultiheadAttention takes a fused fast path)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops()


def test_token_counts() -> None:
    assert rgb_tokens(28, 4) == 50  # 7 x 7 patches + CLS
    assert rgb_tokens(224, 16) == 197
    assert rgb_tokens(30, 4) == 50  # a remainder that does not fill a patch is dropped
    assert splat_tokens(16) == 17
    assert splat_tokens(196) == 197
    with pytest.raises(ValueError, match="larger than the image"):
        rgb_tokens(8, 16)
    with pytest.raises(ValueError, match="num_latents must be positive"):
        splat_tokens(0)


def test_flop_formulas_by_hand() -> None:
    # T = 3 tokens, d = 2: projections 4 * 2 * 3 * 2^2 = 96, scores and values 2 * 2 * 3^2 * 2 = 72.
    assert attention_flops(3, 2, 1) == 168
    assert attention_flops(3, 2, 2) == 336
    # Two matmuls 2 -> 8 -> 2 on 3 tokens: 2 * 2 * 3 * 2 * 8 = 192.
    assert mlp_flops(3, 2, 1) == 192
    # 2 queries, 5 keys, d = 3: q + out 2 * 2 * 2 * 9 = 72, k + v 2 * 2 * 5 * 9 = 180, 2 * 2 * 2 * 5 * 3 = 120.
    assert cross_attention_flops(2, 5, 3, 1) == 372
    # 28x28 RGB, patch 4, d = 2: 49 patches * 2 * (16 * 3) * 2.
    assert patch_embed_flops(28, 4, 2) == 49 * 2 * 48 * 2


def test_attention_flops_match_torch_counter() -> None:
    width, heads = 12, 3
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
    tokens = torch.randn(1, 7, width)
    assert counted_flops(attention, tokens, tokens, tokens, need_weights=False) == attention_flops(7, width, 1)
    queries, keys = torch.randn(1, 4, width), torch.randn(1, 9, width)
    assert counted_flops(attention, queries, keys, keys, need_weights=False) == cross_attention_flops(
        4, 9, width, 1
    )


def test_rgb_total_matches_an_open_clip_vit() -> None:
    """The whole RGB tower's matmuls: stem + attention + MLP, plus the final projection to 16."""
    vit = VisionTransformer(
        image_size=28, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=16
    ).eval()
    report = token_report(28, 4, width=32, layers=2, num_latents=16, num_splats=22, resampler_layers=4)
    projection = 2 * 32 * 16
    assert counted_flops(vit, torch.randn(1, 3, 28, 28)) == report["rgb_total_flops"] + projection


def test_token_report() -> None:
    report = token_report(28, 4, width=32, layers=2, num_latents=16, num_splats=22, resampler_layers=4)
    assert (report["rgb_tokens"], report["splat_tokens"]) == (50, 17)
    assert report["rgb_attention_flops"] == attention_flops(50, 32, 2)
    assert report["splat_attention_flops"] == attention_flops(17, 32, 2)
    assert report["resampler_keys"] == 22
    assert report["resampler_cross_attention_flops"] == cross_attention_flops(16, 22, 32, 4)
    assert report["resampler_mlp_flops"] == mlp_flops(16, 32, 4)
    assert report["splat_total_flops"] == (
        report["splat_attention_flops"]
        + report["splat_mlp_flops"]
        + report["resampler_cross_attention_flops"]
        + report["resampler_mlp_flops"]
    )
    assert report["attention_flops_ratio"] > 50 / 17  # the T^2 term makes it more than the token ratio
    flamingo = token_report(28, 4, 32, 2, 16, 22, 4, latents_in_keys=True, resampler_width=8)
    assert flamingo["resampler_keys"] == 38
    assert flamingo["resampler_cross_attention_flops"] == cross_attention_flops(16, 38, 8, 4)


def test_paper_setting_same_tokens_at_196_latents() -> None:
    """ViT-B/16 at 224: 196 latents give the RGB tower's 197 tokens; 98 latents halve them."""
    full = token_report(224, 16, width=768, layers=12, num_latents=196, num_splats=3136, resampler_layers=4)
    assert full["rgb_tokens"] == full["splat_tokens"] == 197
    assert full["attention_flops_ratio"] == 1.0
    assert full["total_flops_ratio"] < 1.0  # the resampler is extra work at equal token counts
    half = token_report(224, 16, width=768, layers=12, num_latents=98, num_splats=400, resampler_layers=4)
    assert half["splat_tokens"] == 99
    assert half["token_ratio"] == pytest.approx(197 / 99)
