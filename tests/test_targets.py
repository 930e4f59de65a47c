"""The real-cluster target of the Kubernetes tests (tests/targets.py) works without a real cluster: the harness in
a process of its own (`python -m keruta_harness --kubeconfig PATH`) stands in for one, and the shared tests reach
it through the official client and $KUBECONFIG alone, as they would reach kind or k3d."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from keruta_harness.processes import free_port, stop_process

from tests.targets import real_target_from

ROOT = Path(__file__).resolve().parent.parent

TARGET_NEUTRAL = [
    "tests/test_operator_tools.py::test_render_server_dry_run_asks_the_cluster_and_creates_nothing",
    "tests/test_operator_tools.py::test_doctor_passes_on_a_prepared_cluster",
    "tests/test_k8s_default_paths.py::test_a_wait_after_the_container_ended_returns_at_once_with_the_whole_log",
]
HARNESS_ONLY = "tests/test_exec_collect.py::test_exec_forbidden_names_the_missing_permission"


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test name → (passed | skipped | failed, message) from pytest's JUnit XML."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        ended = next(iter(case), None)
        kind = "passed" if ended is None or ended.tag in ("system-out", "system-err") else ended.tag
        found[case.get("name", "")] = ("failed" if kind in ("failure", "error") else kind,
                                       "" if ended is None else ended.get("message", ""))
    return found


def test_the_shared_tests_run_against_a_cluster_known_only_by_its_kubeconfig(tmp_path: Path) -> None:
    kubeconfig, log = tmp_path / "kube" / "kubeconfig", tmp_path / "harness.log"
    with log.open("w") as errors:  # its two lines on stdout (the first once it answers), anything else to the log
        harness = subprocess.Popen([sys.executable, "-m", "keruta_harness", "--kubeconfig", str(kubeconfig),
                                    "--namespace", "keruta", "--root", str(tmp_path / "harness")],
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert harness.stdout is not None
        assert harness.stdout.readline().strip() == str(kubeconfig), f"the harness did not start: {log.read_text()}"
        properties = tmp_path / "e2e.properties"
        properties.write_text("keruta.kubernetes.default-namespace=keruta\n"
                              f"keruta.kubernetes.api-url=http://127.0.0.1:{free_port()}\n"
                              "keruta.kubernetes.default-image=keruta-agent:0.1.0\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KERUTA_")}
        env.update(KUBECONFIG=str(kubeconfig), KERUTA_E2E_PROPERTIES=str(properties), KERUTA_E2E_API_HOST="127.0.0.1")
        junit = tmp_path / "junit.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0",
                              f"--junitxml={junit}", *TARGET_NEUTRAL, HARNESS_ONLY],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        stop_process(harness)  # type: ignore[arg-type]
    report = run.stdout[-4000:] + run.stderr[-2000:]
    assert f"keruta Kubernetes target: the real cluster of {kubeconfig}, namespace keruta" in run.stdout, report
    results = outcomes(junit)
    assert {name: results[name.rsplit("::", 1)[1]][0] for name in TARGET_NEUTRAL} == dict.fromkeys(
        TARGET_NEUTRAL, "passed"), report
    kind, message = results[HARNESS_ONLY.rsplit("::", 1)[1]]
    assert (kind, message) == ("skipped", "harness only: the RBAC denial of pods/exec is injected (a real cluster "
                                          "would need a second user)"), report


def test_the_environment_contract(tmp_path: Path) -> None:
    kubeconfig, properties = tmp_path / "kubeconfig", tmp_path / "e2e.properties"
    kubeconfig.write_text("{}")
    properties.write_text("keruta.kubernetes.default-namespace=keruta\nkeruta.kubernetes.api-url=http://10.0.0.1:18080\n")
    assert real_target_from({"KUBECONFIG": str(kubeconfig)}) is None  # a KUBECONFIG alone is the developer's own
    target = real_target_from({"KUBECONFIG": str(kubeconfig), "KERUTA_E2E_PROPERTIES": str(properties)})
    assert target is not None
    assert (target.namespace, target.api_url, target.api_host, target.api_port) == (
        "keruta", "http://10.0.0.1:18080", "0.0.0.0", 18080)
    moved = real_target_from({"KUBECONFIG": str(kubeconfig), "KERUTA_E2E_PROPERTIES": str(properties),
                              "KERUTA_E2E_API_HOST": "127.0.0.1", "KERUTA_E2E_API_PORT": "9000"})
    assert moved is not None and (moved.api_host, moved.api_port) == ("127.0.0.1", 9000)
    with pytest.raises(ValueError, match="set KUBECONFIG"):
        real_target_from({"KERUTA_E2E_PROPERTIES": str(properties)})


@pytest.mark.parametrize(("args", "line"), [
    (["--namespace", "Bad_NS!"], "--namespace 'Bad_NS!': a namespace is a DNS label"),
    (["--kubeconfig", "/proc/nope/kubeconfig"], "python -m keruta_harness: cannot write /proc/nope"),
    (["--root", "/dev/null"], "python -m keruta_harness: cannot write /dev/null"),
])
def test_the_test_cluster_refuses_bad_arguments_in_one_line(args: list[str], line: str) -> None:
    done = subprocess.run([sys.executable, "-m", "keruta_harness", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and line in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr
