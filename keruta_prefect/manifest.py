"""Pure builders of what a task's agent process/container is given. No I/O.

`task_env` is shared by the local backend (subprocess environment) and the Kubernetes Job builder,
so a task sees the same KERUTA_* variables wherever it runs.
"""

from __future__ import annotations

from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings

TRUNCATION_MARKER = "…[truncated; full text: GET /api/v1/tasks/{id}]"


def truncate_utf8(text: str, limit: int, marker: str = TRUNCATION_MARKER) -> str:
    """At most ``limit`` UTF-8 bytes, cut on a character boundary, with a visible marker when cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    room = max(0, limit - len(marker.encode("utf-8")))
    # errors="ignore" drops a multi-byte character cut in half at the end.
    return data[:room].decode("utf-8", errors="ignore") + marker


def task_env(task: Task, settings: KerutaSettings) -> dict[str, str]:
    """The KERUTA_TASK_* variables (the original's mapping), then the task's additionalEnv.

    The API URL and token are not here: the caller adds them the way its runtime needs
    (a literal locally; a secretKeyRef in a Job, so the token never appears in a manifest).
    """
    marker = TRUNCATION_MARKER.replace("{id}", task.id)
    env = {
        "KERUTA_TASK_ID": task.id,
        "KERUTA_TASK_TITLE": truncate_utf8(task.title, settings.description_env_limit, marker),
        "KERUTA_TASK_DESCRIPTION": truncate_utf8(task.description, settings.description_env_limit, marker),
        "KERUTA_TASK_PRIORITY": str(task.priority),
        "KERUTA_TASK_STATUS": str(task.status),
        "KERUTA_TASK_CREATED_AT": task.created_at.isoformat(),
        "KERUTA_TASK_UPDATED_AT": task.updated_at.isoformat(),
    }
    if task.repository_id:
        env["KERUTA_REPOSITORY_ID"] = task.repository_id
    if task.documents:
        env["KERUTA_DOCUMENT_ID"] = task.documents[0]
    env.update(task.additional_env)
    return env
