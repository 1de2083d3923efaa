"""docs/threat-model.md names a test for every threat: each named test must exist (no stale pointers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "threat-model.md"

# The doc's short names for test modules (see its header).
ALIASES = {
    "faults": "integration/test_faults.py",
    "hostile": "integration/test_hostile.py",
    "soak": "integration/test_soak.py",
    "inbound": "integration/test_inbound.py",
    "app": "integration/test_app.py",
}
REF = re.compile(r"`([\w/.]+?)(?:::(\w+)(?:\[[^\]]*\])?)?`")


def _module(name: str) -> Path | None:
    rel = ALIASES.get(name, name)
    path = ROOT / "tests" / rel
    return path if path.suffix == ".py" and path.exists() else None


def test_every_threat_row_names_tests_that_exist() -> None:
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| T\d+ \|", line)]
    assert len(rows) >= 25
    missing: list[str] = []
    for row in rows:
        tests_cell = row.rstrip(" |").rsplit(" | ", 1)[-1]
        current: Path | None = None
        named = 0
        for mod, func in REF.findall(tests_cell):
            path = _module(mod)
            if path is None:  # prose in backticks, or a `::name` continuing the previous module
                continue
            current = path
            named += 1
            if func and not re.search(rf"def {func}\b", path.read_text()):
                missing.append(f"{row[:6]} {mod}::{func}")
        for func in re.findall(r"`::(\w+)", tests_cell):
            if current is not None and not any(
                re.search(rf"def {func}\b", p.read_text()) for p in (ROOT / "tests").rglob("test_*.py")
            ):
                missing.append(f"{row[:6]} ::{func}")
        assert named, f"row names no test: {row[:80]}"
    assert missing == []
