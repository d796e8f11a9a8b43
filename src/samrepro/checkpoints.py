"""Official SAM checkpoints: downloaded into the cache by `samrepro.download` (resume, verify, atomic placement).

The 6 hex digits in each official file name are the start of the file's **MD5** (not SHA-256, as often assumed);
the table also pins the full SHA-256 of each file as published by independent users of these files. A file counts
as verified only when both match. Verified cache entries get a sidecar `NAME.verified.json` recording the size,
mtime and SHA-256 that were checked; a cached file whose size or mtime changed since is hashed again before use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from samrepro.download import ChecksumError, DownloadError, Expected, cache_root, fetch_file

__all__ = ["CHECKPOINTS", "Checkpoint", "ChecksumError", "DownloadError", "cache_root", "fetch", "resolve"]

HOST = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint: where it lives and what it must hash to."""

    filename: str  # sam_<model>_<first 6 hex of the MD5>.pth
    sha256: str
    size: int | None = None  # bytes

    @property
    def url(self) -> str:
        return f"{HOST}/{self.filename}"

    @property
    def md5_prefix(self) -> str:
        return re.search(r"_([0-9a-f]{6})\.", self.filename).group(1)


CHECKPOINTS = {  # sizes in bytes, as published beside the SHA-256 by the same independent users
    "vit_b": Checkpoint(
        "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383
    ),
    "vit_l": Checkpoint(
        "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607
    ),
    "vit_h": Checkpoint(
        "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879
    ),
}


def default_cache_dir() -> Path:
    return cache_root() / "checkpoints"


def resolve(model: str, cache_dir: Path | None = None) -> Path:
    """What `--weights official` means: the verified cached checkpoint, downloaded first if missing."""
    return fetch(model, cache_dir)


def fetch(model: str, cache_dir: Path | None = None, url: str | None = None, progress: bool = True) -> Path:
    """The verified checkpoint file of `model` in the cache, downloading (or resuming) it when needed.

    A cached file that fails verification is moved aside to `NAME.corrupt` and downloaded again.

    Args:
        url: download from here instead of Meta's host (a mirror, or a test server).
        progress: progress on stderr while downloading.
    """
    if model not in CHECKPOINTS:
        raise ValueError(f"no official checkpoint for {model!r}; official: {', '.join(CHECKPOINTS)}")
    ckpt = CHECKPOINTS[model]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    expected = Expected(ckpt.sha256, ckpt.size, ckpt.md5_prefix)
    return fetch_file(url or ckpt.url, folder / ckpt.filename, expected, progress, "checkpoint", keep_corrupt=True)
