"""collect() in exec mode: tar the agent's artifacts directory out of its holding container, then let
the agent go (it exits and the Job completes). Never raises: whatever prevents it is recorded as
"artifacts lost: <reason>"; the task's status stays as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from keruta_prefect import contract
from keruta_prefect.artifacts import ArchiveRejected, CollectResult
from keruta_prefect.backends.base import RunHandle
from keruta_prefect.backends.kubernetes.context import Kube
from keruta_prefect.backends.kubernetes.exec import ArtifactsLost, ContainerGone, collect_directory, release
from keruta_prefect.backends.kubernetes.watch import subscribe
from keruta_prefect.contract import ArtifactsMode

log = logging.getLogger("keruta.kubernetes")


def collect(kube: Kube, handle: RunHandle, dest: Path) -> CollectResult:
    """The artifacts by keruta.artifacts.mode: upload (the agent sent them), exec (fetched here), or none."""
    if kube.settings.artifacts_mode == ArtifactsMode.UPLOAD.value:
        return CollectResult(uploaded=True)  # the agent sent them to the keruta API, which recorded them
    if kube.settings.artifacts_mode != ArtifactsMode.EXEC.value:
        return CollectResult()
    try:
        return _collect(kube, handle, dest)
    except Exception as exc:  # a bug, or something nobody foresaw: still one line, and the flow goes on
        log.error("collecting the files of Job %s failed unexpectedly", handle.name, exc_info=True)
        return CollectResult(lost=f"artifacts lost: unexpected {type(exc).__name__} while collecting: {exc}")


def _collect(kube: Kube, handle: RunHandle, dest: Path) -> CollectResult:
    gone = CollectResult(lost="artifacts lost: the agent's Pod is gone or its container has stopped "
                              "(was keruta.artifacts.hold-timeout too short?)")
    pod = holding_pod(kube, handle)
    if pod is None:
        return gone
    settings = kube.settings
    try:
        result = collect_directory(kube.api, handle.namespace or "", pod, settings.artifacts_dir, dest,
                                   max_file_size=settings.artifacts_max_file_size,
                                   max_total_size=settings.artifacts_max_total_size,
                                   timeout=kube.tuning.exec_read_timeout)
    except ContainerGone:  # it stopped just now, before the watch said so: nothing to release either
        return gone
    except (ArtifactsLost, ArchiveRejected) as exc:
        result = CollectResult(lost=f"artifacts lost: {exc}")
    except OSError as exc:
        result = CollectResult(lost=f"artifacts lost: cannot write them under {dest}: {exc}")
    except Exception:
        release_holder(kube, handle, pod)
        raise  # collect() turns it into a reason naming its type
    release_holder(kube, handle, pod)
    return result


def release_holder(kube: Kube, handle: RunHandle, pod: str) -> None:
    """Let the holding agent go (it exits and the Job completes); a failure is logged, never raised."""
    marker = f"{kube.settings.artifacts_dir}/{contract.COLLECTED_MARKER}"
    problem = release(kube.api, handle.namespace or "", pod, marker, kube.tuning.exec_read_timeout)
    if problem is not None:
        log.warning("the agent of Pod %s was not released (%s); it exits when its hold timeout passes",
                    pod, problem)


def holding_pod(kube: Kube, handle: RunHandle) -> str | None:
    """The newest Pod of the attempt whose main container runs (the agent holding its files)."""
    subscription = subscribe(kube.api, handle.namespace or "", kube.tuning, handle.name, listen=False)
    try:
        for pod in sorted(subscription.pods(), key=lambda p: p["metadata"].get("creationTimestamp", ""),
                          reverse=True):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                if status.get("name") == "main" and "running" in (status.get("state") or {}):
                    return str(pod["metadata"]["name"])
    finally:
        subscription.close()
    return None
