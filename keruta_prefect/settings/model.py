"""The settings model: :class:`KerutaSettings`, one section class per concept (the cluster, the agent Job,
tasks, artifacts, the local backend), each field declared once with its property key, default and rule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from keruta_prefect.contract import DEFAULT_ARTIFACTS_DIR
from keruta_prefect.settings.values import (
    AccessMode,
    ByteSize,
    Factor,
    JsonList,
    OptionalStr,
    StrList,
    StrMap,
    setting,
)
from keruta_prefect.validation import check_block_name, check_dns_label, check_image, check_quantity

K = "keruta.kubernetes."
# The prefect-kubernetes block types a credentials block may be (their Prefect slugs); a bare name is the first.
CREDENTIALS_BLOCK_TYPES = ("kubernetes-credentials", "kubernetes-cluster-config")
# The ways to name the cluster connection, by field; at most one is given (a kubeconfig is the path and/or context).
_CONNECTION_SOURCES = {"config_path": "kubeconfig", "context": "kubeconfig", "in_cluster": "in-cluster",
                       "credentials_block": "block"}


def credentials_block_ref(value: str) -> tuple[str, str]:
    """``kubernetes-credentials/NAME``, ``kubernetes-cluster-config/NAME`` or ``NAME`` (= the first) as
    (block type slug, block document name); ValueError naming the forms."""
    slug, sep, name = value.rpartition("/")
    slug = slug or ("" if sep else CREDENTIALS_BLOCK_TYPES[0])  # "/NAME" names no type
    try:
        check_block_name(name)
    except ValueError:
        slug = ""
    if slug not in CREDENTIALS_BLOCK_TYPES:
        raise ValueError(f"must be {CREDENTIALS_BLOCK_TYPES[0]}/NAME, {CREDENTIALS_BLOCK_TYPES[1]}/NAME or NAME "
                         "(a prefect-kubernetes block; NAME: lowercase letters, digits and '-')")
    return slug, name


def connection_conflict(field: str, value: object, others: dict[str, Any]) -> str | None:
    """Why ``field`` set to ``value`` cannot go with the other connection settings already set, or None.

    Pure: ``others`` are the other fields' values (pydantic's ``info.data``: the fields before this one
    while the model is built, all the others on assignment)."""
    if not value:
        return None
    mine = _CONNECTION_SOURCES[field]
    for other, source in _CONNECTION_SOURCES.items():
        if other != field and source != mine and others.get(other):
            shown = "true" if others[other] is True else repr(others[other])
            return (f"{K}{other.replace('_', '-')}={shown} is a second cluster connection; keep one (a kubeconfig "
                    "and its context, in-cluster, or a credentials block)")
    return None


class ClusterSettings(BaseModel):
    """The seed's and the original admin screen's keys: the cluster connection, the API, the defaults."""

    enabled: bool = setting(K + "enabled", "Kubernetes integration on or off", True)
    config_path: OptionalStr = setting(
        K + "config-path", "kubeconfig file; empty means $KUBECONFIG or ~/.kube/config", None
    )
    in_cluster: bool = setting(K + "in-cluster", "use the Pod's service account instead of a kubeconfig", False)
    context: OptionalStr = setting(K + "context", "kubeconfig context; empty means the current one", None)
    credentials_block: OptionalStr = setting(
        K + "credentials-block",
        "prefect-kubernetes block as the cluster connection: [kubernetes-credentials/]NAME or "
        "kubernetes-cluster-config/NAME; empty: none",
        None,
        examples=["kubernetes-credentials/my-cluster"],
    )
    default_namespace: str = setting(K + "default-namespace", "namespace for Jobs of tasks that name none", "default")
    api_url: str = setting(K + "api-url", "keruta API base URL as agent Pods reach it", "http://keruta-api:8080")
    api_port: int = setting(K + "api-port", "port `keruta-prefect api` listens on", 8080, ge=1, le=65535)
    default_image: str = setting(K + "default-image", "agent image for tasks that name none", "keruta-agent:latest")
    default_pvc_storage_size: str = setting(
        K + "default-pvc-storage-size", "size of a repository task's volume", "1Gi"
    )
    default_pvc_access_mode: AccessMode = setting(
        K + "default-pvc-access-mode", "access mode of a repository task's volume", "ReadWriteOnce"
    )
    default_pvc_storage_class: OptionalStr = setting(
        K + "default-pvc-storage-class", "storage class of task volumes; empty means the cluster default", None
    )

    @field_validator("default_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_dns_label(value)

    @field_validator("credentials_block")
    @classmethod
    def _credentials_block(cls, value: str | None) -> str | None:
        if value is not None:
            credentials_block_ref(value)
        return value

    @field_validator("config_path", "in_cluster", "context", "credentials_block", mode="after")
    @classmethod
    def _one_connection(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        conflict = connection_conflict(info.field_name, value, dict(info.data))
        if conflict:
            raise ValueError(conflict)
        return value

    @field_validator("default_image")
    @classmethod
    def _default_image(cls, value: str) -> str:
        return check_image(value)

    @field_validator("default_pvc_storage_size")
    @classmethod
    def _pvc_size(cls, value: str) -> str:
        return check_quantity(value)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) < 8 or " " in value:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class JobSettings(BaseModel):
    """What the agent Job needs beyond the original: pulling, identity, resources, placement, lifetimes."""

    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = setting(
        K + "image-pull-policy", "pull policy of the agent container", "IfNotPresent"
    )
    image_pull_secrets: StrList = setting(
        K + "image-pull-secrets", "comma-separated Secret names for private registries", []
    )
    service_account: OptionalStr = setting(
        K + "service-account", "service account of agent Pods; empty means the namespace default", None
    )
    token_secret_name: str = setting(
        K + "token-secret-name", "Secret holding the keruta API token for agents", "keruta-api-token"
    )
    token_secret_key: str = setting(K + "token-secret-key", "key of the token in that Secret", "token")
    default_cpu_request: OptionalStr = setting(K + "default-cpu-request", "agent CPU request; empty: none", "100m")
    default_memory_request: OptionalStr = setting(
        K + "default-memory-request", "agent memory request; empty: none", "128Mi"
    )
    default_cpu_limit: OptionalStr = setting(K + "default-cpu-limit", "agent CPU limit; empty: none", None)
    default_memory_limit: OptionalStr = setting(
        K + "default-memory-limit", "agent memory limit; empty: none", "1Gi"
    )
    node_selector: StrMap = setting(K + "node-selector", "node selector for agent Pods, as k=v,k2=v2", {})
    tolerations: JsonList = setting(K + "tolerations", "tolerations of agent Pods, as a JSON list", [])
    git_image: str = setting(K + "git-image", "image of the init container that clones a task's repository",
                          "alpine/git:2.47.2")
    image_pull_grace_seconds: int = setting(
        K + "image-pull-grace-seconds", "seconds an image may fail to pull before the task fails", 30, ge=0
    )
    ttl_seconds_after_finished: int = setting(
        K + "ttl-seconds-after-finished", "seconds a finished Job is kept before Kubernetes deletes it", 3600,
        ge=0,
    )
    backoff_limit: int = setting(K + "backoff-limit", "Job-level Pod retries (retries belong to Prefect)", 0, ge=0)
    description_env_limit: int = setting(
        K + "description-env-limit",
        "bytes of the description put in KERUTA_TASK_DESCRIPTION (the agent can fetch the rest)",
        4096,
        ge=64,
    )
    pvc_retention: Literal["delete", "keep"] = setting(
        K + "pvc-retention", "delete a task tree's volume when its root task ends, or keep it", "delete"
    )

    @field_validator("git_image")
    @classmethod
    def _git_image(cls, value: str) -> str:
        return check_image(value)

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for item in value:
            if not isinstance(item, dict) or not set(item) <= allowed:
                raise ValueError(f"each toleration is an object with keys from {sorted(allowed)}")
        return value

    @field_validator("default_cpu_request", "default_memory_request", "default_cpu_limit", "default_memory_limit")
    @classmethod
    def _resources(cls, value: str | None) -> str | None:
        return None if value is None else check_quantity(value)

    @field_validator("image_pull_secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 253 or not name or not name.replace(".", "").replace("-", "").isalnum():
                raise ValueError(f"{name!r} is not a valid Secret name")
        return value


class TaskSettings(BaseModel):
    """Tasks and the dispatcher: timeouts, attempts and what a new attempt changes, delays, the concurrency
    limit."""

    task_default_timeout: int = setting(
        "keruta.task.default-timeout", "seconds a task may run when it sets no timeout", 3600, ge=1
    )
    task_max_attempts: int = setting(
        "keruta.task.max-attempts", "attempts per task when an attempt fails for a system reason", 3, ge=1
    )
    # Retry by failure class (keruta_prefect/retries.py): a system failure or an eviction is retried as it
    # was; these say what an attempt killed for memory or stopped at its deadline is retried with.
    task_retry_oom_memory_factor: Factor = setting(
        "keruta.task.retry.oom-memory-factor",
        "an attempt killed for memory (OOMKilled) is retried with its memory limit and request times this; "
        "off: not retried", 2,
    )
    task_retry_max_memory: str = setting(
        "keruta.task.retry.max-memory",
        "the most memory a retry after OOMKilled gives (one attempt at it, then the task fails)", "8Gi",
    )
    task_retry_deadline_factor: Factor = setting(
        "keruta.task.retry.deadline-factor",
        "an attempt stopped at its timeout (TIMEOUT, DeadlineExceeded) is retried with the timeout times this; "
        "off: not retried", "off",
    )

    processing_delay_ms: int = setting(
        "keruta.task.processor.processing-delay",
        "milliseconds between dispatcher runs (keruta-dispatch follows it on its next run)", 5000, ge=100
    )
    processor_concurrency: int = setting(
        "keruta.task.processor.concurrency",
        "slots of the Prefect global concurrency limit `keruta-tasks` when it is created (then edit it in the UI)",
        10, ge=1, le=10000,
    )
    monitoring_delay_ms: int = setting(
        "keruta.task.processor.monitoring-delay", "milliseconds between monitor checks", 10000, ge=100
    )
    crash_loop_back_off_timeout_ms: int = setting(
        "keruta.task.processor.crash-loop-back-off-timeout",
        "milliseconds a Pod may stay in a crash/pull back-off before the task fails",
        300000,
        ge=0,
    )

    @field_validator("task_retry_max_memory")
    @classmethod
    def _retry_max_memory(cls, value: str) -> str:
        return check_quantity(value)


class ArtifactSettings(BaseModel):
    """How files leave the agent and where they are kept."""

    artifacts_mode: Literal["exec", "upload", "off"] = setting(
        "keruta.artifacts.mode", "how files leave the agent Pod: exec (tar), upload (HTTP) or off", "exec"
    )
    artifacts_dir: str = setting(
        "keruta.artifacts.dir", "directory the agent collects files from (KERUTA_ARTIFACTS_DIR)", DEFAULT_ARTIFACTS_DIR
    )
    artifacts_max_file_size: ByteSize = setting(
        "keruta.artifacts.max-file-size", "largest single artifact file kept", 100 * 2**20
    )
    artifacts_max_total_size: ByteSize = setting(
        "keruta.artifacts.max-total-size", "largest total of a task's artifacts kept", 2**30
    )
    artifacts_storage_root: OptionalStr = setting(
        "keruta.artifacts.storage-root", "where collected files are stored; empty: $KERUTA_HOME/artifacts", None
    )
    artifacts_hold_timeout: int = setting(
        "keruta.artifacts.hold-timeout", "seconds the agent keeps its Pod open for collection", 300, ge=0
    )

    @field_validator("artifacts_dir")
    @classmethod
    def _abs_dir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    # derived paths (never stored: they depend on the machine that runs the flow)
    def storage_root(self) -> Path:
        return Path(self.artifacts_storage_root) if self.artifacts_storage_root else keruta_home() / "artifacts"


class LocalSettings(BaseModel):
    """The local backend and the logs."""

    local_work_root: OptionalStr = setting(
        "keruta.local.work-root", "work directories of local runs; empty: $KERUTA_HOME/work", None
    )
    prefect_log_max_lines: int = setting(
        "keruta.logs.prefect-max-lines", "task log lines also sent to the Prefect run log (all are stored)",
        10000, ge=0,
    )

    def work_root(self) -> Path:
        return Path(self.local_work_root) if self.local_work_root else keruta_home() / "work"


class ReconcileSettings(BaseModel):
    """The reconciler (keruta-reconcile): what it leaves alone, and what it does with a lost task."""

    reconcile_grace_seconds: int = setting(
        "keruta.reconcile.grace-seconds",
        "seconds a Job, Pod, volume, agent or work directory is left alone after it was created (its run "
        "may not be recorded yet)",
        300, ge=0,
    )
    reconcile_lost_tasks: Literal["fail", "requeue"] = setting(
        "keruta.reconcile.lost-tasks",
        "a task whose attempt has no live Job, agent or flow run: fail (FAILED, reason LOST) or requeue (PENDING "
        "again, within keruta.task.max-attempts)",
        "fail",
    )


# pydantic orders the fields of a class with several bases from the last base to the first: the sections are
# listed in reverse, so that the fields (the Prefect block's form, `settings show`, the README table, the
# properties file) are in the order of the sections above. Every validator of the sections has a name of its
# own: pydantic keeps one validator per name (tests/test_settings_sections.py checks both).
class KerutaSettings(ReconcileSettings, LocalSettings, ArtifactSettings, TaskSettings, JobSettings, ClusterSettings):
    """Everything keruta-prefect needs to build and run agent Jobs. Secrets live elsewhere."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")


def keruta_home() -> Path:
    return Path(os.environ.get("KERUTA_HOME") or Path.home() / ".keruta").expanduser()

