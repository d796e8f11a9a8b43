"""The SAF workload: batched image encoder, then each image's prompts through the decoder (`decode_batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from samrepro.metrics import best_mask


@dataclass
class Sample:
    """One image and its prompts, in original-image pixel coordinates."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: np.ndarray | None  # (N, P, 2) float32 x, y
    labels: np.ndarray | None  # (N, P) int: 1 foreground, 0 background
    boxes: np.ndarray | None = None  # (N, 4) float32 x0, y0, x1, y1
    gt_masks: np.ndarray | None = None  # (N, H, W) bool, one per prompt
    image_id: int = 0

    @property
    def num_prompts(self) -> int:
        source = self.points if self.points is not None else self.boxes
        return 0 if source is None else len(source)


@dataclass
class Prediction:
    masks: torch.Tensor  # (N, 3, H, W) bool, original size
    iou_pred: torch.Tensor  # (N, 3) float32
    best: torch.Tensor  # (N, H, W) bool: the mask with the highest predicted IoU


def preprocess(sam: Sam, samples: list[Sample], device: torch.device) -> tuple[torch.Tensor, list, list]:
    """Resize long side, normalise, pad: -> (B, 3, S, S) fp32, input sizes, original sizes."""
    predictor = SamPredictor(sam)
    batch, input_sizes, original_sizes = [], [], []
    for s in samples:
        resized = predictor.transform.apply_image(s.image)  # (h, w, 3) uint8, long side S
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()  # 1, 3, h, w
        input_sizes.append(tuple(x.shape[-2:]))
        original_sizes.append(s.image.shape[:2])
        batch.append(sam.preprocess(x))
    return torch.cat(batch), input_sizes, original_sizes


def prompt_tensors(predictor: SamPredictor, s: Sample, device: torch.device) -> dict:
    """A sample's prompts mapped to the model's input frame, as predict_torch keyword args."""
    size = s.image.shape[:2]
    out: dict = {"point_coords": None, "point_labels": None, "boxes": None}
    if s.points is not None:
        pts = torch.as_tensor(s.points, dtype=torch.float32, device=device)
        out["point_coords"] = predictor.transform.apply_coords_torch(pts, size)
        out["point_labels"] = torch.as_tensor(s.labels, dtype=torch.int64, device=device)
    if s.boxes is not None:
        boxes = torch.as_tensor(s.boxes, dtype=torch.float32, device=device)
        out["boxes"] = predictor.transform.apply_boxes_torch(boxes, size)
    return out


@torch.no_grad()
def predict_image(
    predictor: SamPredictor, features: torch.Tensor, input_size: tuple, original_size: tuple, prompts: dict
) -> Prediction:
    """`predict_torch` on one image whose embedding (1, C, h, w) was computed in a batch."""
    predictor.features = features
    predictor.input_size, predictor.original_size = input_size, original_size
    predictor.is_image_set = True
    masks, iou_pred, _ = predictor.predict_torch(**prompts, multimask_output=True)
    return prediction(masks, iou_pred)


def prediction(masks: torch.Tensor, iou_pred: torch.Tensor) -> Prediction:
    iou_pred = iou_pred.float()
    return Prediction(masks=masks, iou_pred=iou_pred, best=best_mask(masks, iou_pred))


@torch.no_grad()
def run(sam: Sam, samples: list[Sample]) -> tuple[torch.Tensor, list[Prediction]]:
    """Embeddings (B, C, h, w) of a batch and each image's predictions."""
    device = next(sam.parameters()).device
    x, input_sizes, original_sizes = preprocess(sam, samples, device)
    features = sam.image_encoder(x)
    predictor = SamPredictor(sam)
    prompts = [prompt_tensors(predictor, s, device) for s in samples]
    return features, decode_batch(sam, predictor, features, prompts, input_sizes, original_sizes)


def decode_batch(
    sam: Sam,
    predictor: SamPredictor,
    features: torch.Tensor,
    prompts: list[dict | None],
    input_sizes: list,
    original_sizes: list,
) -> list[Prediction | None]:
    """Each image's predictions from its row of `features` (B, C, h, w); None where its prompts are None (batch
    padding). A patch that decodes whole batches (batched_decoder) gives the model `predict_batch`, used when
    present; otherwise `predict_torch` runs per image."""
    if hasattr(sam, "predict_batch"):
        outs = sam.predict_batch(features, prompts, input_sizes, original_sizes)
        return [None if out is None else prediction(*out) for out in outs]
    return [
        None if p is None else predict_image(predictor, features[i : i + 1], input_sizes[i], original_sizes[i], p)
        for i, p in enumerate(prompts)
    ]
