"""Which part of the bf16 model loses agreement with fp32: the encoder, or the prompt encoder and mask decoder?

Runs the fp32 and the bf16 image encoder once, then the decoder in several precisions on those embeddings, and
prints agreement mIoU (best of 3 by predicted IoU, threshold 0) against the fp32 model's masks. On a 2-core CPU
(~4 min; reports/2026-11-21-h100-decoder-precision-and-bs1-waterfalls):
python benchmarks/agreement_sources.py --model vit_b --images 4
"""

from __future__ import annotations

import argparse
import copy
import json
from types import MethodType

import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from samrepro import models, workload
from samrepro.data.noise import noise_samples
from samrepro.metrics import mask_iou, sqnr_db
from samrepro.patches import bf16

DECODER_PARTS = ("transformer", "output_upscaling", "output_hypernetworks_mlps", "iou_prediction_head")


def decode(
    sam: Sam, features: torch.Tensor, samples: list[workload.Sample], sizes: tuple[list, list]
) -> list[workload.Prediction]:
    """`predict_torch` per image on given embeddings (B, C, h, w); `sizes`: input and original sizes per image."""
    cpu = torch.device("cpu")
    input_sizes, original_sizes = sizes
    predictor = SamPredictor(sam)
    return [
        workload.predict_image(
            predictor,
            features[i : i + 1],
            input_sizes[i],
            original_sizes[i],
            workload.prompt_tensors(predictor, s, cpu),
        )
        for i, s in enumerate(samples)
    ]


def fp32_island(module: torch.nn.Module) -> None:
    """Run `module` in fp32 inside a 16-bit decoder: inputs upcast, outputs cast back to bf16."""
    module.float()

    def forward(self, *args, **kwargs):
        up = {k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out = type(self).forward(self, *(a.float() if torch.is_tensor(a) else a for a in args), **up)
        return tuple(o.bfloat16() for o in out) if isinstance(out, tuple) else out.bfloat16()

    for m in module if isinstance(module, torch.nn.ModuleList) else [module]:
        m.forward = MethodType(forward, m)


def agreement(ref: list[workload.Prediction], out: list[workload.Prediction]) -> float:
    return torch.cat([mask_iou(r.best, o.best) for r, o in zip(ref, out)]).mean().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--images", type=int, default=4, help="1024 px noise images, 8 single-point prompts each")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    models.fp32_reference_mode()
    sam = models.randomize(models.build(args.model))
    samples = noise_samples(args.images)
    emb32, ref = workload.run(sam, samples)

    def patched(decoder: str, islands: bool = False) -> Sam:
        twin = copy.deepcopy(sam)
        bf16.PATCH.apply(twin, bf16.Bf16Config(decoder=decoder))
        for name in DECODER_PARTS if islands else ():
            fp32_island(getattr(twin.mask_decoder, name))
        return twin

    saf = patched("bfloat16")
    emb16, _ = workload.run(saf, samples)
    sizes = workload.preprocess(sam, samples, torch.device("cpu"))[1:]
    rows = {
        "bf16 encoder, bf16 decoder (SAF)": (saf, emb16),
        "fp32 encoder, bf16 decoder": (saf, emb32),
        "bf16 encoder, bf16 decoder with fp32 submodules": (patched("bfloat16", islands=True), emb16),
        "bf16 encoder, fp16 decoder": (patched("float16"), emb16),
        "bf16 encoder, fp32 decoder": (patched("float32"), emb16),
    }
    result = {"model": args.model, "images": args.images, "embedding_sqnr_db": sqnr_db(emb32, emb16.float())}
    print(f"{args.model}, {args.images} images x 8 prompts, bf16 embeddings {result['embedding_sqnr_db']:.1f} dB")
    for label, (model, features) in rows.items():
        result[label] = agreement(ref, decode(model, features, samples, sizes))
        print(f"{label:<50} agreement {result[label]:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
