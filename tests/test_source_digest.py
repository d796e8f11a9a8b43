"""A result's record of which code ran: the package's digest moves with its files' contents and names only."""

from pathlib import Path

from samrepro import env


def _package(root: Path) -> Path:
    (root / "kernels").mkdir(parents=True)
    (root / "__init__.py").write_text("x = 1\n")
    (root / "kernels" / "attn.py").write_text("y = 2\n")
    return root


def test_the_digest_changes_with_a_files_contents_or_name(tmp_path):
    pkg = _package(tmp_path / "pkg")
    before = env.source_digest(pkg)
    assert env.source_digest(pkg) == before
    (pkg / "kernels" / "attn.py").write_text("y = 3\n")
    edited = env.source_digest(pkg)
    assert edited != before
    (pkg / "kernels" / "attn.py").rename(pkg / "kernels" / "attn2.py")
    assert env.source_digest(pkg) not in (before, edited)


def test_bytecode_does_not_change_the_digest(tmp_path):
    pkg = _package(tmp_path / "pkg")
    before = env.source_digest(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(b"\x00compiled")
    assert env.source_digest(pkg) == before


def test_the_environment_record_carries_the_installed_packages_digest():
    record = env.capture()
    assert record["source_sha256"] == env.source_digest(Path(env.__file__).resolve().parent)
    assert len(record["source_sha256"]) == 64
