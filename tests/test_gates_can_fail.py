"""Each gate fails on a deliberately broken patch: proof that the gates can fail."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MethodType

import pytest
import torch
from torch import nn

from samrepro import amg
from samrepro.gates import accuracy_violations, amg_violations, undo_violations
from samrepro.patch import EXACT, Patch, PatchConfig, PatchError, Tolerance, Undo
from samrepro.registry import get_patch
from tests.conftest import make_samples


@dataclass(frozen=True)
class NoConfig(PatchConfig):
    pass


def broken(name: str, apply_fn, tolerance: Tolerance = EXACT) -> Patch:
    return Patch(name=name, summary="deliberately broken", config_cls=NoConfig, apply_fn=apply_fn, tolerance=tolerance)


def _noisy_embeddings(sam, cfg, undo: Undo) -> None:
    enc = sam.image_encoder

    def forward(self, x):
        y = type(self).forward(self, x)
        return y + 0.05 * y.std() * torch.randn_like(y)  # ~26 dB SQNR

    undo.setattr(enc, "forward", MethodType(forward, enc))


def _swapped_labels(sam, cfg, undo: Undo) -> None:
    pe = sam.prompt_encoder

    def embed_points(self, points, labels, pad):
        return type(self)._embed_points(self, points, torch.where(labels >= 0, 1 - labels, labels), pad)

    undo.setattr(pe, "_embed_points", MethodType(embed_points, pe))


def _shifted_iou_head(sam, cfg, undo: Undo) -> None:
    dec = sam.mask_decoder

    def forward(self, *args, **kwargs):
        masks, iou = type(self).forward(self, *args, **kwargs)
        return masks, iou + 0.1

    undo.setattr(dec, "forward", MethodType(forward, dec))


SAMPLES = dict(seed=3, batch_size=2, max_prompts=3, boxes=False, multi_point=False)


def test_sqnr_gate_fails_on_noisy_embeddings(tiny_ref):
    patch = broken("noisy", _noisy_embeddings, Tolerance(agreement_miou_min=0.0, embedding_sqnr_min_db=40.0))
    violations, measured = accuracy_violations(tiny_ref, [patch], make_samples(**SAMPLES))
    assert any(v.startswith("embedding_sqnr_db") for v in violations), measured


def test_agreement_gate_fails_on_wrong_prompt_labels(tiny_ref):
    patch = broken("swapped", _swapped_labels, Tolerance(agreement_miou_min=0.9, embedding_sqnr_min_db=0.0))
    violations, measured = accuracy_violations(tiny_ref, [patch], make_samples(**SAMPLES))
    assert any(v.startswith("miou_agreement") for v in violations), measured


def test_iou_prediction_gate_fails_on_shifted_scores(tiny_ref):
    patch = broken("iou", _shifted_iou_head, Tolerance(agreement_miou_min=0.0, iou_pred_max_abs=0.05))
    violations, measured = accuracy_violations(tiny_ref, [patch], make_samples(**SAMPLES))
    assert any(v.startswith("iou_pred_max_abs") for v in violations), measured


def test_gt_gate_fails_when_masks_get_worse(tiny_ref):
    patch = broken("swapped", _swapped_labels, Tolerance(agreement_miou_min=0.0, embedding_sqnr_min_db=0.0))
    violations, measured = accuracy_violations(tiny_ref, [patch], make_samples(**SAMPLES))
    if measured["miou_gt_drop"] <= 0:
        pytest.skip(f"swapped labels did not lower GT mIoU with these weights: {measured}")
    assert any(v.startswith("miou_gt_drop") for v in violations), measured


def _cast_in_place(sam, cfg, undo: Undo) -> None:
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # lossy and not recorded


def _new_parameter_objects(sam, cfg, undo: Undo) -> None:
    lin = sam.mask_decoder.iou_prediction_head.layers[0]
    weight = lin.weight
    lin.weight = nn.Parameter(weight.detach().clone())
    undo.on_undo(lambda: setattr(lin, "weight", nn.Parameter(weight.detach().clone())))  # equal values, new object


def _leaks_instance_attr(sam, cfg, undo: Undo) -> None:
    sam.image_encoder.forward = MethodType(type(sam.image_encoder).forward, sam.image_encoder)


def _leaks_inductor_flag(sam, cfg, undo: Undo) -> None:
    import torch._inductor.config as inductor

    inductor.epilogue_fusion = not inductor.epilogue_fusion


@pytest.mark.parametrize(
    "apply_fn, expected",
    [
        (_cast_in_place, "tensor values changed"),
        (_new_parameter_objects, "tensor objects"),
        (_leaks_instance_attr, "instance attributes"),
        (_leaks_inductor_flag, "global state changed"),
    ],
)
def test_undo_gate_fails_on_leaky_patch(tiny_ref, apply_fn, expected):
    import torch._inductor.config as inductor

    before = inductor.epilogue_fusion
    try:
        violations = undo_violations(copy.deepcopy(tiny_ref), [broken("leaky", apply_fn)], make_samples(**SAMPLES))
    finally:
        inductor.epilogue_fusion = before
    assert any(expected in v for v in violations), violations


def test_double_apply_and_apply_after_compile_refused(tiny_ref):
    sam = copy.deepcopy(tiny_ref)
    patch = broken("noisy", _noisy_embeddings)
    with patch.apply(sam):
        with pytest.raises(PatchError, match="already applied"):
            patch.apply(sam)
    original = sam.image_encoder
    sam.image_encoder = torch.compile(original)
    with pytest.raises(PatchError, match="before compile"):
        patch.apply(sam)
    sam.image_encoder = original


def _worst_mask_kept(sam, cfg, undo: Undo) -> None:
    """best_mask_only with argmin for argmax."""
    from samrepro.patches.best_mask_only import postprocess_masks

    dec = sam.mask_decoder

    def forward(self, *args, **kwargs):
        masks, iou = type(self).forward(self, *args, **kwargs)  # N, 3, h, w; N, 3
        worst = iou.argmin(dim=1)
        return masks[torch.arange(len(worst)), worst][:, None], iou

    undo.setattr(dec, "forward", MethodType(forward, dec))
    undo.setattr(sam, "postprocess_masks", MethodType(postprocess_masks, sam))


def _flipped_convs(sam, cfg, undo: Undo) -> None:
    """channels_last with every encoder conv kernel flipped left-right."""
    for conv in (m for m in sam.image_encoder.modules() if isinstance(m, nn.Conv2d)):
        flipped = conv.weight.detach().flip(-1).contiguous(memory_format=torch.channels_last)
        undo.setattr(conv, "weight", nn.Parameter(flipped, requires_grad=False))


def _compiled_decoder_off_by_a_bit(sam, cfg, undo: Undo) -> None:
    """compile_decoder whose compiled predict_masks shifts the IoU scores by 1e-3."""
    dec = sam.mask_decoder
    eager = dec.predict_masks

    def predict_masks(**kwargs):
        masks, iou = eager(**kwargs)
        return masks, iou + 1e-3

    undo.setattr(dec, "predict_masks", torch.compile(predict_masks, dynamic=None))


def _fold_grid_transposed(sam, cfg, undo: Undo) -> None:
    """fold_attn whose one-hot keys read the key grid transposed (rel_h against columns, rel_w against rows)."""
    from samrepro.patches import fold_attn

    fold = fold_attn.fold_rel_pos
    undo.setattr(fold_attn, "fold_rel_pos", lambda q, k, rel_h, rel_w, scale: fold(q, k, rel_w, rel_h, scale))
    fold_attn.PATCH.apply_fn(sam, fold_attn.FoldAttnConfig(), undo)


def _gelu_epilogue_without_bias(sam, cfg, undo: Undo) -> None:
    """gelu_epilogue's fused GEMM handed no bias (the epilogue's bias argument dropped)."""
    for block in sam.image_encoder.blocks:
        mlp = block.mlp

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])  # tokens, C
            zero = torch.zeros_like(self.lin1.bias)
            hidden = torch._addmm_activation(zero, flat, self.lin1.weight.t(), use_gelu=True)  # tokens, 4C
            return self.lin2(hidden.view(*x.shape[:-1], -1))

        undo.setattr(mlp, "forward", MethodType(forward, mlp))


def _patches_transposed(sam, cfg, undo: Undo) -> None:
    """patch_embed_gemm multiplying each patch by its kernel transposed: kh and kw swapped in the weight's rows."""
    from samrepro.patches import patch_embed_gemm

    proj = sam.image_encoder.patch_embed.proj
    transposed = proj.weight.detach().transpose(-1, -2).contiguous()  # C, c, kw, kh (square kernel)
    undo.setattr(proj, "weight", nn.Parameter(transposed, requires_grad=False))
    patch_embed_gemm.PATCH.apply_fn(sam, cfg, undo)


@pytest.mark.parametrize(
    "name, apply_fn, measure",
    [
        ("best_mask_only", _worst_mask_kept, "miou_agreement"),
        ("channels_last", _flipped_convs, "embedding_sqnr_db"),
        ("compile_decoder", _compiled_decoder_off_by_a_bit, "iou_pred_max_abs"),
        ("fold_attn", _fold_grid_transposed, "embedding_sqnr_db"),
        ("gelu_epilogue", _gelu_epilogue_without_bias, "embedding_sqnr_db"),
        ("patch_embed_gemm", _patches_transposed, "embedding_sqnr_db"),
    ],
)
def test_later_patches_declared_gates_fail_when_broken(tiny_ref, name, apply_fn, measure):
    """Each new patch's own declared tolerance, on a broken version of that patch."""
    patch = broken(f"broken_{name}", apply_fn, get_patch(name).tolerance)
    violations, measured = accuracy_violations(tiny_ref, [patch], make_samples(**SAMPLES))
    torch._dynamo.reset()
    assert any(v.startswith(measure) for v in violations), f"{name}: {violations} (measured {measured})"


def _flipped_past_eighth_prompt(sam, cfg, undo: Undo) -> None:
    """A decoder whose packed path mirrors the masks of every prompt past the 8th of a call (a stride bug)."""
    dec = sam.mask_decoder

    def forward(self, *args, **kwargs):
        masks, iou = type(self).forward(self, *args, **kwargs)  # N, 3, h, w; N, 3
        return torch.cat([masks[:8], masks[8:].flip(-1)]), iou

    undo.setattr(dec, "forward", MethodType(forward, dec))


AMG_GRID = {"points_per_side": 8}  # 64 points per image, one decoder call


def test_amg_gate_fails_where_the_point_prompt_gate_cannot_see(tiny_ref):
    """Held to bf16's declared tolerance (AMG bounds derived: 0.86), the broken decoder passes the point-prompt gate
    (at most 3 prompts per call, all below the 8th) and fails both AMG bounds (64 points per call)."""
    patch = broken("flipped", _flipped_past_eighth_prompt, get_patch("bf16").tolerance)
    samples = make_samples(**SAMPLES)
    assert accuracy_violations(tiny_ref, [patch], samples)[0] == []
    violations, measured = amg_violations(tiny_ref, [patch], samples, amg.settings("tiny", AMG_GRID))
    assert any(v.startswith("amg_matched_miou") for v in violations), measured
    assert any(v.startswith("amg_match_share") for v in violations), measured


@pytest.mark.parametrize("name", ["sync_free", "bf16", "sdpa"])
def test_amg_gate_passes_correct_patches(tiny_ref, name):
    violations, measured = amg_violations(
        tiny_ref, [get_patch(name)], make_samples(**SAMPLES), amg.settings("tiny", AMG_GRID)
    )
    assert measured["amg_matched_miou"] is not None and not violations, measured
