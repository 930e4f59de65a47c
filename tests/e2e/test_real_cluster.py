"""The same checks and flows against a real cluster. Opt-in: runs only when KUBECONFIG is set.

Needs what deployments/README.md sets up (namespace, token Secret, RBAC, the keruta API reachable by
agent Pods, an agent image) and, in the environment:

    KUBECONFIG                 the cluster
    KERUTA_E2E_PROPERTIES      application.properties for it (namespace, api-url as Pods see it, image…)
    KERUTA_DATABASE_URL        the keruta API's database (the flow reads the task from it)

    KUBECONFIG=~/.kube/config KERUTA_E2E_PROPERTIES=e2e.properties make test
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from keruta_prefect.cli import main

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG") or not os.environ.get("KERUTA_E2E_PROPERTIES"),
                       reason="a real cluster: set KUBECONFIG and KERUTA_E2E_PROPERTIES"),
]


def test_doctor_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--properties", os.environ["KERUTA_E2E_PROPERTIES"]]) == 0, capsys.readouterr().out


def test_render_is_accepted_by_the_cluster(tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text('{"id": "e2e-render", "script": "echo hi"}')
    assert main(["render", "--task-file", str(task), "--properties", os.environ["KERUTA_E2E_PROPERTIES"],
                 "--server-dry-run"]) == 0


@pytest.mark.usefixtures("prefect_server")
def test_a_task_runs_as_a_job(tmp_path: Path) -> None:
    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task
    from keruta_prefect.settings import load_properties_file

    block = f"e2e-{uuid.uuid4().hex[:8]}"
    seed(load_properties_file(os.environ["KERUTA_E2E_PROPERTIES"]), name=block)
    result = keruta_task(task_spec={"id": f"e2e-{uuid.uuid4().hex[:8]}", "script": "echo hello from a real Pod"},
                         backend="kubernetes", settings_block=block)
    assert result.status == "COMPLETED" and result.job_name
