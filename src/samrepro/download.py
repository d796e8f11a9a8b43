"""Downloads into samrepro's cache: resume from `NAME.partial`, retries, verification, atomic placement.

HTTP goes through `requests`; urllib3's `Retry` retries failed connections and 5xx answers before a body starts,
and a connection dropped while the body streams is resumed here with a Range request from the partial's size.
A verified file gets a sidecar `NAME.verified.json` recording the size, mtime and SHA-256 that were checked;
a cached file whose size or mtime changed since is hashed again before use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

CONNECT_TIMEOUT_S = 20
TIMEOUT_S = 60  # a read that stalls this long counts as a dropped connection
CHUNK = 1 << 20
RETRIES = 5  # per call: connection attempts, 5xx answers, and drops in a row that brought no new bytes
BACKOFF_S = 1.0  # waits between retries grow 2, 4, 8... times this, at most 30 s


class DownloadError(RuntimeError):
    """The transfer failed; the `.partial` file is kept so the next call resumes."""


class ChecksumError(RuntimeError):
    """A complete file does not hash to what was expected."""


@dataclass(frozen=True)
class Expected:
    """What a downloaded file must be: its SHA-256, and its size and MD5 prefix where known."""

    sha256: str
    size: int | None = None
    md5_prefix: str = ""


def cache_root() -> Path:
    """samrepro's cache: `$SAMREPRO_CACHE`, else ~/.cache/samrepro (datasets, checkpoints)."""
    return Path(os.environ.get("SAMREPRO_CACHE") or Path.home() / ".cache" / "samrepro")


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `PATH.lock`, so one process (or thread) at a time works on `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(sibling(path, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_file(
    url: str, final: Path, expected: Expected, progress: bool = True, what: str = "file", keep_corrupt: bool = False
) -> Path:
    """`final`, verified against `expected`, downloading (or resuming) it from `url` when needed.

    A cached file that fails verification is set aside (see `verify`) and downloaded again.

    Args:
        progress: progress on stderr while downloading.
        what: the file's kind in messages ("checkpoint", "archive").
        keep_corrupt: move a file that fails verification to `FINAL.corrupt` instead of deleting it.
    """
    final = Path(final)
    with locked(final):
        if final.exists():
            if _read_record(final) == _record(final, expected):
                return final
            try:
                verify(final, expected, final, keep_corrupt)
                _write_record(final, expected)
                return final
            except ChecksumError as e:
                print(f"samrepro: cached {what} is corrupt, downloading it again: {e}", file=sys.stderr)
        sibling(final, ".verified.json").unlink(missing_ok=True)  # any record left is of a file no longer there
        partial = sibling(final, ".partial")
        download(url, partial, expected.size, progress)
        verify(partial, expected, final, keep_corrupt)
        os.replace(partial, final)  # atomic: the final path only ever holds a verified file
        _write_record(final, expected)  # the rename kept the mtime
        return final


def verify(path: Path, expected: Expected, final: Path | None = None, keep_corrupt: bool = False) -> None:
    """Hash `path`; on a mismatch delete it (or move it to `FINAL.corrupt`), out of reach of loading and resuming."""
    final = path if final is None else final
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            if expected.md5_prefix:
                md5.update(chunk)
            size += len(chunk)
    good = sha.hexdigest() == expected.sha256 and md5.hexdigest().startswith(expected.md5_prefix)
    if good and expected.size in (None, size):
        return
    if keep_corrupt:
        os.replace(path, sibling(final, ".corrupt"))
        fate = f"the file was moved to {sibling(final, '.corrupt')}"
    else:
        path.unlink()
        fate = "the file was deleted"
    want = f" (md5 {expected.md5_prefix}...)" if expected.md5_prefix else ""
    got = f" (md5 {md5.hexdigest()})" if expected.md5_prefix else ""
    want_size = f"{expected.size} bytes, " if expected.size is not None else ""
    raise ChecksumError(
        f"checksum mismatch for {final}: expected {want_size}sha256 {expected.sha256}{want}, "
        f"got {size} bytes, sha256 {sha.hexdigest()}{got}; {fate}"
    )


def _record(path: Path, expected: Expected) -> dict:
    """What the sidecar holds once `path` has been verified against `expected`."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected.sha256}


def _write_record(path: Path, expected: Expected) -> None:
    sibling(path, ".verified.json").write_text(json.dumps(_record(path, expected)))


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(sibling(path, ".verified.json").read_text())
    except (OSError, ValueError):
        return None  # no usable record: the file gets hashed


class _Dropped(Exception):
    """One request ended before the whole file arrived; `partial` holds what came."""


def download(url: str, partial: Path, size: int | None = None, progress: bool = True) -> None:
    """Bring `partial` to the whole content of `url`, resuming from its current size.

    Resumes with `Range: bytes=N-`; a server that answers 200 (ignoring the range) or an unexpected range is
    written from zero. A drop mid-transfer is resumed within this call until `RETRIES` drops in a row brought no
    new bytes; then `DownloadError`, with the partial file kept for the next call. `size`, when known, ends a
    transfer early (a partial already complete) or restarts one that is longer than the file.
    """
    retry = Retry(RETRIES, backoff_factor=BACKOFF_S, backoff_max=30, status_forcelist=(429, 500, 502, 503, 504))
    adapter = HTTPAdapter(max_retries=retry.new(raise_on_status=False))  # the last 5xx answer is reported below
    http = requests.Session()
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    bar = _Progress(partial.name.removesuffix(".partial"), enabled=progress)
    strikes = 0
    try:
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have >= size:
                if have == size:
                    return  # complete already (a stop between download and verification)
                partial.unlink()  # longer than the file: start over
                continue
            try:
                return _attempt(http, url, partial, have, bar)
            except _Dropped as e:
                now = partial.stat().st_size if partial.exists() else 0
                strikes = 1 if now > have else strikes + 1
                if strikes > RETRIES:
                    raise DownloadError(f"download of {url} failed: {e}{_kept(partial, now)}") from None
                time.sleep(min(BACKOFF_S * 2**strikes, 30))
    finally:
        bar.close()
        http.close()


def _attempt(http: requests.Session, url: str, partial: Path, have: int, bar: _Progress) -> None:
    """One GET from byte `have`, appended to `partial`; `_Dropped` when it ends early or must start over."""
    headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = http.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, TIMEOUT_S))
    except requests.RequestException as e:  # retries are spent
        raise DownloadError(f"download of {url} failed: {_reason(e)}{_kept(partial, have)}") from None
    with response:
        status, content_range = response.status_code, response.headers.get("Content-Range") or ""
        if status == 416 and have:  # the range starts at or past the end of the remote file
            if content_range == f"bytes */{have}":
                return  # the partial is complete already
            partial.unlink()
            raise _Dropped("the partial file is longer than the remote file; starting over")
        if status == 206 and not content_range.startswith(f"bytes {have}-"):
            partial.unlink()
            raise _Dropped(f"asked for bytes {have}-, got {content_range!r}; starting over")
        if status not in (200, 206):
            raise DownloadError(f"download of {url} failed: HTTP {status} {response.reason}{_kept(partial, have)}")
        if status == 200:
            have = 0  # the server ignored the range and sends the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar.start(have, total)
        done = have
        with open(partial, "ab" if have else "wb") as f:
            try:
                for chunk in response.raw.stream(CHUNK, decode_content=False):  # hands over a short last read
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done)
            except urllib3.exceptions.HTTPError as e:
                raise _Dropped(_reason(e)) from None
    if total is not None and done < total:
        raise _Dropped(f"connection closed at byte {done} of {total}")


def _kept(partial: Path, done: int) -> str:
    return f" ({done} bytes so far, kept in {partial}; run again to resume)" if done else " (0 bytes so far)"


def _reason(e: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, on one line (e.g. "Connection refused")."""
    while True:
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in e.args if isinstance(a, BaseException)), None) or e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return text.replace("\n", " ")


class _Progress:
    """Transfer progress on stderr: a rich bar on a terminal, else a plain line every 10 s and one at the end."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.tty = name, enabled, enabled and sys.stderr.isatty()
        self.bar = self.task = self.total = None
        self.first = self.done = self.moved = 0  # resumed at, bytes now, bytes received in this call
        self.t0 = self.shown = time.monotonic()
        self.started = False

    def start(self, have: int, total: int | None) -> None:
        """A request begins: `have` bytes kept (0 after a restart), `total` expected when the server says."""
        if not self.started:
            self.first, self.started = have, True
        self.done, self.total = have, total
        if self.tty and self.bar is None:
            from rich.console import Console  # imported only when a terminal shows a download
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            self.bar = Progress("{task.description}", *columns, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=total, completed=have)
        elif self.bar is not None:
            self.bar.reset(self.task, total=total, completed=have)

    def update(self, done: int) -> None:
        self.moved += done - self.done
        self.done = done
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.enabled and time.monotonic() - self.shown >= 10.0:  # logs get a line every 10 s
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and self.started:
            self._line()

    def _line(self) -> None:
        self.shown = time.monotonic()
        mb = 1e6  # decimal units, as the terminal bar shows them
        size = f"{self.done / mb:.1f}"
        size += f"/{self.total / mb:.1f} MB {100 * self.done / self.total:.0f}%" if self.total else " MB"
        rate = self.moved / mb / max(self.shown - self.t0, 1e-6)
        resumed = f" (resumed at {self.first / mb:.1f} MB)" if self.first else ""
        print(f"{self.name}: {size} {rate:.1f} MB/s{resumed}", file=sys.stderr, flush=True)
