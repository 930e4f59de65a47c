"""What every command of `keruta-prefect` shares: its exit codes, the one-line usage error, and the
checks of options, files and stored settings that run before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from keruta_prefect.errors import PermanentError
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings, load_properties_file
from keruta_prefect.validation import check_block_name

# The CLI's own exit codes (keruta-agent's are keruta_prefect.contract.ExitCode): a task that did not
# complete is 1, bad input 2, anything unexpected 4.
EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNEXPECTED = 0, 1, 2, 4


class UsageError(PermanentError):
    pass


def block_option(option: str, name: str) -> str:
    try:
        return check_block_name(name)
    except ValueError as exc:
        raise UsageError(f"{option}={name!r}: must be {exc}") from None


def in_range(option: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise UsageError(f"{option}={value}: must be between {low} and {high}")
    return value


def limit_option(name: str) -> str | None:
    """--concurrency-limit: '' for none, else a name Prefect accepts (checked by Prefect's own model)."""
    if not name:
        return None
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from pydantic import ValidationError

    try:
        GlobalConcurrencyLimitCreate(name=name, limit=1)
    except ValidationError as exc:
        raise UsageError(f"--concurrency-limit={name!r}: {exc.errors(include_url=False)[0]['msg']}") from None
    return name


def check_stored_settings(settings_block: str, properties: str | None = None, *, backend: str = "local") -> None:
    """Before a flow starts: the task database opens, the settings block (seeded on first use) is valid, and
    on the Kubernetes backend the credentials block it names (keruta.kubernetes.credentials-block) exists."""
    from keruta_prefect.blocks import load_settings
    from keruta_prefect.store import get_store

    block_option("--settings-block", settings_block)
    get_store()
    settings = load_settings(settings_block, properties=properties)
    if backend == "kubernetes" and settings.enabled and settings.credentials_block:
        from keruta_prefect.backends.kubernetes.connection import load_cluster_config

        load_cluster_config(settings.credentials_block)


def settings_from(path: str | None) -> KerutaSettings:
    warnings: list[str] = []
    settings = load_properties_file(path, warn=warnings) if path else KerutaSettings()
    for warning in warnings:
        print(f"keruta-prefect: warning: {warning}", file=sys.stderr)
    return settings


def task_file(path_text: str) -> Task:
    from keruta_prefect.models import parse_task_spec

    path = Path(path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--task-file={path_text!r}: {exc.strerror}") from None
    return parse_task_spec(data, source=str(path))


def at_least_one(**values: int) -> None:
    for name, value in values.items():
        in_range(f"--{name.replace('_', '-')}", value, 1, 1000)


def print_runs(runs: list[Any]) -> None:
    for run in runs:
        print(f"{run.status}\t{run.task_id}" + (f"\t{run.error}" if run.error else ""))
