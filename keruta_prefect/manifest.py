"""Pure builders of what a task's agent runs in: its environment, its Job and its volume. No I/O.

`build_job(task, settings, ctx)` is a pure function: the same task, settings and context always give
the same manifest (golden-tested, and validated with kubernetes-validate for every supported
Kubernetes version). `task_env` is shared with the local backend, so a task sees the same KERUTA_*
variables wherever it runs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from keruta_prefect.contract import DEFAULT_WORK_DIR, ArtifactsMode, Env, ExitCode
from keruta_prefect.models import Resources, RunContext, Task, overlay
from keruta_prefect.settings import KerutaSettings

TRUNCATION_MARKER = "…[truncated; full text: GET /api/v1/tasks/{id}]"
CONTAINER = "main"
WORK_DIR = DEFAULT_WORK_DIR

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TASK = "keruta.io/task-id"
LABEL_FLOW_RUN = "keruta.io/flow-run-id"
LABEL_ATTEMPT = "keruta.io/attempt"
LABEL_CLONES = "keruta.io/clones-repository"
ANNOTATION_TASK = "keruta.io/task-id"
MANAGED_BY = "keruta-prefect"
SELECTOR = f"{LABEL_NAME}=keruta,{LABEL_MANAGED_BY}={MANAGED_BY}"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# The init container of repository tasks. Every value reaches it through the environment, never
# through the script text, so nothing a task says is ever parsed by a shell.
CLONE_SCRIPT = """set -eu
cd /work
if [ -e .git ] || [ -n "$(ls -A | grep -v '^lost+found$' || true)" ]; then
  echo "keruta: /work already holds files (a parent task's checkout); not cloning"
  exit 0
fi
git init -q .
git remote add origin "$KERUTA_REPOSITORY_URL"
if [ -n "${GIT_PASSWORD:-}" ]; then
  git config credential.helper '!f() { echo "username=${GIT_USERNAME:-git}"; echo "password=$GIT_PASSWORD"; }; f'
fi
git fetch -q --depth 1 origin "${KERUTA_REPOSITORY_REF:-HEAD}"
git checkout -q FETCH_HEAD
echo "keruta: cloned $KERUTA_REPOSITORY_URL at $(git rev-parse --short HEAD)"
"""


# The Job's activeDeadlineSeconds is the task's timeout + the artifacts hold + this margin: time for the
# Pod to be scheduled, its image pulled and the repository cloned before the agent's own clock starts.
DEADLINE_MARGIN_SECONDS = 300
# The user the agent and the clone run as (non-root; the agent image's user, deployments/agent/Dockerfile),
# also the group that owns the volumes (fsGroup) so both can write the work directory.
AGENT_UID = 1000
# The clone init container: a shallow git clone needs little CPU; the limit bounds a huge repository.
CLONE_RESOURCES: dict[str, dict[str, str]] = {"requests": {"cpu": "50m", "memory": "64Mi"},
                                              "limits": {"memory": "512Mi"}}


def _digest(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-")


def job_name(task_id: str, attempt: int) -> str:
    """`keruta-<slug>-<hash>-<attempt>`: a DNS-1123 label of at most 63 characters for any task id,
    deterministic (so a second launch of the same attempt finds the first) and unique per id."""
    suffix = f"-{_digest(task_id)}-{attempt}"
    slug = _slug(task_id, 63 - len("keruta-") - len(suffix)) or "task"
    return f"keruta-{slug}{suffix}"


def pvc_name(root_task_id: str) -> str:
    suffix = f"-{_digest(root_task_id)}"
    slug = _slug(root_task_id, 63 - len("keruta-ws-") - len(suffix)) or "task"
    return f"keruta-ws-{slug}{suffix}"


def label_value(text: str) -> str:
    """``text`` if it is a valid label value, else a readable prefix and a hash (still unique)."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    suffix = f"-{_digest(text)}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[: 63 - len(suffix)].strip("-_.")
    return f"{slug}{suffix}" if slug else suffix[1:]


SHORT_MARKERS = ("…[truncated]", "…")


def truncate_utf8(text: str, limit: int, marker: str = TRUNCATION_MARKER) -> str:
    """At most ``limit`` UTF-8 bytes, marker included, cut on a character boundary, with a visible marker
    when cut. A marker that does not fit (a long task id in it, or a tiny limit) gives way to a shorter
    one ("…[truncated]", then "…"), then to none."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    fitting = (m for m in (marker, *SHORT_MARKERS) if len(m.encode("utf-8")) <= limit)
    chosen = next(fitting, "")
    room = max(0, limit - len(chosen.encode("utf-8")))
    # errors="ignore" drops a multi-byte character cut in half at the end.
    return data[:room].decode("utf-8", errors="ignore") + chosen


def task_env(task: Task, settings: KerutaSettings) -> dict[str, str]:
    """The KERUTA_TASK_* variables (the original's mapping). Callers add the API URL and token the way
    their runtime needs (a literal locally; a secretKeyRef in a Job, so the token never appears in a
    manifest) and then the task's ``additional_env`` last, so it may refer to all of them."""
    marker = TRUNCATION_MARKER.replace("{id}", task.id)
    env = {
        Env.TASK_ID: task.id,
        Env.TASK_TITLE: truncate_utf8(task.title, settings.description_env_limit, marker),
        Env.TASK_DESCRIPTION: truncate_utf8(task.description, settings.description_env_limit, marker),
        Env.TASK_PRIORITY: str(task.priority),
        Env.TASK_STATUS: str(task.status),
        Env.TASK_CREATED_AT: task.created_at.isoformat(),
        Env.TASK_UPDATED_AT: task.updated_at.isoformat(),
    }
    if task.repository_id:
        env[Env.REPOSITORY_ID] = task.repository_id
    if task.documents:
        env[Env.DOCUMENT_ID] = task.documents[0]
    return env


def namespace_of(task: Task, settings: KerutaSettings) -> str:
    return task.namespace or settings.default_namespace


def needs_volume(task: Task, has_children: bool = False) -> bool:
    """Repository tasks and task trees share files on a volume; a lone script gets an emptyDir."""
    return bool(task.repository_url or task.parent_id or task.pvc_name or has_children)


def volume_claim_name(task: Task, ctx: RunContext) -> str:
    return task.pvc_name or pvc_name(ctx.root_task_id or task.id)


def labels(task: Task, ctx: RunContext) -> dict[str, str]:
    result = {
        LABEL_NAME: "keruta",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TASK: label_value(task.id),
        LABEL_ATTEMPT: str(ctx.attempt),
    }
    if ctx.flow_run_id:
        result[LABEL_FLOW_RUN] = label_value(ctx.flow_run_id)
    return result


def attempt_resources(task: Task, settings: KerutaSettings, ctx: RunContext) -> Resources:
    """The requests and limits an attempt's agent container gets: the attempt's own (a retry changed them),
    else the task's, else the settings' defaults, field by field."""
    own = overlay(task.resources, ctx.resources) or Resources()
    return Resources(cpu_request=own.cpu_request or settings.default_cpu_request,
                     memory_request=own.memory_request or settings.default_memory_request,
                     cpu_limit=own.cpu_limit or settings.default_cpu_limit,
                     memory_limit=own.memory_limit or settings.default_memory_limit)


def attempt_timeout(task: Task, settings: KerutaSettings, ctx: RunContext) -> int:
    """The seconds an attempt's script may run: the attempt's own (a retry gave it longer), else the task's,
    else the settings' default."""
    return ctx.timeout_seconds or task.timeout(settings.task_default_timeout)


def _resources(given: Resources) -> dict[str, dict[str, str]]:
    requests = {"cpu": given.cpu_request, "memory": given.memory_request}
    limits = {"cpu": given.cpu_limit, "memory": given.memory_limit}
    out = {}
    if any(requests.values()):
        out["requests"] = {k: v for k, v in requests.items() if v}
    if any(limits.values()):
        out["limits"] = {k: v for k, v in limits.items() if v}
    return out


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def _env_list(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def build_job(task: Task, settings: KerutaSettings, ctx: RunContext) -> dict[str, Any]:
    """The agent Job of one attempt of a task (a plain dict, ready for the API or YAML)."""
    job_labels = labels(task, ctx)
    timeout = attempt_timeout(task, settings, ctx)
    env = _env_list(task_env(task, settings))
    env += [
        {"name": Env.API_URL, "value": settings.api_url},
        {"name": Env.API_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": settings.token_secret_name, "key": settings.token_secret_key}}},
        {"name": Env.WORK_DIR, "value": WORK_DIR},
        {"name": Env.ARTIFACTS_DIR, "value": settings.artifacts_dir},
        {"name": Env.TIMEOUT, "value": str(timeout)},
        {"name": Env.ECHO, "value": "1"},  # script output also in the Pod log (the live view)
        {"name": Env.ARTIFACTS_MODE, "value": settings.artifacts_mode},
        # exec mode: the agent keeps the container until the flow has collected its files
        {"name": Env.HOLD_SECONDS,
         "value": str(settings.artifacts_hold_timeout if settings.artifacts_mode == ArtifactsMode.EXEC.value else 0)},
        {"name": "HOME", "value": WORK_DIR},
    ]
    env += _env_list(task.additional_env)  # last: $(KERUTA_…) references in these values resolve
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": task.image or settings.default_image,
        "imagePullPolicy": settings.image_pull_policy,
        # The seed's command: Kubernetes expands $(VAR) from the container's environment.
        "command": ["keruta-agent", "run", "--task-id", f"$({Env.TASK_ID})", "--api-url", f"$({Env.API_URL})"],
        "env": env,
        "workingDir": WORK_DIR,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "artifacts", "mountPath": settings.artifacts_dir},
        ],
    }
    resources = _resources(attempt_resources(task, settings, ctx))
    if resources:
        container["resources"] = resources

    volumes: list[dict[str, Any]] = [{"name": "artifacts", "emptyDir": {}}]
    if needs_volume(task, ctx.has_children):
        volumes.insert(0, {"name": "work", "persistentVolumeClaim": {"claimName": volume_claim_name(task, ctx)}})
    else:
        volumes.insert(0, {"name": "work", "emptyDir": {}})

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the agent talks to the keruta API, never to Kubernetes
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "fsGroup": AGENT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    pod_labels = dict(job_labels)
    if task.repository_url:
        pod_labels[LABEL_CLONES] = "true"  # the NetworkPolicy lets only these Pods reach git hosts
        pod_spec["initContainers"] = [_clone_container(task, settings)]
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(task.id, ctx.attempt),
            "namespace": namespace_of(task, settings),
            "labels": job_labels,
            "annotations": {ANNOTATION_TASK: task.id},
        },
        "spec": {
            "backoffLimit": settings.backoff_limit,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            # The agent enforces the task's timeout itself; this is the backstop (start-up, clone and
            # the artifact hold included).
            "activeDeadlineSeconds": timeout + settings.artifacts_hold_timeout + DEADLINE_MARGIN_SECONDS,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(ExitCode.CONFIG)]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {ANNOTATION_TASK: task.id}},
                "spec": pod_spec,
            },
        },
    }


def _clone_container(task: Task, settings: KerutaSettings) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": Env.REPOSITORY_URL, "value": task.repository_url or ""},
        {"name": Env.REPOSITORY_REF, "value": task.repository_ref or ""},
        {"name": "HOME", "value": "/tmp"},
    ]
    if task.repository_secret:
        for name, key in (("GIT_USERNAME", "username"), ("GIT_PASSWORD", "password")):
            env.append({"name": name, "valueFrom": {"secretKeyRef": {
                "name": task.repository_secret, "key": key, "optional": name == "GIT_USERNAME"}}})
    return {
        "name": "clone",
        "image": settings.git_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["/bin/sh", "-c", CLONE_SCRIPT],
        "env": env,
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "work", "mountPath": WORK_DIR}],
        "resources": {kind: dict(values) for kind, values in CLONE_RESOURCES.items()},
    }


def build_pvc(task: Task, settings: KerutaSettings, ctx: RunContext) -> dict[str, Any] | None:
    """The task tree's volume, or None when the task needs none or names an existing claim."""
    if not needs_volume(task, ctx.has_children) or task.pvc_name:
        return None
    root = ctx.root_task_id or task.id
    spec: dict[str, Any] = {
        "accessModes": [settings.default_pvc_access_mode],
        "resources": {"requests": {"storage": settings.default_pvc_storage_size}},
    }
    storage_class = task.storage_class or settings.default_pvc_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc_name(root),
            "namespace": namespace_of(task, settings),
            "labels": {LABEL_NAME: "keruta", LABEL_MANAGED_BY: MANAGED_BY, LABEL_TASK: label_value(root)},
            "annotations": {ANNOTATION_TASK: root},
        },
        "spec": spec,
    }
