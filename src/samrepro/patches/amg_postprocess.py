"""amg_postprocess: the automatic mask generator's work per batch of grid points, with only the kept masks upsampled
and a fixed number of host syncs (beyond the blog: "segment everything").

Upstream `SamAutomaticMaskGenerator._process_batch` asks `predict_torch` for logits, which upsamples all 3 masks of
every point to the image (64 points: 192 full-size fp32 maps) before the predicted-IoU filter drops most of them. It
then filters with boolean indexing three times (a host sync each), and `mask_to_rle_pytorch` copies each mask's
change indices to the host in a sync of its own. Here:
- the prompt encoder and mask decoder are called as `predict_torch` calls them, so other patches' versions of them
  (bf16, sdpa, compile_decoder) run;
- the predicted-IoU filter runs on the low-res logits and only the kept masks go through `postprocess_masks`;
- stability score, threshold, boxes and the crop-edge test run on the kept masks, and the stability and edge
  filters are one index (one `nonzero`);
- the RLEs of all kept masks come from one `nonzero` and one host copy of where their runs start.

Exact (tolerance EXACT): bilinear resizing is per channel, so each kept mask's logits are bit-identical to upstream's;
the scores, thresholds, boxes and edge test are computed per mask by upstream's own functions, and a mask is kept iff
it passes every filter, as upstream's chain of filters keeps it, in the same order. The RLE counts, the `MaskData`
keys and the dtypes of its tensors (down to the float boxes upstream returns for a batch with no stable mask) are
upstream's.

Installed on the class: generators are built after patching, so the first model applied replaces `_process_batch`
on `SamAutomaticMaskGenerator` and marks that model; the replacement runs upstream's method for a generator over an
unmarked model. Undo removes the mark, and the last patched model undone puts the class's function back.
Only the generator runs this code, so the point-prompt workload is declared unfit (there it would change nothing).
"""

from __future__ import annotations

from collections.abc import Callable
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

MARK = "_samrepro_amg_postprocess"  # set on a patched Sam: its generators take the path below
# Patched models not yet undone, and the class's own `_process_batch` while the replacement is installed. A patched
# model collected without undo keeps the replacement installed, which is harmless: unmarked models run upstream's.
_installed: dict[str, Any] = {"models": 0, "upstream": None}


@dataclass(frozen=True)
class AmgPostprocessConfig(PatchConfig):
    pass


def rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(B, H, W) bool -> upstream `mask_to_rle_pytorch`'s uncompressed RLEs (column-major run lengths, starting with
    a run of 0s, so a mask whose first pixel is set starts with count 0), from one host copy for the whole batch."""
    b, h, w = masks.shape
    cols = masks.transpose(1, 2).reshape(b, h * w)  # B, W*H: column-major, as COCO counts runs
    # A run starts where a pixel differs from the one before; the pixel before the first counts as 0.
    starts = torch.cat([cols[:, :1], cols[:, 1:] ^ cols[:, :-1]], dim=1)  # B, W*H
    at = starts.flatten().nonzero()[:, 0].cpu().numpy()  # S: flat indices, ascending, so grouped by mask
    bounds = np.searchsorted(at, np.arange(b + 1) * (h * w))  # B + 1: mask i's starts are at[bounds[i]:bounds[i + 1]]
    out = []
    for i in range(b):
        run_starts = at[bounds[i] : bounds[i + 1]] - i * h * w  # ascending, in [0, W*H)
        counts = np.diff(run_starts, prepend=0, append=h * w)  # a leading 0 when the first run (of 1s) starts at 0
        out.append({"size": [h, w], "counts": counts.tolist()})
    return out


def process_batch(
    gen: SamAutomaticMaskGenerator,
    points: np.ndarray,
    im_size: tuple[int, ...],
    crop_box: list[int],
    orig_size: tuple[int, ...],
) -> MaskData:
    """Upstream `_process_batch`'s MaskData (iou_preds, points, stability_score, boxes, rles) for N grid points in
    the crop's frame, upsampling only the masks that pass the predicted-IoU filter."""
    predictor, model = gen.predictor, gen.predictor.model
    if not predictor.is_image_set:
        raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    orig_h, orig_w = orig_size

    # The model as predict_torch runs it, minus its upsampling of all 3N masks.
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
    low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)  # 3N, h, w; 3N (point-major, as upstream)
    grid = torch.as_tensor(points.repeat(3, axis=0))  # 3N, 2 on the host, as upstream's MaskData holds it

    # Predicted-IoU filter on the low-res logits, then only the K kept masks are upsampled.
    if gen.pred_iou_thresh > 0.0:
        first = (iou_preds > gen.pred_iou_thresh).nonzero()[:, 0]  # K: indices into 3N (sync)
        low_res, iou_preds = low_res[first], iou_preds[first]  # K, h, w; K
    else:
        first = None
    logits = model.postprocess_masks(low_res[:, None], predictor.input_size, predictor.original_size)[:, 0]  # K, H, W

    # Stability, threshold, boxes and edge test per mask, then one index for both filters.
    stability = calculate_stability_score(logits, model.mask_threshold, gen.stability_score_offset)  # K
    masks = logits > model.mask_threshold  # K, H, W
    boxes = batched_mask_to_box(masks)  # K, 4 int64 (float zeros when K == 0, as upstream)
    stable = stability >= gen.stability_score_thresh if gen.stability_score_thresh > 0.0 else None  # K
    keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])  # K
    if stable is not None:
        keep &= stable
    kept = keep.nonzero()[:, 0]  # M: indices into K (sync)
    if len(kept) == 0 and len(boxes) > 0 and stable is not None and not bool(stable.any()):
        # Upstream boxes only the stable masks: with none, batched_mask_to_box returns float zeros, and that dtype
        # spreads to the crop's boxes when MaskData.cat joins batches (bbox 3.0, not 3). One more sync, only here.
        boxes = batched_mask_to_box(masks[:0])  # 0, 4 float
    index = kept if first is None else first[kept]  # M: indices into 3N
    return MaskData(
        iou_preds=iou_preds[kept],
        points=grid[index.cpu()],
        stability_score=stability[kept],
        boxes=boxes[kept],
        rles=rles(uncrop_masks(masks[kept], crop_box, orig_h, orig_w)),
    )


def _process_batch(self: SamAutomaticMaskGenerator, *args: Any) -> MaskData:
    """What the class holds while installed: the path above for a patched model, upstream's method otherwise."""
    if getattr(self.predictor.model, MARK, False):
        return process_batch(self, *args)
    return _installed["upstream"](self, *args)


def _release() -> None:
    _installed["models"] -= 1
    if _installed["models"] == 0:
        SamAutomaticMaskGenerator._process_batch = _installed["upstream"]
        _installed["upstream"] = None


def _apply(sam: Sam, config: AmgPostprocessConfig, undo: Undo) -> None:
    if _installed["models"] == 0:
        upstream: Callable = SamAutomaticMaskGenerator.__dict__["_process_batch"]
        _installed["upstream"] = upstream
        SamAutomaticMaskGenerator._process_batch = _process_batch
    _installed["models"] += 1
    undo.on_undo(_release)
    undo.setattr(sam, MARK, True)


PATCH = register_patch(
    Patch(
        name="amg_postprocess",
        summary="automatic mask generator: IoU filter before upsampling, one sync per filter pass, RLE in one copy",
        config_cls=AmgPostprocessConfig,
        apply_fn=_apply,
        tolerance=EXACT,  # upstream's masks, scores, boxes and RLEs, bit for bit
        touches_encoder=False,
        unfit_workloads=tuple(
            (w, "only the automatic mask generator (--workload amg) runs this code") for w in ("points", "interactive")
        ),
    )
)
