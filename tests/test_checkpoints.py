"""Checkpoint download against a loopback HTTP server: resume, restart, verification, atomic placement."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from samrepro import checkpoints, download
from samrepro.checkpoints import CHECKPOINTS, Checkpoint, ChecksumError, DownloadError, fetch
from tests.servers import loopback_http

BODY = random.Random(0).randbytes(300_000)
NAME = f"sam_vit_b_{hashlib.md5(BODY).hexdigest()[:6]}.pth"  # named as Meta names them: md5 prefix


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours `bytes=N-` ranges when `server.ranges`; cuts paths in `server.cut` short once."""

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append(self.headers.get("Range"))
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if srv.ranges and match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.path.lstrip("/") in srv.cut:
            srv.cut.discard(self.path.lstrip("/"))
            payload = payload[: len(payload) // 2]  # then the connection closes: a dropped transfer
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    with loopback_http(Handler) as srv:
        srv.files, srv.ranges, srv.cut, srv.seen = {NAME: BODY}, True, set(), []
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{NAME}"
        yield srv


@pytest.fixture(autouse=True)
def table(monkeypatch):
    """vit_b points at the generated file; retries do not wait."""
    monkeypatch.setitem(CHECKPOINTS, "vit_b", Checkpoint(NAME, hashlib.sha256(BODY).hexdigest()))
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


def assert_nothing_loadable(cache: Path) -> None:
    assert not (cache / NAME).exists() and not (cache / f"{NAME}.verified.json").exists()


def test_table_names_carry_md5_prefix():
    for model, ckpt in checkpoints.CHECKPOINTS.items():
        if model != "vit_b":  # the real entry is patched out by the fixture
            assert ckpt.url == f"https://dl.fbaipublicfiles.com/segment_anything/{ckpt.filename}"
            assert re.fullmatch(rf"sam_{model}_[0-9a-f]{{6}}\.pth", ckpt.filename) and len(ckpt.sha256) == 64


def test_good_file_then_cache_without_network(server, tmp_path, capsys):
    path = fetch("vit_b", tmp_path, url=server.url)
    assert path == tmp_path / NAME and path.read_bytes() == BODY
    assert not (tmp_path / f"{NAME}.partial").exists()
    assert "100%" in capsys.readouterr().err
    again = fetch("vit_b", tmp_path, url="http://127.0.0.1:9/unreachable")
    assert again == path and len(server.seen) == 1


def test_cached_file_trusted_by_its_record(server, tmp_path, monkeypatch):
    fetch("vit_b", tmp_path, url=server.url, progress=False)
    monkeypatch.setattr(download, "verify", lambda *a: pytest.fail("hashed although size and mtime match"))
    assert fetch("vit_b", tmp_path, url=server.url) == tmp_path / NAME


def test_dropped_connection_then_resume(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 0)  # no resume within the call: the next call resumes
    server.cut.add(NAME)
    with pytest.raises(DownloadError) as e:
        fetch("vit_b", tmp_path, url=server.url, progress=False)
    half = len(BODY) // 2
    assert str(e.value).count("\n") == 0 and server.url in str(e.value) and f"{half} bytes so far" in str(e.value)
    assert (tmp_path / f"{NAME}.partial").stat().st_size == half
    assert_nothing_loadable(tmp_path)
    assert fetch("vit_b", tmp_path, url=server.url, progress=False).read_bytes() == BODY
    assert server.seen == [None, f"bytes={half}-"]


def test_server_without_range_restarts_from_zero(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 0)
    server.ranges = False
    server.cut.add(NAME)
    with pytest.raises(DownloadError):
        fetch("vit_b", tmp_path, url=server.url, progress=False)
    assert_nothing_loadable(tmp_path)
    assert fetch("vit_b", tmp_path, url=server.url, progress=False).read_bytes() == BODY
    assert server.seen[-1] is not None  # asked for a range, got the whole file (200), wrote it from zero


@pytest.mark.parametrize("extra, requests", [(7, 2), (0, 1)])  # longer than remote: restart; exactly complete: keep
def test_partial_at_or_past_the_end(server, tmp_path, extra, requests):
    (tmp_path / f"{NAME}.partial").write_bytes(BODY + b"x" * extra)
    assert fetch("vit_b", tmp_path, url=server.url, progress=False).read_bytes() == BODY
    assert len(server.seen) == requests


def test_wrong_hash(server, tmp_path):
    server.files[NAME] = BODY[::-1]
    with pytest.raises(ChecksumError) as e:
        fetch("vit_b", tmp_path, url=server.url, progress=False)
    message = str(e.value)
    assert message.count("\n") == 0 and str(tmp_path / NAME) in message
    assert CHECKPOINTS["vit_b"].sha256 in message and hashlib.sha256(BODY[::-1]).hexdigest() in message
    assert_nothing_loadable(tmp_path)
    assert not (tmp_path / f"{NAME}.partial").exists()  # a bad file is never resumed
    assert (tmp_path / f"{NAME}.corrupt").read_bytes() == BODY[::-1]


def test_http_404(server, tmp_path):
    url = server.url.replace(NAME, "missing.pth")
    with pytest.raises(DownloadError, match=re.escape(f"{url} failed: HTTP 404")):
        fetch("vit_b", tmp_path, url=url, progress=False)
    assert_nothing_loadable(tmp_path)


def test_connection_refused(tmp_path):
    with pytest.raises(DownloadError, match="refused"):
        fetch("vit_b", tmp_path, url="http://127.0.0.1:9/x.pth", progress=False)
    assert_nothing_loadable(tmp_path)


def test_corrupt_cache_is_set_aside_and_downloaded_again(server, tmp_path, capsys):
    path = fetch("vit_b", tmp_path, url=server.url, progress=False)
    mtime = path.stat().st_mtime_ns
    path.write_bytes(BODY[:-1] + b"\0")  # same size: only the mtime (forced to differ) gives it away
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert fetch("vit_b", tmp_path, url=server.url, progress=False).read_bytes() == BODY
    assert len(server.seen) == 2 and "cached checkpoint is corrupt" in capsys.readouterr().err
    assert (tmp_path / f"{NAME}.corrupt").read_bytes()[-1:] == b"\0"


def test_unknown_model_and_default_cache(monkeypatch, tmp_path, server):
    with pytest.raises(ValueError, match="no official checkpoint for 'tiny'"):
        fetch("tiny", tmp_path)
    monkeypatch.setenv("SAMREPRO_CACHE", str(tmp_path))
    fetch("vit_b", url=server.url, progress=False)
    assert checkpoints.resolve("vit_b") == tmp_path / "checkpoints" / NAME


def test_concurrent_fetches_download_once(server, tmp_path):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch("vit_b", tmp_path, url=server.url, progress=False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / NAME] * 3 and len(server.seen) == 1
