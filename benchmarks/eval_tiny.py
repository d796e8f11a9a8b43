"""Ground-truth mIoU of the (shipped) tiny model on the held-out synthetic validation split (the runner's protocol).

python benchmarks/eval_tiny.py --images 500
"""

import argparse
from pathlib import Path

from samrepro import load_model, workload
from samrepro.data import load_dataset
from samrepro.equivalence import gt_miou
from samrepro.models import fp32_reference_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path("results/data"))
    parser.add_argument("--weights", type=Path, help="a tiny checkpoint (default: the shipped, hash-checked weights)")
    args = parser.parse_args()
    fp32_reference_mode()
    sam = load_model("tiny", weights=args.weights)
    weights = sam.weights_label
    samples, data = load_dataset("synthetic", args.images, args.data_dir)
    preds = []
    for i in range(0, len(samples), args.batch_size):
        preds += workload.run(sam, samples[i : i + args.batch_size])[1]
    prompts = sum(s.num_prompts for s in samples)
    print(f"{weights}  {data}  {prompts} prompts  mIoU {gt_miou(preds, samples):.4f}")


if __name__ == "__main__":
    main()
