"""The shared downloader against a loopback HTTP server: retries, resume within a call, size checks, progress."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import struct
import sys
from http.server import BaseHTTPRequestHandler

import pytest

from samrepro import download
from samrepro.download import ChecksumError, DownloadError, Expected, fetch_file
from tests.servers import loopback_http

BODY = random.Random(1).randbytes(200_000)


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files` by path, with `bytes=N-` ranges unless `server.ranges` is off.

    `server.fail[path]` answers that many requests with 503 first; `server.cut[path] = (n, fraction, reset)` sends
    only that fraction of the next n bodies, then closes the connection (with a TCP reset when `reset`).
    """

    def do_GET(self) -> None:
        srv, path = self.server, self.path.lstrip("/")
        srv.seen.append((path, self.headers.get("Range")))
        body = srv.files.get(path)
        if body is None:
            self.send_error(404)
            return
        if srv.fail.get(path):
            srv.fail[path] -= 1
            self.send_error(503)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if srv.ranges and match and int(match.group(1)) < len(body):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        count, fraction, reset = srv.cut.get(path, (0, 1.0, False))
        if count:
            srv.cut[path] = (count - 1, fraction, reset)
            payload = payload[: int(len(payload) * fraction)]
        self.wfile.write(payload)
        if count:
            self.wfile.flush()
            if reset:  # linger 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    with loopback_http(Handler) as srv:
        srv.files, srv.ranges, srv.fail, srv.cut, srv.seen = {"f.bin": BODY}, True, {}, {}, []
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
        yield srv


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


GOOD = Expected(hashlib.sha256(BODY).hexdigest(), len(BODY))


@pytest.mark.parametrize("reset", [False, True])
def test_drop_mid_stream_is_resumed_in_the_same_call(server, tmp_path, reset):
    server.cut["f.bin"] = (1, 0.5, reset)
    path = fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False)
    assert path.read_bytes() == BODY and not (tmp_path / "f.bin.partial").exists()
    assert server.seen == [("f.bin", None), ("f.bin", f"bytes={len(BODY) // 2}-")]


def test_drops_that_bring_nothing_give_up_and_keep_the_partial(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 2)
    quarter = len(BODY) // 4
    (tmp_path / "f.bin.partial").write_bytes(BODY[:quarter])
    server.cut["f.bin"] = (10, 0.0, False)  # headers, then the connection closes before any byte
    with pytest.raises(DownloadError, match=f"{quarter} bytes so far, kept in .*f.bin.partial; run again") as e:
        fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False)
    assert "\n" not in str(e.value) and len(server.seen) == 3  # the first try and 2 retries, all without bytes
    assert (tmp_path / "f.bin.partial").read_bytes() == BODY[:quarter] and not (tmp_path / "f.bin").exists()
    server.cut.clear()
    assert fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False).read_bytes() == BODY
    assert server.seen[-1] == ("f.bin", f"bytes={quarter}-")


def test_server_errors_are_retried(server, tmp_path):
    server.fail["f.bin"] = 2
    assert fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False).read_bytes() == BODY
    assert len(server.seen) == 3


def test_server_errors_past_the_retries(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 1)
    server.fail["f.bin"] = 5
    with pytest.raises(DownloadError, match="failed: HTTP 503"):
        fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False)
    assert len(server.seen) == 2 and not (tmp_path / "f.bin").exists()


def test_range_ignored_restarts_from_zero_in_the_same_call(server, tmp_path):
    server.ranges = False
    server.cut["f.bin"] = (1, 0.5, False)
    assert fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False).read_bytes() == BODY
    assert server.seen[1] == ("f.bin", f"bytes={len(BODY) // 2}-")  # asked to resume, got the whole file


def test_known_size_complete_partial_needs_no_request(server, tmp_path):
    (tmp_path / "f.bin.partial").write_bytes(BODY)
    assert fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False).read_bytes() == BODY
    assert server.seen == []


def test_known_size_longer_partial_starts_over(server, tmp_path):
    (tmp_path / "f.bin.partial").write_bytes(BODY + b"more")
    assert fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD, progress=False).read_bytes() == BODY
    assert server.seen == [("f.bin", None)]


def test_wrong_size_with_right_hash_is_refused(server, tmp_path):
    expected = Expected(GOOD.sha256, len(BODY) + 1)
    with pytest.raises(ChecksumError) as e:
        fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", expected, progress=False)
    assert f"expected {len(BODY) + 1} bytes" in str(e.value) and f"got {len(BODY)} bytes" in str(e.value)
    assert "deleted" in str(e.value) and [p.name for p in tmp_path.iterdir()] == ["f.bin.lock"]


def test_plain_progress_lines_when_stderr_is_not_a_terminal(server, tmp_path, capsys):
    (tmp_path / "f.bin.partial").write_bytes(BODY[:100_000])
    fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err  # one closing line, no terminal codes
    assert err.startswith("f.bin: 0.2/0.2 MB 100% ") and "(resumed at 0.1 MB)" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rich_bar_on_a_terminal(server, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv("TERM", "xterm")
    fetch_file(f"{server.url}/f.bin", tmp_path / "f.bin", GOOD)
    shown = sys.stderr.getvalue()
    assert "f.bin" in shown and "200.0/200.0 kB" in shown and "\x1b[" in shown
