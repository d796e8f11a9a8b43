"""The training loss: SAM's forward on a padded batch, focal + dice on the best of 3 masks, IoU-head MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from torchvision.ops import sigmoid_focal_loss

from tools.train_tiny.data import BOX, MULTI, P_MAX, POINT, SIZE

FOCAL_W, DICE_W, IOU_W = 20.0, 1.0, 1.0
PAD_LOGIT = -30.0  # logits forced outside the image: no loss, no gradient, never counted as foreground


def normalize(sam: Sam, image: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sam.preprocess` for a padded uint8 batch (B, 3, S, S): normalised input and the valid-pixel mask (B, S, S)."""
    r = torch.arange(SIZE, device=image.device)
    valid = (r[None, :, None] < size[:, 0, None, None]) & (r[None, None, :] < size[:, 1, None, None])  # B, S, S
    x = (image.float() - sam.pixel_mean) / sam.pixel_std
    return torch.where(valid[:, None], x, 0.0), valid


def decode(
    dec: MaskDecoder, emb: torch.Tensor, pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` with the image embedding already expanded to one per prompt.

    emb, dense (N, C, h, w); pe (1, C, h, w); sparse (N, T, C) -> masks (N, 4, 4h, 4w) logits, iou (N, 4).
    """
    n, c, h, w = emb.shape
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])  # 1 + 4, C
    tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)  # N, 5 + T, C
    hs, src = dec.transformer(emb + dense, pe.expand(n, -1, -1, -1), tokens)  # N, 5 + T, C; N, h*w, C
    up = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # N, C/8, 4h, 4w
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)  # N, 4, C/8
    masks = (hyper @ up.flatten(2)).view(n, -1, *up.shape[-2:])  # N, 4, 4h, 4w
    return masks, dec.iou_prediction_head(hs[:, 0])


def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal, dice and true IoU (each N, M) of low-res logits (N, M, h, w) against target, valid (N, S, S) bool.

    The loss is taken at the input resolution S, after the same bilinear upsampling as `Sam.postprocess_masks`,
    so training sees the boundaries that the evaluation thresholds.
    """
    logits = F.interpolate(logits.float(), (SIZE, SIZE), mode="bilinear", align_corners=False)  # N, M, S, S
    logits = logits.masked_fill(~valid[:, None], PAD_LOGIT)
    t = target[:, None].expand_as(logits)
    # alpha=-1: no class weighting, so logit 0 stays the decision boundary that the evaluation thresholds at
    focal = sigmoid_focal_loss(logits, t.float(), alpha=-1, reduction="none").mean((-2, -1))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    hard = logits > 0
    inter, union = (hard & t).sum((-2, -1)), (hard | t).sum((-2, -1))
    iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)  # both empty count as 1, as metrics.mask_iou
    return focal, dice, iou


def encode_prompts(sam: Sam, batch: dict[str, torch.Tensor], kinds: torch.Tensor) -> list[tuple]:
    """Per prompt kind present: (kind, prompt indices (N,) on CPU, sparse (N, T, C), dense (N, C, h, w)), in fp32.

    Prompts are grouped by kind on the CPU; the official point embedding indexes with boolean masks (a device sync),
    which is cheap here, before the image encoder's work is queued. bf16 would blur the point positions.
    """
    device = sam.pixel_mean.device
    points, labels = batch["points"].flatten(0, 1), batch["labels"].flatten(0, 1)  # B*K, P_MAX, 2; B*K, P_MAX
    out = []
    for kind in (POINT, BOX, MULTI):
        sel = (kinds.flatten() == kind).nonzero().squeeze(1)  # N
        if not len(sel):
            continue
        sel_d = sel.to(device)
        if kind == BOX:
            sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"].flatten(0, 1)[sel_d], masks=None)
        else:
            p = P_MAX if kind == MULTI else 1
            sparse, dense = sam.prompt_encoder(points=(points[sel_d, :p], labels[sel_d, :p]), boxes=None, masks=None)
        out.append((kind, sel, sparse, dense))
    return out


def forward_loss(sam: Sam, batch: dict[str, torch.Tensor], kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over all prompts and its parts (focal, dice, iou mse) of a batch on the model's device.

    `kinds` (B, K) stays on the CPU. Single points get 3 masks and the loss of the best one (SAM's ambiguity rule);
    boxes and multi-point prompts get mask 0. The IoU head learns every output mask's true IoU.
    """
    device = sam.pixel_mean.device
    b, k = kinds.shape
    owner = torch.arange(b).repeat_interleave(k)  # B*K: image of each prompt
    target = batch["masks"].flatten(0, 1)  # B*K, S, S
    prompts = encode_prompts(sam, batch, kinds)
    pe = sam.prompt_encoder.get_dense_pe()  # 1, C, h, w
    x, valid = normalize(sam, batch["image"], batch["size"])
    cast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    with cast:
        emb = sam.image_encoder(x)  # B, C, h, w
    parts = torch.zeros(3, device=device)
    for kind, sel, sparse, dense in prompts:
        sel_d, img = sel.to(device), owner[sel].to(device)  # N, N
        with cast:
            masks, iou_pred = decode(sam.mask_decoder, emb[img], pe, sparse, dense)  # N, 4, 4h, 4w; N, 4
        out = slice(1, None) if kind == POINT else slice(0, 1)
        focal, dice, iou = mask_losses(masks[:, out], target[sel_d], valid[img])  # N, M each
        best = (FOCAL_W * focal + DICE_W * dice).argmin(1, keepdim=True)  # N, 1
        iou_mse = (iou_pred[:, out].float() - iou).pow(2).mean(1)  # N
        parts += torch.stack([focal.gather(1, best).sum(), dice.gather(1, best).sum(), iou_mse.sum()])
    parts = parts / (b * k)
    return FOCAL_W * parts[0] + DICE_W * parts[1] + IOU_W * parts[2], parts.detach()
