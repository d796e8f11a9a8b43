"""FLOP counts of the encoders: torch's FlopCounterMode on a meta model agrees with a count by hand."""

from __future__ import annotations

import pytest

from samrepro.flops import encoder_flops, tflop_s

# dim, depth, heads, global block indices (segment_anything's build_sam_vit_*)
ARCH = {"vit_b": (768, 12, 12, {2, 5, 8, 11}), "vit_h": (1280, 32, 16, {7, 15, 23, 31})}


def by_hand(dim: int, depth: int, heads: int, glob: set[int], grid: int = 64, win: int = 14) -> int:
    """2 FLOPs per multiply-add: patch embedding, per block qkv/proj (windows zero-padded to 70x70), attention
    (q @ k, attn @ v and the two rel-pos einsums), the MLP, then the neck's 1x1 and 3x3 convs."""
    windows, tokens = (-(-grid // win)) ** 2, grid * grid
    total = 2 * tokens * 3 * 16 * 16 * dim
    for i in range(depth):
        n, count, side = (tokens, 1, grid) if i in glob else (win * win, windows, win)
        total += 2 * n * count * 4 * dim * dim  # qkv (3 dim) + proj (dim)
        total += count * heads * 2 * (2 * n * n + 2 * n * side) * (dim // heads)
        total += 2 * tokens * 8 * dim * dim  # MLP, ratio 4
    return total + 2 * tokens * (dim * 256 + 256 * 256 * 9)


@pytest.mark.parametrize("model", ARCH)
def test_counter_matches_the_count_by_hand(model):
    assert encoder_flops(model) == by_hand(*ARCH[model])


def test_vit_h_is_5_96_tflop_and_rate():
    assert round(encoder_flops("vit_h") / 1e12, 2) == 5.96
    assert tflop_s("vit_h", 16, 16 * 17.27e-3) == pytest.approx(345.2, abs=0.1)
    assert tflop_s("vit_h", 16, 0.0) is None
