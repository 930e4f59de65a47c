"""docs/reliability.md lists every fault and hostile input with its test: each named test must exist."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT


def test_every_row_names_tests_that_exist_and_the_tables_are_complete() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    references = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(references) > 40
    missing = []
    for path, name in sorted(references):
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in names:
            missing.append(f"{path}::{name}")
    assert missing == []
    sections = text.split("\n## ")
    faults = next(s for s in sections if s.startswith("Fault matrix"))
    hostile = next(s for s in sections if s.startswith("Hostile input"))
    assert sum(1 for line in faults.splitlines() if re.match(r"\| \d+ \|", line)) >= 15
    assert sum(1 for line in hostile.splitlines() if re.match(r"\| \d+ \|", line)) >= 40
