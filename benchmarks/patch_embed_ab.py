"""The image encoder's patch embedding alone at SAM's shapes (batch 16 of 1024² bf16 images), for A/B runs:
upstream's convolution (`conv`), with `channels_last`'s NHWC weight and input (`conv_nhwc`), and as
`patch_embed_gemm`'s one GEMM over the patches on that NHWC weight (`gemm`), each eager and compiled (inductor,
default mode). Prints each variant's time per call, `triton.testing.do_bench`'s median (L2 flushed between calls).
"""

from __future__ import annotations

import argparse

import torch
from segment_anything.modeling.image_encoder import PatchEmbed
from triton.testing import do_bench

from samrepro.registry import apply_patches

WIDTHS = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
STACKS = {"conv": [], "conv_nhwc": ["channels_last"], "gemm": ["channels_last", "patch_embed_gemm"]}


def variants(width: int, device: str = "cuda") -> dict[str, torch.nn.Module]:
    """Fresh PatchEmbeds with the same seeded weights: upstream, under channels_last, under both patches."""
    made = {}
    for name, patches in STACKS.items():
        torch.manual_seed(0)
        embed = PatchEmbed(kernel_size=(16, 16), stride=(16, 16), in_chans=3, embed_dim=width)
        holder = torch.nn.Module()  # what the patches reach: sam.image_encoder.patch_embed
        holder.image_encoder = torch.nn.Module()
        holder.image_encoder.patch_embed = embed.to(device, torch.bfloat16)
        apply_patches(holder, patches)  # left applied: the embedding is timed as patched
        made[name] = embed
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_b,vit_h")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)  # B, 3, H, W (NCHW)
    for model in args.models.split(","):
        made = variants(WIDTHS[model])
        with torch.no_grad():
            ref = made["conv"](x)
            for name, embed in made.items():
                for mode, fn in (("eager", embed), ("compiled", torch.compile(embed, fullgraph=True))):
                    err = (fn(x).float() - ref.float()).abs().max().item()
                    ms = do_bench(lambda fn=fn: fn(x), warmup=50, rep=300)
                    print(f"{model} batch {args.batch} {name:9s} {mode:8s} {ms * 1e3:8.1f} µs  max |diff| {err:.3g}")


if __name__ == "__main__":
    main()
