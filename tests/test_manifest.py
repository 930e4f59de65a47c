"""The Job and PVC builders: pure, golden-tested, valid for every supported Kubernetes version."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from keruta_harness.validate import validate_all, versions

from keruta_prefect.manifest import (
    build_job,
    build_pvc,
    job_name,
    label_value,
    pvc_name,
)
from keruta_prefect.models import RunContext, Task, parse_task_spec
from keruta_prefect.settings import KerutaSettings

GOLDEN = Path(__file__).parent / "golden"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
FIXED = "2026-01-02T03:04:05+00:00"


def fixed_task(**spec: object) -> Task:
    return parse_task_spec({"createdAt": FIXED, **spec}).model_copy(
        update={"created_at": Task.model_validate({"createdAt": FIXED}).created_at,
                "updated_at": Task.model_validate({"createdAt": FIXED}).created_at})


def test_versions_cover_1_31_through_the_newest_shipped() -> None:
    assert versions()[0] == "1.31.0" and len(versions()) >= 7


def test_golden_job_for_a_plain_task() -> None:
    task = fixed_task(id="build-42", title="Build", description="Compile it", priority=5,
                      additionalEnv={"TARGET": "prod"}, timeoutSeconds=600, script="make")
    job = build_job(task, KerutaSettings(), RunContext(attempt=1, flow_run_id="0b9d3c1e-7d0c-4a3e-9c55-3f1d1f0b2a11"))
    validate_all(job)
    golden = GOLDEN / "job-build-42.yaml"
    rendered = yaml.safe_dump(job, sort_keys=False, allow_unicode=True)
    if os.environ.get("KERUTA_REGENERATE_GOLDEN") == "1":  # a deliberate change: regenerate, review, commit
        golden.write_text(rendered)
    assert rendered == golden.read_text()
    env = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert env[-1] == "TARGET" and env.index("KERUTA_API_URL") < env.index("TARGET")


def test_the_seeds_shape_and_the_token_only_by_secret_reference() -> None:
    job = build_job(fixed_task(id="t1", script="x"), KerutaSettings(token_secret_name="tok", token_secret_key="k"),
                    RunContext())
    pod = job["spec"]["template"]["spec"]
    [main] = pod["containers"]
    assert main["name"] == "main" and main["image"] == "keruta-agent:latest"
    assert main["command"] == ["keruta-agent", "run", "--task-id", "$(KERUTA_TASK_ID)", "--api-url",
                               "$(KERUTA_API_URL)"]
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e for e in main["env"]}
    assert env["KERUTA_API_TOKEN"] == {"name": "KERUTA_API_TOKEN",
                                       "valueFrom": {"secretKeyRef": {"name": "tok", "key": "k"}}}
    assert env["KERUTA_API_URL"]["value"] == "http://keruta-api:8080"
    for name in ("KERUTA_TASK_ID", "KERUTA_TASK_TITLE", "KERUTA_TASK_DESCRIPTION", "KERUTA_TASK_PRIORITY",
                 "KERUTA_TASK_STATUS", "KERUTA_TASK_CREATED_AT", "KERUTA_TASK_UPDATED_AT"):
        assert name in env
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_hardened_pod_security() -> None:
    job = build_job(fixed_task(id="sec"), KerutaSettings(), RunContext())
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("task_id", ["a" * 300, "Task_With_UPPER.and_under", "x", "trailing-", "9.9.9",
                                     "dots...and---dashes___", "Z" * 63, "ends_"])
def test_any_task_id_gives_a_valid_deterministic_job_name_and_labels(task_id: str) -> None:
    task = fixed_task(id=task_id)
    name = job_name(task_id, 3)
    assert len(name) <= 63 and DNS_LABEL.match(name) and name == job_name(task_id, 3)
    assert name != job_name(task_id, 4)
    job = build_job(task, KerutaSettings(), RunContext(attempt=3, flow_run_id="f" * 70))
    for value in job["metadata"]["labels"].values():
        assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert job["metadata"]["annotations"]["keruta.io/task-id"] == task_id  # the full id is kept
    validate_all(job)


def test_ids_that_slug_alike_get_different_names() -> None:
    assert job_name("Task_A", 1) != job_name("task-a", 1)
    assert label_value("a" * 64) != label_value("a" * 65)


def test_long_descriptions_are_truncated_on_a_utf8_boundary() -> None:
    task = fixed_task(id="long", description="日本語" * 5000)
    env = {e["name"]: e.get("value") for e in
           build_job(task, KerutaSettings(description_env_limit=1000), RunContext())["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    text = env["KERUTA_TASK_DESCRIPTION"]
    assert len(text.encode()) <= 1000 and text.endswith("full text: GET /api/v1/tasks/long]")
    assert text.startswith("日本語")


def test_resources_service_account_pull_secrets_selectors_and_tolerations() -> None:
    settings = KerutaSettings(service_account="runner", image_pull_secrets=["regcred"],
                              node_selector={"pool": "agents"}, default_cpu_limit="2",
                              tolerations=[{"key": "dedicated", "operator": "Equal", "value": "keruta",
                                            "effect": "NoSchedule"}])
    task = fixed_task(id="r", image="registry.example.com/agent:2", resources={"memoryLimit": "4Gi"})
    job = build_job(task, settings, RunContext())
    validate_all(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "runner" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "agents"} and pod["tolerations"][0]["key"] == "dedicated"
    main = pod["containers"][0]
    assert main["image"] == "registry.example.com/agent:2"
    assert main["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                 "limits": {"cpu": "2", "memory": "4Gi"}}


def test_deadline_and_pod_failure_policy() -> None:
    job = build_job(fixed_task(id="d", timeoutSeconds=100), KerutaSettings(artifacts_hold_timeout=60), RunContext())
    assert job["spec"]["activeDeadlineSeconds"] == 100 + 60 + 300
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                             "values": [2]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_repository_task_clones_into_its_volume_without_a_shell_seeing_task_values() -> None:
    settings = KerutaSettings(default_pvc_storage_class="fast", default_pvc_storage_size="5Gi")
    task = fixed_task(id="repo-1", repositoryUrl="https://git.example.com/team/app.git", repositoryRef="main",
                      repositorySecret="git-creds")
    job = build_job(task, settings, RunContext())
    pvc = build_pvc(task, settings, RunContext())
    assert pvc is not None
    validate_all(job)
    validate_all(pvc)
    pod = job["spec"]["template"]["spec"]
    [clone] = pod["initContainers"]
    assert clone["command"][:2] == ["/bin/sh", "-c"] and "git.example.com" not in clone["command"][2]
    env = {e["name"]: e for e in clone["env"]}
    assert env["KERUTA_REPOSITORY_URL"]["value"] == "https://git.example.com/team/app.git"
    assert env["GIT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "git-creds", "key": "password",
                                                                "optional": False}
    assert pod["volumes"][0] == {"name": "work", "persistentVolumeClaim": {"claimName": pvc_name("repo-1")}}
    assert job["spec"]["template"]["metadata"]["labels"]["keruta.io/clones-repository"] == "true"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                           "storageClassName": "fast"}


def test_a_child_task_uses_its_root_tasks_volume() -> None:
    child = fixed_task(id="child", parentId="parent", script="ls")
    job = build_job(child, KerutaSettings(), RunContext(root_task_id="root"))
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc_name("root")
    pvc = build_pvc(child, KerutaSettings(), RunContext(root_task_id="root"))
    assert pvc is not None and pvc["metadata"]["name"] == pvc_name("root")
    assert build_pvc(fixed_task(id="plain"), KerutaSettings(), RunContext()) is None


def test_the_builder_is_pure() -> None:
    task = fixed_task(id="p", additionalEnv={"A": "1"})
    settings = KerutaSettings()
    first = json.dumps(build_job(task, settings, RunContext()), sort_keys=True)
    assert all(json.dumps(build_job(task, settings, RunContext()), sort_keys=True) == first for _ in range(3))
    assert task.additional_env == {"A": "1"}
