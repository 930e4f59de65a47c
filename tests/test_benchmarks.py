"""The benchmarks' smoke mode: every measurement runs end to end at tiny sizes (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_the_benchmarks_run_at_smoke_size_and_write_every_section(tmp_path: Path, keruta_home: Path) -> None:
    from benchmarks.__main__ import SMOKE, _run

    out = tmp_path / "RESULTS.md"
    text = _run(SMOKE, out, "the test suite's Prefect server")
    assert out.read_text() == text
    for title in ("1. Completion detection", "2. Kubernetes API requests per task", "tasks at once in one process",
                  "4. Orchestration overhead", "5. Fan-out through keruta-pipeline", "6. Artifact collection",
                  "7. Log streaming"):
        assert f"## {title}" in text or title in text, title
    assert "| keruta-prefect |" in text and "| prefect-kubernetes |" in text
    assert "| 2000 | 2000 | yes |" in text  # every streamed line stored, in order
