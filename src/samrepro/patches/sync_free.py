"""sync_free: remove the device->host synchronisations of the official model (bit-exact)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder
from segment_anything.modeling.prompt_encoder import PromptEncoder

from samrepro.patch import EXACT, Patch, PatchConfig, Undo
from samrepro.registry import register_patch

_upstream_get_rel_pos = image_encoder.get_rel_pos
_users = 0  # models currently relying on the device-side lookup


def get_rel_pos_on_device(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Upstream `get_rel_pos` with its index tensors built on `rel_pos.device` (no H2D copy)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]  # q_size, k_size, C


def embed_points_with_where(self: PromptEncoder, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
    """Upstream `_embed_points` with boolean-mask indexing replaced by `torch.where` selects."""
    points = points + 0.5  # B, N, 2: shift to pixel centres
    if pad:
        points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
        labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
    emb = self.pe_layer.forward_with_coords(points, self.input_image_size)  # B, N, C
    lab = labels[..., None]  # B, N, 1
    emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
    emb = torch.where(lab == 0, emb + self.point_embeddings[0].weight, emb)
    return torch.where(lab == 1, emb + self.point_embeddings[1].weight, emb)


@dataclass(frozen=True)
class SyncFreeConfig(PatchConfig):
    pass


def _apply(sam, config: SyncFreeConfig, undo: Undo) -> None:
    global _users
    if _users == 0:  # upstream's add_decomposed_rel_pos looks the global up at call time
        image_encoder.get_rel_pos = get_rel_pos_on_device
    _users += 1
    undo.on_undo(_release)
    undo.setattr(sam.prompt_encoder, "_embed_points", MethodType(embed_points_with_where, sam.prompt_encoder))


def _release() -> None:
    global _users
    _users -= 1
    if _users == 0:
        image_encoder.get_rel_pos = _upstream_get_rel_pos


PATCH = register_patch(
    Patch(
        name="sync_free",
        summary="index tensors built on the device, boolean-mask indexing replaced by torch.where",
        config_cls=SyncFreeConfig,
        apply_fn=_apply,
        tolerance=EXACT,
    )
)
