"""Build SAM models through segment_anything's registry, plus the embedded `tiny` config."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

MODELS = ("tiny", "vit_b", "vit_l", "vit_h")
# The initialisers that draw random values while SAM's layers are built. Every value they draw is then overwritten,
# by `randomize` or a checkpoint, so load_model skips them; LayerNorm's ones and zeros are kept.
DRAWING_INITS = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_")
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")  # what every SAM state dict key starts with
TINY_WEIGHTS = Path(__file__).parent / "weights" / "sam_tiny.safetensors"


def build_tiny() -> Sam:
    """A ~2 M parameter SAM from the official classes: 256 px input, 16x16 tokens."""
    img_size, patch, embed = 256, 16, 128
    tokens = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=embed,
            depth=6,
            num_heads=2,  # head dim 64, as in vit_b/vit_l
            mlp_ratio=4,
            out_chans=embed,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=6,  # 16 tokens pad to 18: exercises the padded-window path
            global_attn_indexes=(2, 5),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed,
            image_embedding_size=(tokens, tokens),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=512, num_heads=4),
            transformer_dim=embed,
            iou_head_depth=3,
            iou_head_hidden_dim=128,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@contextlib.contextmanager
def drawing_inits_skipped() -> Iterator[None]:
    """While building a model whose drawn values will all be replaced: vit_h builds in 0.05 s instead of 4.9 s (CPU)."""
    with contextlib.ExitStack() as stack:
        for fn in DRAWING_INITS:
            stack.enter_context(mock.patch.object(nn.init, fn, lambda tensor, *args, **kwargs: tensor))
        yield


def build(name: str) -> Sam:
    """An untrained model of the named architecture (official init)."""
    if name == "tiny":
        return build_tiny()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return sam_model_registry[name]().eval()


@torch.no_grad()
def randomize(sam: Sam, seed: int = 0) -> Sam:
    """Seeded random weights; the zero-initialised positional tables get noise too,
    so the relative-position paths that patches rewrite are actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sam.named_parameters():
        if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        elif p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1]) ** 0.5)
        elif not name.endswith("weight"):  # biases; norm weights stay 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    gauss = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    gauss.copy_(torch.randn(gauss.shape, generator=gen))
    return sam


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_tiny_weights() -> Path:
    """The shipped tiny weights, after checking their SHA-256 against the provenance JSON beside them."""
    meta = TINY_WEIGHTS.with_suffix(".json")
    if not TINY_WEIGHTS.exists() or not meta.exists():
        raise FileNotFoundError(f"the shipped tiny weights are missing: {TINY_WEIGHTS} (+ .json)")
    expected, actual = json.loads(meta.read_text())["sha256"], sha256(TINY_WEIGHTS)
    if actual != expected:
        raise ValueError(f"{TINY_WEIGHTS}: sha256 {actual} does not match {expected} recorded in {meta.name}")
    return TINY_WEIGHTS


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(name: str, device: str = "cpu", weights: str | Path | None = None, seed: int = 0) -> Sam:
    """The model in eval mode on `device`; `sam.weights_label` says which weights it holds.

    Args:
        weights: "random" (seeded, labelled as such), "official" (Meta's checkpoint, downloaded into the
            cache and verified), a checkpoint path, or None:
            the shipped trained weights for `tiny`; other models need an explicit choice.
    """
    with drawing_inits_skipped():
        sam = build(name)  # every drawn value is replaced below: seeded ones, or a checkpoint's (loaded strictly)
    if weights is None:
        if name != "tiny":
            raise ValueError(f"{name} needs weights: a checkpoint path or 'random'")
        weights = verified_tiny_weights()
    if weights == "official":
        from samrepro.checkpoints import resolve

        weights = resolve(name)
    if weights == "random":
        randomize(sam, seed)
        label = f"random(seed={seed})"
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        sam.load_state_dict(load_state(path))
        label = f"{path.name} sha256:{sha256(path)[:12]}"
    sam.weights_label = label  # e.g. "random(seed=0)" or "sam_vit_b_01ec64.pth sha256:ec2df6273261"
    return sam.to(device).eval()


def fp32_reference_mode() -> None:
    """TF32 off everywhere: the baseline every tolerance is measured against."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def check_checkpoint(model: str, path: Path) -> None:
    """The checkpoint must load strictly into `model`; checked from its keys and shapes only."""
    try:
        found = checkpoint_shapes(path)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read as a state dict ({type(e).__name__})") from None
    if not isinstance(found, dict):
        raise ValueError(f"checkpoint {path} is not a SAM state dict: {found}")
    if not any(k.startswith(SAM_PARTS) for k in found):
        raise ValueError(f"checkpoint {path} is not a SAM state dict: no key starts with {', '.join(SAM_PARTS)}")
    if problem := _mismatch(found, _model_shapes(model)):
        fits = [m for m in MODELS if m != model and not _mismatch(found, _model_shapes(m))]
        raise ValueError(
            f"checkpoint {path} does not fit {model}" + (f" (it is {fits[0]}'s)" if fits else "") + f": {problem}"
        )


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | str:
    """Key -> shape of a state dict file, without reading tensor data; or what the file holds instead."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="meta", weights_only=True)
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"not every value is a tensor (keys: {', '.join(map(str, list(state)[:5]))})"
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.cache
def _model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes without memory or init time, even for vit_h
        return {k: tuple(v.shape) for k, v in build(model).state_dict().items()}


def _mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why `found` would not load strictly where `expected` is needed, in one line; None if it would."""
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k} {list(found[k])} vs {list(expected[k])} expected")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]}")
    return "; ".join(parts) or None
