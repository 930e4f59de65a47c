"""The API token stays secret: after a real task on the Kubernetes backend (and a refused one), it is in
no stored row, no Prefect parameter, log line or artifact, no Job manifest and no error message."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from keruta_prefect.blocks import seed
from keruta_prefect.flows import keruta_task
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.targets import Target


@pytest.mark.usefixtures("prefect_server")
def test_the_api_token_leaks_nowhere(cluster: Target, api: Api, store: Store, keruta_home: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    token = api.token
    cluster.create_secret("keruta-api-token", {"token": token})
    block = f"sec-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url), name=block)
    script = ('echo "env has token: $( [ -n "$KERUTA_API_TOKEN" ] && echo yes )"\n'
              'mkdir -p "$KERUTA_ARTIFACTS_DIR" && env | grep -v KERUTA_API_TOKEN > "$KERUTA_ARTIFACTS_DIR/env.txt"')
    state = keruta_task(task_spec={"id": "secret-run", "script": script}, backend="kubernetes",
                        settings_block=block, return_state=True)
    assert state.is_completed()
    assert "env has token: yes" in [row.message for row in store.logs("secret-run")]  # the agent had it

    # A refused call: the error names the problem, never the token it was given.
    wrong = token[::-1]
    refused = httpx.get(f"{api.url}/api/v1/tasks/secret-run", headers={"Authorization": f"Bearer {wrong}"})
    assert refused.status_code == 401 and wrong not in refused.text and token not in refused.text

    places: dict[str, str] = {}
    places["database"] = (keruta_home / "keruta.db").read_bytes().decode("latin-1")
    places["jobs"] = json.dumps(cluster.jobs()) + json.dumps(cluster.pods())
    flow_run_id = state.state_details.flow_run_id
    # The run's logs reach Prefect in the background: wait until they are there (a condition, not luck).
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        places["parameters"] = json.dumps(run.parameters, default=str)

        def read_logs() -> str:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            return text if "keruta task secret-run COMPLETED" in text else ""  # the flow's last words are in

        places["prefect logs"] = cluster.wait_for(read_logs, timeout=30, what="the run's logs in Prefect")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        places["artifacts"] = "\n".join(str(a.data) for a in artifacts)
    places["collected files"] = "\n".join(p.read_text(errors="replace") for p in keruta_home.rglob("env.txt"))
    assert places["prefect logs"] and places["artifacts"] and places["collected files"]  # there was something
    leaks = [where for where, text in places.items() if token in text]
    assert leaks == []
