"""How many 2:4 mask entries of vit_b's encoder Linears (random weights, seed 0) move when |w| is ranked in bf16
instead of fp32, under the old rule (topk on the raw dtype) and the current one (prune_2_4)."""

import torch

from samrepro.models import load_model
from samrepro.patches.sparse24 import prune_2_4


def old_rule(w):
    g = w.reshape(w.shape[0], -1, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True).reshape(w.shape)


sam = load_model("vit_b", "cpu", "random")
old = new = total = 0
for m in sam.image_encoder.blocks.modules():
    if isinstance(m, torch.nn.Linear):
        w = m.weight.detach().float()
        total += w.numel()
        old += (old_rule(w) != old_rule(w.to(torch.bfloat16))).sum().item()
        new += ((prune_2_4(w) != 0) != (prune_2_4(w.to(torch.bfloat16)) != 0)).sum().item()
print(
    f"encoder Linear weights: {total:,}; mask entries that differ fp32 vs bf16: old rule {old:,} "
    f"({100 * old / total:.3f}%), current rule {new:,}"
)
