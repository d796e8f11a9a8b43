"""The documentation holds together: relative links resolve, and the project's text speaks only of the project."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

# [text](target) or ![alt](target), with an optional "title" after the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "reports").glob("**/README.md"))
    return [f for f in files if f.is_file()]


def _blank(match: re.Match[str]) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link outside code; code is blanked, not removed, so line numbers hold."""
    text = INLINE_CODE.sub(_blank, FENCE.sub(_blank, text))
    links = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        links.append((text.count("\n", 0, m.start()) + 1, target))
    return links


def test_relative_links_resolve() -> None:
    files = markdown_files()
    assert ROOT / "README.md" in files
    broken = []
    for md in files:
        for line, target in relative_links(md.read_text(encoding="utf-8")):
            path = unquote(target.split("#", 1)[0])
            if not path:
                continue
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}:{line}: {target}")
    assert not broken, f"{len(broken)} broken relative link(s):\n" + "\n".join(broken)


# Built from pieces so that this file's own text does not match it.
_PIECES = ["sess" + "ion [0-9]", "sess" + "ions? [0-9]", "iss" + "ue #?[0-9]", "ca" + "ll [0-9]+"]
PRIVATE_REFERENCE = re.compile("|".join(_PIECES), re.IGNORECASE)
SEARCHED = ["src", "tests", "tools", "benchmarks", "ablations", "reports", "docs", "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".json", ".log"}


def searched_files() -> list[Path]:
    files = []
    for name in SEARCHED:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in candidates:
            if path.suffix not in TEXT_SUFFIXES or any(part.endswith(".egg-info") for part in path.parts):
                continue
            files.append(path)
    return files


def test_project_speaks_only_of_itself() -> None:
    files = searched_files()
    assert files
    hits = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if PRIVATE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}")
    assert not hits, f"{len(hits)} line(s) refer to something outside the project:\n" + "\n".join(hits)
