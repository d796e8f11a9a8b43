"""The README's patch table is `samrepro patches --markdown`: one row per registered patch, nothing hand-kept."""

from __future__ import annotations

from pathlib import Path

from samrepro import patch_table
from samrepro.patch import EXACT, REORDERED, Requires, Tolerance
from samrepro.registry import list_patches

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> str:
    """The README's table that starts with the generated header, up to its last row."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| " + " | ".join(patch_table.MARKDOWN_HEADER) + " |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_readme_table_is_the_generated_one():
    assert readme_table() == patch_table.markdown(), "README.md is stale: paste in `samrepro patches --markdown`"


def test_one_row_per_registered_patch_in_order():
    rows = patch_table.markdown().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list_patches()


def test_cells_say_what_the_registry_declares():
    assert patch_table._agreement_sqnr(EXACT) == "exact"
    assert patch_table._agreement_sqnr(REORDERED) == "0.995 / 80 dB"
    assert patch_table._agreement_sqnr(Tolerance(agreement_miou_min=0.99)) == "0.99 / exact"
    assert patch_table._devices(Requires()) == "cpu, cuda"
    assert patch_table._devices(Requires(min_capability=(8, 9))) == "cpu, cuda sm89+"
