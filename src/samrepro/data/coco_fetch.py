"""COCO val2017 in samrepro's cache: two archives downloaded, verified and extracted into `<cache>/coco/`.

The result is the layout `coco:DIR` reads: `val2017/` (5000 images) and `annotations/instances_val2017.json`
(the only member taken from the annotations archive). The archives stay beside them, verified, so a lost folder
is extracted again without a download.

The COCO site publishes no checksums. The sizes and SHA-256 below are the ones TensorFlow Datasets' checksum list
records for these URLs (other public projects pin the same values). The host serves plain HTTP, so these hashes
are what vouches for the bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from samrepro.download import Expected, cache_root, fetch_file, locked

BASE_URL = "http://images.cocodataset.org"
URL_ENV = "SAMREPRO_COCO_URL"  # another base URL (a mirror, or a test server) laid out like BASE_URL
IMAGES = "val2017"
ANNOTATIONS = "annotations/instances_val2017.json"


@dataclass(frozen=True)
class Archive:
    path: str  # under the base URL
    size: int
    sha256: str
    member: str  # the folder or file taken from it

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


ARCHIVES = (
    Archive(
        "zips/val2017.zip",
        815_585_330,
        "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
        IMAGES,
    ),
    Archive(
        "annotations/annotations_trainval2017.zip",
        252_907_541,
        "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        ANNOTATIONS,
    ),
)


class CocoNotFetched(FileNotFoundError):
    """COCO val2017 has not been fetched into the cache."""


def default_dir() -> Path:
    return cache_root() / "coco"


def coco_root(cache_dir: Path | None = None) -> Path:
    """The cached COCO folder (holding val2017/ and annotations/instances_val2017.json), if it has been fetched."""
    root = Path(cache_dir) if cache_dir is not None else default_dir()
    if not (root / IMAGES).is_dir() or not (root / ANNOTATIONS).is_file():
        raise CocoNotFetched(f"COCO val2017 is not in the cache ({root}); run `samrepro data fetch coco`")
    return root


def fetch_coco(cache_dir: Path | None = None, base_url: str | None = None, progress: bool = True) -> Path:
    """Download, verify and extract COCO val2017 into `cache_dir` (default `<cache>/coco`); returns `coco_root`.

    Pieces already in place are kept: a ready folder returns at once, without the network.
    A failed download keeps its `.partial` file, and the next call resumes it.

    Args:
        base_url: where the archives are (default `$SAMREPRO_COCO_URL`, else the COCO host).
    """
    root = Path(cache_dir) if cache_dir is not None else default_dir()
    base = (base_url or os.environ.get(URL_ENV) or BASE_URL).rstrip("/")
    with locked(root / "coco"):  # one fetch at a time: the extraction too
        for stale in root.glob(".extract-*"):  # left by a process that stopped while extracting
            shutil.rmtree(stale, ignore_errors=True)
        for archive in ARCHIVES:
            if not (root / archive.member).exists():
                expected = Expected(archive.sha256, archive.size)
                path = fetch_file(f"{base}/{archive.path}", root / archive.filename, expected, progress, "archive")
                _extract(path, archive.member, root, progress)
    return coco_root(root)


def _extract(archive: Path, member: str, root: Path, progress: bool) -> None:
    """`member` (a folder or a file) of `archive` to `root/member`: into a temporary folder, then one rename."""
    if progress:
        print(f"samrepro: extracting {member} from {archive.name}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.startswith(member + "/")]
            if not names:
                raise ValueError(f"{archive} holds no {member}")
            z.extractall(tmp, members=names)
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / member, root / member)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
