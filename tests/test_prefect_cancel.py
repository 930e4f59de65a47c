"""Cancelling a keruta flow run through Prefect itself: a Runner executes the flow in its own process;
cancellation kills that process and runs on_cancellation in the runner, which finds the Job by label."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from keruta_prefect.blocks import seed
from keruta_prefect.manifest import job_name
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.targets import Target, harness_of


@pytest.mark.usefixtures("prefect_server")
def test_cancelling_the_flow_run_deletes_its_job_and_marks_the_task_cancelled(
        cluster: Target, api: Api, store: Store) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner
    from prefect.states import Cancelling

    from keruta_prefect.flows import keruta_task

    cluster.create_secret("keruta-api-token", {"token": api.token})
    block = f"cancel-{uuid.uuid4().hex[:8]}"
    seed(cluster.settings(api_url=api.url, artifacts_mode="off"), name=block)
    runner = Runner(name=f"keruta-{block}", query_seconds=1)
    runner.add_flow(keruta_task, name=block)
    loop_thread = threading.Thread(target=lambda: asyncio.run(runner.start()), daemon=True)
    loop_thread.start()
    try:
        flow_run = run_deployment(f"keruta-task/{block}", timeout=0, parameters={
            "task_spec": {"id": "k-ui-cancel", "script": "echo working\nsleep 120"},
            "backend": "kubernetes", "settings_block": block})
        cluster.wait_for(lambda: store.count_logs("k-ui-cancel") > 0, timeout=90, what="the agent to start")
        name = job_name("k-ui-cancel", 1)
        assert cluster.job(name) is not None

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        cluster.wait_for(lambda: cluster.job(name) is None and not cluster.pods(job=name), timeout=90,
                         what="the Job and its Pods to be gone")
        cluster.wait_for(lambda: store.get_task("k-ui-cancel").status == "CANCELLED", timeout=30,
                         what="the task to be CANCELLED")
        with get_client(sync_client=True) as client:
            cluster.wait_for(lambda: client.read_flow_run(flow_run.id).state.is_cancelled(), timeout=60,
                             what="the flow run to be Cancelled")
        if harness := harness_of(cluster):
            assert [d.name for d in harness.calls_of("delete", "jobs")] == [name]
    finally:
        runner.stop()
        loop_thread.join(30)
