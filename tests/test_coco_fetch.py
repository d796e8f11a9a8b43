"""`samrepro data fetch coco` against a loopback server serving a tiny COCO-format archive pair."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from pathlib import Path

import pytest

from samrepro import download
from samrepro.cli import main
from samrepro.data import coco_fetch as cf
from samrepro.data import load_dataset, write_coco
from samrepro.download import ChecksumError, DownloadError
from samrepro.inputs import UsageError, resolve_data
from tests.test_download import server  # noqa: F401  (the loopback server fixture)

IMAGES, ANNOTATIONS = "zips/val2017.zip", "annotations/annotations_trainval2017.zip"


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    """Two synthetic images with their instances file, zipped as the COCO host lays them out."""
    source = tmp_path_factory.mktemp("source") / "set"
    annotations = write_coco(source, 2, seed=0)
    images = {f"val2017/{p.name}": p.read_bytes() for p in sorted((source / "images").iterdir())}
    return {
        IMAGES: zipped(images),
        ANNOTATIONS: zipped(
            {
                "annotations/instances_val2017.json": annotations.read_bytes(),
                "annotations/captions_val2017.json": b"{}",  # not needed: must not be extracted
            }
        ),
    }


@pytest.fixture
def host(server, archives, monkeypatch, tmp_path):  # noqa: F811
    """The server with the archives, the table pointing at them, `$SAMREPRO_CACHE` in tmp_path; no waits."""
    server.files.update(archives)
    table = [cf.Archive(a.path, len(archives[a.path]), hashlib.sha256(archives[a.path]).hexdigest(), a.member)
             for a in cf.ARCHIVES]  # fmt: skip
    monkeypatch.setattr(cf, "ARCHIVES", tuple(table))
    monkeypatch.setenv(cf.URL_ENV, server.url)
    monkeypatch.setenv("SAMREPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    return server


def assert_not_ready(root: Path) -> None:
    with pytest.raises(cf.CocoNotFetched):
        cf.coco_root(root)


def test_fetch_then_data_coco_then_fetch_again_offline(host, tmp_path, capsys):
    assert main(["data", "fetch", "coco"]) == 0
    root = tmp_path / "cache" / "coco"
    assert capsys.readouterr().out.strip() == str(root)
    assert cf.coco_root() == root and len(list((root / "val2017").iterdir())) == 2
    assert not (root / "annotations" / "captions_val2017.json").exists() and not list(root.glob(".extract-*"))
    spec = resolve_data("coco")
    assert spec == f"coco:{root.resolve()}"
    samples, label = load_dataset(spec, 5, tmp_path)
    assert len(samples) == 2 and label == "coco:val2017(n=2)" and samples[0].gt_masks.any()
    requests = len(host.seen)
    assert requests == 2
    assert cf.fetch_coco(base_url="http://127.0.0.1:9") == root and len(host.seen) == requests  # no network


def test_lost_folder_is_extracted_again_without_download(host, tmp_path):
    root = cf.fetch_coco(tmp_path / "c", progress=False)
    (root / "annotations" / "instances_val2017.json").unlink()
    assert_not_ready(root)
    assert cf.fetch_coco(tmp_path / "c", progress=False) == root and len(host.seen) == 2


def test_concurrent_fetches_download_and_extract_once(host, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(cf.fetch_coco(tmp_path / "c", progress=False)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "c"] * 3 and len(host.seen) == 2


def test_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMREPRO_CACHE", str(tmp_path))
    message = f"COCO val2017 is not in the cache ({tmp_path / 'coco'}); run `samrepro data fetch coco`"
    with pytest.raises(cf.CocoNotFetched, match=re.escape(message)):
        cf.coco_root()
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_data("coco")


def test_truncated_download_keeps_the_partial_and_the_next_fetch_resumes(host, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 0)  # no resume within the call
    size = len(host.files[IMAGES])
    host.cut[IMAGES] = (1, 0.5, False)
    with pytest.raises(DownloadError, match=f"{size // 2} bytes so far") as e:
        cf.fetch_coco(tmp_path / "c", progress=False)
    assert "\n" not in str(e.value) and (tmp_path / "c" / "val2017.zip.partial").stat().st_size == size // 2
    assert_not_ready(tmp_path / "c")
    assert not (tmp_path / "c" / "val2017").exists()
    assert cf.fetch_coco(tmp_path / "c", progress=False) == tmp_path / "c"
    assert (IMAGES, f"bytes={size // 2}-") in host.seen


def test_dropped_connection_is_resumed_in_the_same_fetch(host, tmp_path):
    host.cut[ANNOTATIONS] = (1, 0.3, True)  # a TCP reset after 30% of the body
    assert cf.fetch_coco(tmp_path / "c", progress=False) == tmp_path / "c"
    size = len(host.files[ANNOTATIONS])
    assert [r for p, r in host.seen if p == ANNOTATIONS] == [None, f"bytes={int(size * 0.3)}-"]


def test_corrupt_archive_is_deleted_with_both_hashes_named(host, tmp_path):
    good = host.files[ANNOTATIONS]
    host.files[ANNOTATIONS] = bytes(b ^ 1 for b in good)  # same size, other bytes
    with pytest.raises(ChecksumError) as e:
        cf.fetch_coco(tmp_path / "c", progress=False)
    message = str(e.value)
    assert "\n" not in message and hashlib.sha256(good).hexdigest() in message
    assert hashlib.sha256(host.files[ANNOTATIONS]).hexdigest() in message and "deleted" in message
    assert [p.name for p in (tmp_path / "c").glob("annotations_trainval2017.zip*")] == [
        "annotations_trainval2017.zip.lock"  # no zip, no partial, no corrupt copy
    ]
    assert not (tmp_path / "c" / "annotations").exists()
    assert_not_ready(tmp_path / "c")


def test_http_404(host, tmp_path):
    url = f"{host.url}/elsewhere"
    with pytest.raises(DownloadError, match=re.escape(f"{url}/{IMAGES} failed: HTTP 404")) as e:
        cf.fetch_coco(tmp_path / "c", base_url=url, progress=False)
    assert "\n" not in str(e.value) and len(host.seen) == 1
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["coco.lock", "val2017.zip.lock"]


def test_archive_without_the_member_leaves_nothing(host, tmp_path, monkeypatch):
    body = host.files[IMAGES] = zipped({"train2017/x.jpg": b"x"})
    entry = cf.Archive(IMAGES, len(body), hashlib.sha256(body).hexdigest(), "val2017")
    monkeypatch.setattr(cf, "ARCHIVES", (entry, *cf.ARCHIVES[1:]))
    with pytest.raises(ValueError, match="holds no val2017"):
        cf.fetch_coco(tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "val2017").exists() and not list((tmp_path / "c").glob(".extract-*"))
