"""The training report: the history as JSON and a chart of training loss and validation mIoU."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(history: dict, report_dir: Path) -> None:
    """history.json and a PNG of training loss and validation mIoU over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "history.json").write_text(json.dumps(history, indent=1))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train, val = history["train"], history["val"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in val], [r["miou"] for r in val], "o-", color="tab:orange", label="val mIoU")
    ax2.set_ylabel("val mIoU (center point, best of 3)", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title("tiny SAM on the synthetic set")
    fig.tight_layout()
    fig.savefig(report_dir / "training.png", dpi=120)
    plt.close(fig)
