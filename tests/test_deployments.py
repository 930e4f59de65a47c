"""The README's deployment round trip, command by command, from a copy of the checkout:
a Prefect server, a process work pool, `prefect deploy --all`, a worker, `prefect deployment run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from keruta_harness.processes import stop_process

from keruta_prefect.models import TaskStatus, parse_task_spec
from keruta_prefect.store import Store
from tests.conftest import ROOT
from tests.waiting import eventually

pytestmark = pytest.mark.usefixtures("prefect_server")


def prefect(*args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """What `prefect deploy` needs from a clone: prefect.yaml and the thin flows/ and blocks/ layers."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copy(ROOT / "prefect.yaml", copy)
    for folder in ("flows", "blocks"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def env(keruta_home: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def worker(env: dict[str, str], checkout: Path, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "worker.log"
    # The worker asks for scheduled runs every second instead of Prefect's 10 s: the same worker, less idling.
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "keruta-process",
                                    "--limit", "4"], env=worker_env, cwd=tmp_path, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        stop_process(process)


def test_deploy_all_then_a_worker_runs_task_dispatch_and_pipeline_deployments(
        env: dict[str, str], checkout: Path, store: Store, request: pytest.FixtureRequest) -> None:
    from prefect.client.orchestration import get_client

    from keruta_prefect.blocks import KerutaKubernetesSettings, load_settings

    prefect("work-pool", "create", "keruta-process", "--type", "process", "--overwrite", env=env, cwd=checkout)
    out = prefect("--no-prompt", "deploy", "--all", env=env, cwd=checkout)
    for name in ("keruta-task/default", "keruta-pipeline/default", "keruta-dispatch/default",
                 "keruta-reconcile/default"):
        assert f"Deployment '{name}' successfully created" in " ".join(out.split()), out
    log = request.getfixturevalue("worker")

    # 1. One task by inline spec: `prefect deployment run 'keruta-task/default' --param task_spec=…`
    spec = {"id": "rt-task", "title": "round trip", "script": "echo hello from a deployment"}
    prefect("deployment", "run", "keruta-task/default", "--param", f"task_spec={json.dumps(spec)}", "--watch",
            env=env, cwd=checkout)
    assert store.get_task("rt-task").status == TaskStatus.COMPLETED
    assert "hello from a deployment" in [row.message for row in store.logs("rt-task")]

    # 2. The dispatcher: PENDING tasks → claimed → flow runs of keruta-task/default on the worker.
    #    It also follows keruta.task.processor.processing-delay, edited in the settings block ("the UI").
    load_settings("default")
    block = KerutaKubernetesSettings.load("default")
    block.processing_delay_ms = 2000
    block.save("default", overwrite=True)
    for i, priority in enumerate((1, 5)):
        store.create_task(parse_task_spec({"id": f"rt-pending-{i}", "priority": priority,
                                           "script": f"echo dispatched {i}"}))
    prefect("deployment", "run", "keruta-dispatch/default", "--watch", env=env, cwd=checkout)
    def dispatched_completed() -> bool:
        statuses = [store.get_task(f"rt-pending-{i}").status for i in range(2)]
        assert statuses == [TaskStatus.COMPLETED] * 2, statuses
        return True

    eventually(dispatched_completed, what="the dispatched tasks to complete", timeout=180, interval=0.5,
               context=lambda: f"worker log:\n{log.read_text()[-3000:]}")
    assert all(len(store.runs(f"rt-pending-{i}")) == 1 for i in range(2))
    with get_client(sync_client=True) as client:
        dispatch = client.read_deployment_by_name("keruta-dispatch/default")
        [schedule] = client.read_deployment_schedules(dispatch.id)
        assert schedule.slug == "processing-delay"
        assert schedule.schedule.interval == timedelta(seconds=2)  # type: ignore[union-attr]
        reconciler = client.read_deployment_by_name("keruta-reconcile/default")
        [schedule] = client.read_deployment_schedules(reconciler.id)
        assert (schedule.slug, schedule.schedule.interval) == ("reconcile", timedelta(minutes=5))  # type: ignore[union-attr]

    # 3. A pipeline: a parent, then two children.
    parent = {"id": f"rt-parent-{uuid.uuid4().hex[:6]}", "script": "echo parent"}
    children = [{"id": f"{parent['id']}-{i}", "script": f"echo child {i}"} for i in range(2)]
    prefect("deployment", "run", "keruta-pipeline/default", "--param", f"parent={json.dumps(parent)}",
            "--param", f"children={json.dumps(children)}", "--watch", env=env, cwd=checkout)
    for task_id in [parent["id"]] + [c["id"] for c in children]:
        assert store.get_task(task_id).status == TaskStatus.COMPLETED
        assert store.get_task(task_id).parent_id == (None if task_id == parent["id"] else parent["id"])

    # 4. The reconciler, on the worker: nothing of the tasks above is touched (all ended, within the grace period).
    prefect("deployment", "run", "keruta-reconcile/default", "--watch", env=env, cwd=checkout)
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        wanted = ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=["keruta-reconcile"]))
        assert client.read_latest_artifacts(artifact_filter=wanted), "the reconciler published no report"
    assert all(store.get_task(f"rt-pending-{i}").status == TaskStatus.COMPLETED for i in range(2))


def test_the_kubernetes_work_pool_variant_deploys_with_module_entrypoints(env: dict[str, str], tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    env = {**env, "KERUTA_IMAGE": "registry.example/keruta-agent:0.1.0",
           "KERUTA_DATABASE_URL": "postgresql+psycopg://keruta@db/keruta"}
    prefect("work-pool", "create", "keruta-kubernetes", "--type", "kubernetes", "--overwrite", env=env, cwd=tmp_path)
    variant = ROOT / "deployments" / "prefect" / "kubernetes.yaml"
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(variant), env=env, cwd=tmp_path)
    with get_client(sync_client=True) as client:
        reconciler = client.read_deployment_by_name("keruta-reconcile/kubernetes")
        assert reconciler.entrypoint == "keruta_prefect.reconcile.flow.keruta_reconcile"
        for name in ("keruta-task/kubernetes", "keruta-pipeline/kubernetes", "keruta-dispatch/kubernetes"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == "keruta-kubernetes"
            assert deployment.parameters["backend"] == "kubernetes"
            assert deployment.job_variables["image"] == "registry.example/keruta-agent:0.1.0"
            assert deployment.job_variables["env"] == {"KERUTA_DATABASE_URL": "postgresql+psycopg://keruta@db/keruta"}
            assert deployment.pull_steps == []
