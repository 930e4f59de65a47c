"""The benchmarks' smoke mode: every measurement runs end to end at tiny sizes (no timing asserted)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest


class Shown(Mapping[str, float]):
    """The figures, remembering which ones a rendering reads (shows)."""

    def __init__(self, figures: Mapping[str, float]) -> None:
        self.figures = figures
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> float:
        self.read.add(key)
        return self.figures[key]

    def __contains__(self, key: object) -> bool:  # asking is not showing
        return key in self.figures

    def __iter__(self) -> Iterator[str]:
        return iter(self.figures)

    def __len__(self) -> int:
        return len(self.figures)


@pytest.mark.usefixtures("prefect_server")
def test_the_benchmarks_run_at_smoke_size_and_write_every_section(tmp_path: Path, keruta_home: Path) -> None:
    from benchmarks.__main__ import SMOKE, _run
    from benchmarks.artifacts import size_label
    from benchmarks.report import render

    out = tmp_path / "RESULTS.md"
    done = _run(SMOKE, out, "the test suite's Prefect server")
    text = out.read_text()
    assert text == done.text
    for title in ("1. Completion detection", "2. Kubernetes API requests per task", "tasks at once in one process",
                  "4. Orchestration overhead", "5. Fan-out through keruta-pipeline", "6. Artifact collection",
                  "7. Log streaming", "8. 1,000 tasks at once", "5a. The agent's cold start", "Targets",
                  "results.json"):
        assert f"## {title}" in text or title in text, title
    assert "| keruta-prefect |" in text and "| prefect-kubernetes |" in text
    assert "| 2000 | 2000 | yes |" in text  # every streamed line stored, in order

    # results.json: one flat object of numbers, exactly the figures RESULTS.md shows, which it is rendered from
    figures = json.loads((tmp_path / "results.json").read_text())
    assert figures == done.figures
    wrong = {k: v for k, v in figures.items()
             if not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", k) or isinstance(v, bool)
             or not isinstance(v, int | float) or not math.isfinite(v)}
    assert not wrong, wrong
    shown = Shown(figures)
    assert text.endswith(render(shown, done.notes))
    assert shown.read == set(figures), (set(figures) - shown.read, shown.read - set(figures))
    big = f"artifacts_{size_label(SMOKE.artifacts[0])}"
    for key in ("completion_p50_ms", "overhead_exec_mode_ms", "fanout_overhead_ms_per_task", "concurrent_peak_watches",
                f"{big}_vs_tar", f"{big}_vs_kubectl_cp", "artifacts_small_vs_kubectl_cp", "logs_lines_per_s",
                "artifacts_small_per_file_us", "agent_cpu_ms_per_true_task", "fanout_cpu_server_ms_per_task",
                "floor_flow_run_client_cpu_ms", "scale_completed_share", "scale_pipeline_completed_share"):
        assert key in figures, key

    # kubectl cp of the same files, beside tar | cat, for both cases
    assert len(re.findall(r"^\| \| kubectl cp \| [\d.]+ MiB/s \| [\d.]+ s \| [\d.]+× \| \|$", text, re.M)) == 2, \
        done.notes.get("kubectl_failures")
    assert re.search(r"kubectl: v1\.\d+", text)


def test_a_failing_kubectl_cp_is_said_not_left_out() -> None:
    """No figures for a copy that failed (results.json has no key for it), and RESULTS.md says why."""
    from benchmarks.artifacts import Artifacts, Case
    from benchmarks.report import artifacts_figures, artifacts_notes, render_artifacts

    measured = Artifacts([Case("1gib", "one file of 1024 MiB", 2**30, keruta_s=4.0, tar_s=1.0, rss_growth=2**20,
                               kubectl_s=8.0),
                          Case("small", "10000 files of 1 KiB", 10000 * 1024, keruta_s=2.0, tar_s=0.5, rss_growth=0)],
                         "v1.33.1", ["10000 files of 1 KiB: `kubectl cp` exit status 1: error: tar contents corrupted"])
    figures = artifacts_figures(measured)
    assert figures["artifacts_1gib_vs_tar"] == 0.25 and figures["artifacts_1gib_vs_kubectl_cp"] == 2.0
    assert figures["artifacts_1gib_keruta_mib_per_s"] == 256 and figures["artifacts_small_files"] == 10000
    assert not [key for key in figures if key.startswith("artifacts_small_") and "kubectl" in key]
    assert figures["artifacts_small_per_file_us"] == 150  # (2.0 s − 0.5 s) ÷ 10000 files
    assert "per_file_us" not in str([key for key in figures if key.startswith("artifacts_1gib")])
    text = "\n".join(render_artifacts(figures, artifacts_notes(measured)))
    assert "| | kubectl cp | 128 MiB/s | 8.00 s | 2.00× | |" in text
    assert "| | kubectl cp | failed (below) | | | |" in text
    assert "| | keruta − tar \\| cat, per file | | 150 µs | | |" in text
    assert "- 10000 files of 1 KiB: `kubectl cp` exit status 1: error: tar contents corrupted" in text
    assert "kubectl: v1.33.1." in text
