"""Official SAM checkpoints: download into a cache with resume, verify, move into place atomically.

The 6 hex digits in each official file name are the start of the file's **MD5** (not SHA-256, as often assumed);
the table also pins the full SHA-256 of each file as published by independent users of these files. A file counts
as verified only when both match. Verified cache entries get a sidecar `NAME.verified.json` recording the size,
mtime and SHA-256 that were checked; a cached file whose size or mtime changed since is hashed again before use.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "https://dl.fbaipublicfiles.com/segment_anything"
TIMEOUT_S = 60  # a read that stalls this long counts as a dropped connection
CHUNK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint: where it lives and what it must hash to."""

    filename: str  # sam_<model>_<first 6 hex of the MD5>.pth
    sha256: str

    @property
    def url(self) -> str:
        return f"{HOST}/{self.filename}"

    @property
    def md5_prefix(self) -> str:
        return re.search(r"_([0-9a-f]{6})\.", self.filename).group(1)


CHECKPOINTS = {
    "vit_b": Checkpoint("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": Checkpoint("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": Checkpoint("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


class DownloadError(RuntimeError):
    """The transfer failed; the `.partial` file is kept so the next call resumes."""


class ChecksumError(RuntimeError):
    """A complete file does not hash to what its checkpoint entry expects."""


def cache_root() -> Path:
    """samrepro's cache: `$SAMREPRO_CACHE`, else ~/.cache/samrepro (datasets, checkpoints)."""
    return Path(os.environ.get("SAMREPRO_CACHE") or Path.home() / ".cache" / "samrepro")


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
        progress: a progress line on stderr while downloading.
    """
    if model not in CHECKPOINTS:
        raise ValueError(f"no official checkpoint for {model!r}; official: {', '.join(CHECKPOINTS)}")
    ckpt = CHECKPOINTS[model]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / ckpt.filename
    with open(_sibling(final, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per file across processes
        if final.exists():
            if _read_record(final) == _record(final, ckpt):
                return final
            try:
                _verify(final, ckpt, final)
                _sidecar(final).write_text(json.dumps(_record(final, ckpt)))
                return final
            except ChecksumError as e:
                print(f"samrepro: cached checkpoint is corrupt, downloading it again: {e}", file=sys.stderr)
        _sidecar(final).unlink(missing_ok=True)  # any record left is of a file no longer there
        partial = _sibling(final, ".partial")
        _download(url or ckpt.url, partial, progress)
        _verify(partial, ckpt, final)
        os.replace(partial, final)  # atomic: the final path only ever holds a verified file
        _sidecar(final).write_text(json.dumps(_record(final, ckpt)))  # the rename kept the mtime
        return final


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _record(path: Path, ckpt: Checkpoint) -> dict:
    """What the sidecar holds once `path` has been verified against `ckpt`."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": ckpt.sha256}


def _sidecar(path: Path) -> Path:
    return _sibling(path, ".verified.json")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None  # no usable record: the file gets hashed


def _verify(path: Path, ckpt: Checkpoint, final: Path) -> None:
    """Hash `path`; on a mismatch move it to `FINAL.corrupt`, out of reach of loading and resuming."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
    if sha.hexdigest() != ckpt.sha256 or not md5.hexdigest().startswith(ckpt.md5_prefix):
        corrupt = _sibling(final, ".corrupt")
        os.replace(path, corrupt)
        raise ChecksumError(
            f"checksum mismatch for {final}: expected sha256 {ckpt.sha256} (md5 {ckpt.md5_prefix}...), "
            f"got sha256 {sha.hexdigest()} (md5 {md5.hexdigest()}); the file was moved to {corrupt}"
        )


def _download(url: str, partial: Path, progress: bool) -> None:
    """Append the rest of `url` to `partial`: Range resume on 206, from zero on 200 or a partial too long."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # range starts at or past the end of the remote file
            if e.headers.get("Content-Range") == f"bytes */{have}":
                return  # the partial is already complete (a crash between download and verification)
            partial.unlink()
            return _download(url, partial, progress)
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}{_kept(partial, have)}") from None
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"download of {url} failed: {_reason(e)}{_kept(partial, have)}") from None
    with response:
        if response.status == 206 and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            partial.unlink()  # a range we did not ask for: start over
            return _download(url, partial, progress)
        if response.status != 206:
            have = 0  # the server ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = _Progress(partial.name.removesuffix(".partial"), have, total) if progress else None
        done = have
        with open(partial, "ab" if have else "wb") as f:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if bar:
                        bar.update(done)
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"download of {url} failed: {_reason(e)}{_kept(partial, done)}") from None
            finally:
                if bar:
                    bar.close(done)
    if total is not None and done < total:
        reason = f"connection closed at byte {done} of {total}"
        raise DownloadError(f"download of {url} failed: {reason}{_kept(partial, done)}")


def _kept(partial: Path, done: int) -> str:
    return f" ({done} bytes so far, kept in {partial}; run again to resume)" if done else " (0 bytes so far)"


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    return str(reason).replace("\n", " ")


class _Progress:
    """A one-line progress report on stderr: bytes, percent, rate; redrawn in place on a terminal."""

    def __init__(self, name: str, start: int, total: int | None):
        self.name, self.start, self.total = name, start, total
        self.tty = sys.stderr.isatty()
        self.t0 = self.shown = time.monotonic()

    def update(self, done: int) -> None:
        if time.monotonic() - self.shown >= (0.2 if self.tty else 10.0):  # logs get a line every 10 s
            self._show(done, "\r" if self.tty else "\n")

    def close(self, done: int) -> None:
        self._show(done, "\n")

    def _show(self, done: int, end: str) -> None:
        self.shown = time.monotonic()
        mib = 2**20
        size = f"{done / mib:.1f}"
        if self.total:
            size += f"/{self.total / mib:.1f} MiB {100 * done / self.total:.0f}%"
        else:
            size += " MiB"
        rate = (done - self.start) / mib / max(self.shown - self.t0, 1e-6)
        resumed = f" (resumed at {self.start / mib:.1f} MiB)" if self.start else ""
        start = "\r" if self.tty else ""
        print(f"{start}{self.name}: {size} {rate:.1f} MiB/s{resumed}", end=end, file=sys.stderr, flush=True)
