"""amg_postprocess: the automatic mask generator's work per batch of grid points, with fewer full-size masks and
fewer host syncs (beyond the blog: "segment everything").

Upstream `SamAutomaticMaskGenerator._process_batch` asks `predict_torch` for logits, which upsamples all 3 masks of
every point to the image (64 points: 192 full-size fp32 maps) before most are dropped by the predicted-IoU filter;
it filters with boolean indexing three times (a host sync each), and `mask_to_rle_pytorch` copies each mask's run
boundaries to the host in a sync of its own. Here:
- the predicted-IoU filter runs on the low-res logits, and only the kept masks are upsampled. Bilinear resizing
  is per channel, so each kept mask's logits are bit-identical to upstream's;
- stability, threshold and boxes run on the kept masks as upstream; the stability and crop-edge filters are one
  index (one sync);
- the RLEs of all kept masks come from one copy of their run boundaries to the host.
Same masks, scores, boxes and RLEs as upstream: tolerance exact.

Generators are built after patching, so the patch replaces `_process_batch` on the generator class while any
patched model is alive and marks the model; a generator over an unmarked model runs upstream's method. The prompt
encoder, mask decoder and `postprocess_masks` are called as `predict_torch` calls them, so other patches' versions
of them are used. Only the generator runs this code: the point-prompt workload never reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    calculate_stability_score,
    is_box_near_crop_edge,
    uncrop_masks,
)

from samrepro.patch import EXACT, Patch, PatchConfig, Undo
from samrepro.registry import register_patch

UPSTREAM = SamAutomaticMaskGenerator._process_batch
MARK = "_samrepro_amg_postprocess"
_models = [0]  # patched models alive; the class holds the replacement while this is above 0


@dataclass(frozen=True)
class AmgPostprocessConfig(PatchConfig):
    pass


def rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(K, H, W) bool -> upstream's uncompressed RLE per mask (column-major runs, starting with a run of 0s), from
    one host copy of where the runs change."""
    k, h, w = masks.shape
    flat = masks.transpose(1, 2).flatten(1)  # K, W*H: column-major, as COCO counts
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero().cpu().numpy()  # M, 2: (mask, index), sorted by mask
    first = flat[:, 0].cpu().numpy()  # K
    bounds = np.searchsorted(change[:, 0], np.arange(k + 1))  # mask i's rows: bounds[i] .. bounds[i + 1]
    out = []
    for i in range(k):
        cuts = np.concatenate([[0], change[bounds[i] : bounds[i + 1], 1] + 1, [h * w]])
        out.append({"size": [h, w], "counts": ([0] if first[i] else []) + np.diff(cuts).tolist()})
    return out


def _process_batch(self: SamAutomaticMaskGenerator, points: np.ndarray, im_size, crop_box, orig_size) -> MaskData:
    model, predictor = self.predictor.model, self.predictor
    if not getattr(model, MARK, False):
        return UPSTREAM(self, points, im_size, crop_box, orig_size)
    orig_h, orig_w = orig_size
    coords = torch.as_tensor(predictor.transform.apply_coords(points, im_size), device=predictor.device)  # N, 2
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)  # N, 1
    sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
    low_res, iou_preds = model.mask_decoder(
        image_embeddings=predictor.features,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )  # N, 3, h, w; N, 3
    low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)  # 3N, h, w; 3N
    pts = torch.as_tensor(points.repeat(3, axis=0))  # 3N, 2 on the host, as upstream
    if self.pred_iou_thresh > 0.0:
        kept = (iou_preds > self.pred_iou_thresh).nonzero()[:, 0]  # K
        low_res, iou_preds, pts = low_res[kept], iou_preds[kept], pts[kept.cpu()]
    logits = model.postprocess_masks(low_res[:, None], predictor.input_size, predictor.original_size)[:, 0]  # K, H, W
    stability = calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)  # K
    masks = logits > model.mask_threshold  # K, H, W
    boxes = batched_mask_to_box(masks)  # K, 4
    keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
    if self.stability_score_thresh > 0.0:
        keep &= stability >= self.stability_score_thresh
    kept = keep.nonzero()[:, 0]
    return MaskData(
        iou_preds=iou_preds[kept],
        points=pts[kept.cpu()],
        stability_score=stability[kept],
        boxes=boxes[kept],
        rles=rles(uncrop_masks(masks[kept], crop_box, orig_h, orig_w)),
    )


def _release() -> None:
    _models[0] -= 1
    if _models[0] == 0:
        SamAutomaticMaskGenerator._process_batch = UPSTREAM


def _apply(sam: Sam, config: AmgPostprocessConfig, undo: Undo) -> None:
    if _models[0] == 0:
        SamAutomaticMaskGenerator._process_batch = _process_batch
    _models[0] += 1
    undo.on_undo(_release)
    undo.setattr(sam, MARK, True)


PATCH = register_patch(
    Patch(
        name="amg_postprocess",
        summary="automatic mask generator: IoU filter before upsampling, one sync per filter pass, RLE in one copy",
        config_cls=AmgPostprocessConfig,
        apply_fn=_apply,
        tolerance=EXACT,  # the same masks, scores, boxes and RLEs as upstream
        touches_encoder=False,
        unfit_workloads=(("points", "only the automatic mask generator (--workload amg) runs this code"),),
    )
)
