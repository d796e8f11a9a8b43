"""bf16 patch: the official predictor paths run on the cast model, undo is exact, it composes with sync_free; the
decoder precision options."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

import samrepro.patches.bf16 as bf16
import samrepro.patches.sync_free  # noqa: F401  (registers sync_free for the composition test)
from samrepro.metrics import sqnr_db
from samrepro.registry import apply_patches
from samrepro.snapshot import global_state, model_state, tensors_equal

POINTS = np.array([[40.0, 50.0], [150.0, 120.0]])  # x, y in original-image pixels
LABELS = np.array([1, 0])


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)


@torch.no_grad()
def torch_outputs(sam, image, features=None, **prompts):
    """predict_torch on a point batch (2 prompts of 2 points each), plus the features (`features`: used instead of
    the image's own)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    if features is not None:
        predictor.features = features
    coords = torch.from_numpy(np.stack([POINTS, POINTS[::-1]])).float().to(predictor.device)
    coords = predictor.transform.apply_coords_torch(coords, image.shape[:2])
    labels = torch.from_numpy(np.stack([LABELS, LABELS])).to(predictor.device)
    masks, iou, low_res = predictor.predict_torch(coords, labels, multimask_output=True, **prompts)
    return predictor.features, masks, iou, low_res


def test_tensors_are_bf16_except_pixel_stats(sam):
    bf16.PATCH.apply(sam)
    for part in (sam.image_encoder, sam.prompt_encoder, sam.mask_decoder):
        assert {t.dtype for t in (*part.parameters(), *part.buffers())} == {torch.bfloat16}
    assert sam.pixel_mean.dtype == sam.pixel_std.dtype == torch.float32


def test_official_predictor_numpy_path(sam, image):
    bf16.PATCH.apply(sam)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    assert predictor.features.dtype == torch.bfloat16
    masks, iou, low_res = predictor.predict(POINTS, LABELS, multimask_output=True)
    assert masks.shape == (3, *image.shape[:2]) and masks.dtype == bool
    assert iou.dtype == np.float32 and low_res.dtype == np.float32 and low_res.shape == (3, 64, 64)
    # box + the previous low-res logits as mask input: the box and mask branches of the prompt encoder
    best = low_res[np.argmax(iou)][None]
    masks, iou, _ = predictor.predict(POINTS, LABELS, box=np.array([10, 20, 200, 150]), mask_input=best)
    assert masks.shape == (3, *image.shape[:2]) and np.isfinite(iou).all()


def test_official_predict_torch_and_amg(sam, image):
    bf16.PATCH.apply(sam)
    features, masks, iou, low_res = torch_outputs(sam, image)
    assert features.dtype == torch.bfloat16
    assert masks.shape == (2, 3, *image.shape[:2]) and masks.dtype == torch.bool
    assert iou.dtype == low_res.dtype == torch.float32  # output_dtype default
    # the automatic mask generator passes float64 point grids
    SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0).generate(image)


def test_output_dtype_bfloat16_and_validation(sam, image):
    bf16.PATCH.apply(sam, bf16.Bf16Config(output_dtype="bfloat16"))
    _, _, iou, low_res = torch_outputs(sam, image)
    assert iou.dtype == low_res.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="output_dtype"):
        bf16.Bf16Config(output_dtype="float16")


def test_fp32_outputs_are_exact_upcasts(sam, image):
    ref_sam = copy.deepcopy(sam)
    bf16.PATCH.apply(sam)
    bf16.PATCH.apply(ref_sam, bf16.Bf16Config(output_dtype="bfloat16"))
    _, _, iou, low_res = torch_outputs(sam, image)
    _, _, iou_bf, low_res_bf = torch_outputs(ref_sam, image)
    assert torch.equal(iou, iou_bf.float()) and torch.equal(low_res, low_res_bf.float())


@pytest.mark.parametrize("coords_fp32", [True, False])
def test_point_encoding_precision(sam, image, coords_fp32):
    bf16.PATCH.apply(sam, bf16.Bf16Config(coords_fp32=coords_fp32))
    pe = sam.prompt_encoder.pe_layer
    coords = torch.tensor([[[100.7, 200.3], [3.5, 250.5]]])  # B, N, 2 in the 256 px input frame
    # upstream fp32 arithmetic on the (bf16-valued) Gaussian matrix, rounded once at the end
    upstream = PositionEmbeddingRandom(pe.positional_encoding_gaussian_matrix.shape[1])
    upstream.positional_encoding_gaussian_matrix.copy_(pe.positional_encoding_gaussian_matrix.float())
    expected = upstream.forward_with_coords(coords, (256, 256)).to(torch.bfloat16)
    expected_dense = upstream((16, 16)).to(torch.bfloat16)
    got, got_dense = pe.forward_with_coords(coords, (256, 256)), pe((16, 16))
    assert got.dtype == got_dense.dtype == torch.bfloat16
    assert (torch.equal(got, expected) and torch.equal(got_dense, expected_dense)) == coords_fp32
    _, masks, iou, _ = torch_outputs(sam, image)  # the whole predictor path runs in both modes
    assert torch.isfinite(iou).all() and masks.shape[1] == 3


@pytest.mark.parametrize("decoder", ["bfloat16", "float16", "tf32"])
def test_undo_restores_exactly(sam, image, decoder):
    twin = copy.deepcopy(sam)
    before_state, before_globals = model_state(sam), global_state()
    bound = {name: m.forward for name, m in sam.named_modules()}
    before = torch_outputs(sam, image)
    handle = bf16.PATCH.apply(sam, bf16.Bf16Config(coords_fp32=False, decoder=decoder))
    torch_outputs(sam, image)
    handle.undo()
    assert model_state(sam) == before_state
    assert tensors_equal(sam, twin) == []
    assert global_state() == before_globals
    assert all(m.forward == bound[name] for name, m in sam.named_modules())
    after = torch_outputs(sam, image)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_composes_with_sync_free(sam, image):
    twin = copy.deepcopy(sam)
    before_state = model_state(sam)
    bf16.PATCH.apply(twin)
    bf16_only = torch_outputs(twin, image)
    with apply_patches(sam, ["sync_free", "bf16"]) as handle:
        assert handle.names == ["bf16", "sync_free"]
        both = torch_outputs(sam, image)
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        predictor.predict(POINTS, LABELS)
    # sync_free is bit-exact, in bf16 too
    assert all(torch.equal(a, b) for a, b in zip(bf16_only, both))
    assert model_state(sam) == before_state


def test_encoder_traces_without_graph_breaks(sam):
    bf16.PATCH.apply(sam)
    x = torch.randn(1, 3, 256, 256)  # fp32, as sam.preprocess gives it
    compiled = torch.compile(sam.image_encoder, backend="eager", fullgraph=True)
    try:
        with torch.no_grad():
            assert torch.equal(compiled(x), sam.image_encoder(x))
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_holds_only_bf16_weights_and_undo_moves_originals_back(fp32_model, image):
    sam = copy.deepcopy(fp32_model).cuda()
    params = list(sam.parameters())
    weight_bytes = sum(p.nbytes for p in params)
    before = torch_outputs(sam, image)
    base = torch.cuda.memory_allocated()
    with bf16.PATCH.apply(sam):
        assert all(p.device.type == "cpu" for p in params)  # the fp32 originals wait on the host
        assert base - torch.cuda.memory_allocated() > 0.4 * weight_bytes  # bf16 halves them (less block rounding)
        _, masks, iou, _ = torch_outputs(sam, image)
        assert masks.is_cuda and iou.dtype == torch.float32
    assert [id(p) for p in sam.parameters()] == [id(p) for p in params] and all(p.is_cuda for p in params)
    assert tensors_equal(sam, fp32_model) == []
    assert all(torch.equal(a, b) for a, b in zip(before, torch_outputs(sam, image)))


DECODER_DTYPES = {"float16": torch.float16, "float32": torch.float32, "tf32": torch.float32}


@pytest.mark.parametrize("decoder", sorted(DECODER_DTYPES))
def test_decoder_precision_options(sam, image, decoder):
    """The encoder is bf16, the prompt encoder and mask decoder are in the chosen dtype; every predictor path runs."""
    bf16.PATCH.apply(sam, bf16.Bf16Config(decoder=decoder))
    assert {p.dtype for p in sam.image_encoder.parameters()} == {torch.bfloat16}
    for part in (sam.prompt_encoder, sam.mask_decoder):
        assert {t.dtype for t in (*part.parameters(), *part.buffers())} == {DECODER_DTYPES[decoder]}
    features, masks, iou, low_res = torch_outputs(sam, image)
    assert features.dtype == torch.bfloat16 and iou.dtype == low_res.dtype == torch.float32
    assert masks.shape == (2, 3, *image.shape[:2]) and torch.isfinite(low_res).all()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    best = predictor.predict(POINTS, LABELS)[2][:1]  # 1, 64, 64 low-res logits as the next mask input
    predictor.predict(POINTS, LABELS, box=np.array([10, 20, 200, 150]), mask_input=best)
    SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0).generate(image)
    with pytest.raises(ValueError, match="decoder"):
        bf16.Bf16Config(decoder="int8")


@torch.no_grad()
def test_fp32_decoder_is_the_official_decoder_on_the_bf16_embeddings(sam, image):
    """decoder="float32" changes nothing after the encoder: the unpatched decoder on the same (upcast) embeddings
    gives the very same masks and scores."""
    twin = copy.deepcopy(sam)
    bf16.PATCH.apply(sam, bf16.Bf16Config(decoder="float32"))
    features, *outputs = torch_outputs(sam, image)
    _, *reference = torch_outputs(twin, image, features=features.float())
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))


@torch.no_grad()
def test_fp16_decoder_is_closer_to_fp32_than_bf16(sam, image):
    """The reason for the option: on the same bf16 embeddings, the fp16 decoder's logits sit nearer the fp32
    decoder's than the bf16 decoder's do (10 mantissa bits against 7; vit_b on an H100: agreement 0.952 -> 0.989)."""
    logits = {}
    for decoder in ("bfloat16", "float16", "float32"):
        twin = copy.deepcopy(sam)
        bf16.PATCH.apply(twin, bf16.Bf16Config(decoder=decoder))
        logits[decoder] = torch_outputs(twin, image)[3]
    fp16, bf = sqnr_db(logits["float32"], logits["float16"]), sqnr_db(logits["float32"], logits["bfloat16"])
    assert fp16 > bf + 12, (fp16, bf)  # 3 more mantissa bits: ~18 dB in theory


def test_tf32_is_on_only_inside_the_decoder_call(sam, image):
    seen = []
    bf16.PATCH.apply(sam, bf16.Bf16Config(decoder="tf32"))
    hook = sam.mask_decoder.transformer.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch_outputs(sam, image)
        assert seen == [(True, True)]
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        hook.remove()
