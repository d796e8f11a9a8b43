"""best_mask_only: the mask decoder hands on only the multimask output with the highest predicted IoU, so only
that mask is upsampled to the image and thresholded (beyond the blog: the decoder path).

The workload keeps one mask per prompt (the best of 3 by predicted IoU), but upstream upsamples all 3 to the
original image size first: at 1024 px that is 3 x 4 MiB of fp32 per prompt through two bilinear resizes. Here the
choice moves before the upsampling; bilinear resizing is per channel, so the kept mask is bit-identical. Also, the
second resize of `postprocess_masks` (input frame -> original size) is skipped when the sizes already match, where
it is an exact copy (align_corners=False at scale 1).

Contract change, hence its own patch: with `multimask_output=True`, `SamPredictor.predict_torch` now returns masks
(N, 1, H, W) and low-res logits (N, 1, h, w), while `iou_predictions` stays (N, 3) (all three scores).
`multimask_output=False` is unchanged. Undo restores the decoder's and the model's own methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from samrepro.metrics import best_mask
from samrepro.patch import EXACT, Patch, PatchConfig, Undo
from samrepro.registry import register_patch


@dataclass(frozen=True)
class BestMaskOnlyConfig(PatchConfig):
    pass


def keep_best(masks: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w), (N, 3) -> (N, 1, h, w): the workload's own choice (`metrics.best_mask`), kept 4-D."""
    return best_mask(masks, iou_pred)[:, None]


def postprocess_masks(self: Sam, masks: torch.Tensor, input_size: tuple, original_size: tuple) -> torch.Tensor:
    """Upstream `postprocess_masks` without its second resize when the cropped size is already the original."""
    size = self.image_encoder.img_size
    masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)  # N, C, S, S
    masks = masks[..., : input_size[0], : input_size[1]]
    if tuple(masks.shape[-2:]) == tuple(original_size):
        return masks
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def _apply(sam: Sam, config: BestMaskOnlyConfig, undo: Undo) -> None:
    decoder = sam.mask_decoder
    upstream = decoder.forward  # whatever earlier patches (bf16) made of it

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        masks, iou_pred = upstream(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
        )  # N, 3 | 1, h, w; N, 3 | 1
        return (keep_best(masks, iou_pred) if multimask_output else masks), iou_pred

    undo.setattr(decoder, "forward", MethodType(forward, decoder))
    undo.setattr(sam, "postprocess_masks", MethodType(postprocess_masks, sam))


PATCH = register_patch(
    Patch(
        name="best_mask_only",
        summary="only the mask with the highest predicted IoU is upsampled and thresholded (1 of 3 per prompt)",
        config_cls=BestMaskOnlyConfig,
        apply_fn=_apply,
        tolerance=EXACT,  # the kept mask and all IoU predictions are bit-identical
        touches_encoder=False,
        # The generator flattens masks (N, 3, ...) against scores (N, 3): one mask per point no longer lines up.
        unfit_workloads=(("amg", "the automatic mask generator reads all 3 masks per point; this patch keeps 1"),),
    )
)
