"""The agent contract, in one place (standard library only: keruta-agent imports it without Prefect).

What keruta-agent and the backends that run it agree on, and nothing else spells:

- :class:`ExitCode`: how the agent process ends (shell convention: 128 + N when killed by signal N);
- :class:`Reason`: the short, machine-readable cause recorded with an attempt (``reason`` of a run,
  ``errorCode`` of a task) and carried by the ``keruta.task.*`` events. **A stable contract**: values are
  only ever added, never renamed, so automations may match on them. A Kubernetes container or Job reason
  that keruta has no word of its own for is passed through as Kubernetes spells it;
- :class:`Env`: the environment variables the agent reads and the ones it gives the task's script;
- the files and log lines of the artifacts hand-over (``COLLECTED_MARKER``, ``READY_LINE``);
- :func:`outcome_from_exit`: the one mapping from an exit code to what it means for the task.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class TaskStatus(StrEnum):
    """A task's status, as the agent reports it (``PATCH /api/v1/tasks/{id}/status``) and as it is stored."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    WAITING_FOR_INPUT = "WAITING_FOR_INPUT"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class ExitCode(IntEnum):
    """keruta-agent's exit codes (documented in the README)."""

    OK = 0
    TASK_FAILED = 1  # the task's script failed (or could not be run); the agent reported it
    # permanent: bad configuration, or the API refused the agent for good (a Job's podFailurePolicy fails at once)
    CONFIG = 2
    API_UNREACHABLE = 3  # transient: the keruta API did not answer within the retry budget
    INTERNAL = 4  # a bug in the agent
    TERMINATED = 143  # 128 + SIGTERM: stopped (the Pod was deleted, the flow run was cancelled)


SIGNAL_BASE = 128  # an exit code above this is 128 + the number of the signal that killed the process


class Reason(StrEnum):
    """Why an attempt ended as it did. Stable: values are added, never renamed."""

    # reported by the agent (its errorCode)
    SCRIPT_FAILED = "SCRIPT_FAILED"  # the script failed; the agent's report usually names how (SCRIPT_EXIT_<n>)
    SCRIPT_NOT_RUNNABLE = "SCRIPT_NOT_RUNNABLE"
    TIMEOUT = "TIMEOUT"  # the script ran past the task's timeoutSeconds and was stopped
    # how the agent itself ended
    AGENT_CONFIG_ERROR = "AGENT_CONFIG_ERROR"
    API_UNREACHABLE = "API_UNREACHABLE"
    AGENT_ERROR = "AGENT_ERROR"
    TERMINATED = "TERMINATED"
    AGENT_KILLED = "AGENT_KILLED"  # killed by a signal other than SIGTERM; the message names the signal
    LOST = "LOST"  # the agent ended (or was gone) without reporting a final status
    # decided by the flow
    CANCELLED = "CANCELLED"
    BACKEND_ERROR = "BACKEND_ERROR"  # the backend could not follow the attempt
    WAIT_FAILED = "WAIT_FAILED"  # waiting failed unexpectedly (a bug): the agent was stopped
    WAIT_DEADLINE = "WAIT_DEADLINE"  # no end of the Job was seen within its deadline plus a margin
    # Kubernetes
    OOM_KILLED = "OOMKilled"
    INIT_FAILED = "INIT_FAILED"  # an init container (repository clone) failed
    JOB_DELETED = "JOB_DELETED"  # someone else deleted the Job before the task ended
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    INVALID_IMAGE_NAME = "InvalidImageName"
    JOB_FAILED = "JobFailed"


# The reasons that are Kubernetes' own words (a container's, a Pod condition's or a Job condition's
# reason), recorded as Kubernetes spells them; code that reads the Kubernetes API compares them as such.
KUBERNETES_REASONS = frozenset({Reason.OOM_KILLED, Reason.DEADLINE_EXCEEDED, Reason.UNSCHEDULABLE,
                                Reason.IMAGE_PULL_BACK_OFF, Reason.INVALID_IMAGE_NAME})


def script_exit_reason(code: int) -> str:
    """The agent's errorCode for a script that exited with ``code`` (a family of Reason.SCRIPT_FAILED)."""
    return f"SCRIPT_EXIT_{code}"


def script_killed_reason(signal_name: str) -> str:
    """The agent's errorCode for a script killed by a signal (``SIGKILL`` …)."""
    return f"SCRIPT_KILLED_{signal_name}"


class Env:
    """Environment variables of the agent contract (plain strings: they go into manifests as they are)."""

    # read by the agent
    TASK_ID = "KERUTA_TASK_ID"
    API_URL = "KERUTA_API_URL"
    API_TOKEN = "KERUTA_API_TOKEN"
    WORK_DIR = "KERUTA_WORK_DIR"
    ARTIFACTS_DIR = "KERUTA_ARTIFACTS_DIR"
    ARTIFACTS_MODE = "KERUTA_ARTIFACTS_MODE"
    HOLD_SECONDS = "KERUTA_HOLD_SECONDS"
    TIMEOUT = "KERUTA_TIMEOUT"
    LOG_LEVEL = "KERUTA_LOG_LEVEL"
    ECHO = "KERUTA_ECHO"
    API_RETRY_SECONDS = "KERUTA_API_RETRY_SECONDS"
    DEBUG = "KERUTA_DEBUG"  # 1/true/yes/on: an internal error's traceback goes to stderr too
    # Bytes. Set by the local backend only (it has no cgroup): the agent kills the script's process tree when
    # its RSS goes over it and reports FAILED with Reason.OOM_KILLED. Kubernetes never sets it (the cgroup does).
    MEMORY_LIMIT = "KERUTA_MEMORY_LIMIT"
    # given to the clone init container
    REPOSITORY_URL = "KERUTA_REPOSITORY_URL"
    REPOSITORY_REF = "KERUTA_REPOSITORY_REF"
    # given to the task's script (besides the agent's own TASK_ID, API_URL, API_TOKEN, WORK_DIR, ARTIFACTS_DIR)
    TASK_TITLE = "KERUTA_TASK_TITLE"
    TASK_DESCRIPTION = "KERUTA_TASK_DESCRIPTION"
    TASK_PRIORITY = "KERUTA_TASK_PRIORITY"
    TASK_STATUS = "KERUTA_TASK_STATUS"
    TASK_CREATED_AT = "KERUTA_TASK_CREATED_AT"
    TASK_UPDATED_AT = "KERUTA_TASK_UPDATED_AT"
    REPOSITORY_ID = "KERUTA_REPOSITORY_ID"
    DOCUMENT_ID = "KERUTA_DOCUMENT_ID"


class ArtifactsMode(StrEnum):
    """Values of Env.ARTIFACTS_MODE: how the task's files leave the agent's container."""

    EXEC = "exec"  # the agent holds its container; the flow copies the files out (pods/exec)
    UPLOAD = "upload"  # the agent uploads them to the keruta API before its final report
    OFF = "off"


class UsageKey:
    """The keys of ``usage``, what the agent measured of its script, sent with its final status
    (``PUT /api/v1/tasks/{id}/status``; the original API ignores it). camelCase, as models.Usage reads them."""

    FIELD = "usage"  # the status report's field that carries them
    CPU_SECONDS = "cpuSeconds"  # user + system CPU
    PEAK_MEMORY_BYTES = "peakMemoryBytes"  # the most memory held at once
    WALL_SECONDS = "wallSeconds"  # from the script's start to its end
    LOG_BYTES = "logBytes"  # bytes the script wrote to stdout and stderr
    SOURCE = "source"  # how it was measured: a UsageSource


class UsageSource(StrEnum):
    """How the agent measured its script (``usage.source``)."""

    CGROUP = "cgroup"  # cgroup v2 of the agent's own container (its figures include the agent itself)
    RUSAGE = "rusage"  # getrusage(RUSAGE_CHILDREN) and samples of the script's process tree in /proc


DEFAULT_WORK_DIR = "/work"  # the agent's work directory when neither Env.WORK_DIR nor a flag names one
DEFAULT_ARTIFACTS_DIR = "/.keruta/doc"  # likewise for Env.ARTIFACTS_DIR

ENV_PREFIX = "KERUTA_"  # everything of the contract starts with it (the local backend clears the rest)
PARAM_PREFIX = "KERUTA_PARAM_"  # a script parameter NAME reaches the script as KERUTA_PARAM_NAME

# The artifacts hand-over (exec mode): the agent logs READY_LINE and holds its container until
# COLLECTED_MARKER appears in its artifacts directory (the collector writes it after taking the files).
COLLECTED_MARKER = ".collected"
READY_LINE = "artifacts ready"
AGENT_LOG_PREFIX = "keruta-agent "  # the agent's own lines in its stderr: "keruta-agent LEVEL message"
READY_LOG_LINE = f"{AGENT_LOG_PREFIX}INFO {READY_LINE}"
# Under the work directory: the agent's own files.
AGENT_DIR = ".keruta"
AGENT_LOG = f"{AGENT_DIR}/agent.log"
SPOOL_FILE = f"{AGENT_DIR}/unsent-logs.jsonl"


@dataclass(frozen=True)
class ExitMeaning:
    """What an exit code says about the task, before the agent's own report is taken into account."""

    status: TaskStatus  # COMPLETED, FAILED or CANCELLED
    reason: Reason | None
    retryable: bool  # a system failure: a new attempt may succeed
    message: str


_MEANINGS = {
    ExitCode.OK: ExitMeaning(TaskStatus.COMPLETED, None, False, "the task completed"),
    ExitCode.TASK_FAILED: ExitMeaning(TaskStatus.FAILED, Reason.SCRIPT_FAILED, False, "the task's script failed"),
    ExitCode.CONFIG: ExitMeaning(
        TaskStatus.FAILED, Reason.AGENT_CONFIG_ERROR, False,
        "keruta-agent could not start the task (configuration error: token, task id or API URL); see its log"),
    ExitCode.API_UNREACHABLE: ExitMeaning(
        TaskStatus.FAILED, Reason.API_UNREACHABLE, True,
        "keruta-agent could not reach the keruta API (check keruta.kubernetes.api-url, the Service and the "
        "NetworkPolicy)"),
    ExitCode.INTERNAL: ExitMeaning(TaskStatus.FAILED, Reason.AGENT_ERROR, False,
                                   "keruta-agent hit an internal error; see its log"),
    ExitCode.TERMINATED: ExitMeaning(TaskStatus.CANCELLED, Reason.TERMINATED, False, "the agent was terminated"),
}


def exit_code_of_returncode(returncode: int) -> int:
    """A process' exit status as a shell (and Kubernetes) reports it: killed by signal N is 128 + N."""
    return SIGNAL_BASE - returncode if returncode < 0 else returncode


def killed_by(code: int) -> int | None:
    """The signal an exit code says the process was killed by (128 + N, N a signal this system has)."""
    try:
        return int(signal.Signals(code - SIGNAL_BASE)) if code > SIGNAL_BASE else None
    except ValueError:
        return None  # e.g. 255: a plain exit status, not a signal


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome_from_exit(code: int) -> ExitMeaning:
    """What keruta-agent's exit ``code`` (shell convention) means for the task."""
    try:
        return _MEANINGS[ExitCode(code)]
    except ValueError:
        pass
    if killed_by(code) is not None:
        return ExitMeaning(TaskStatus.FAILED, Reason.AGENT_KILLED, True,
                           f"keruta-agent was killed by {signal_name(code - SIGNAL_BASE)}")
    return ExitMeaning(TaskStatus.FAILED, Reason.AGENT_ERROR, False, f"keruta-agent exited with code {code}")


def exit_code_after_report(status: TaskStatus) -> ExitCode | None:
    """The code an agent exits with after reporting final ``status`` (when its exit status cannot be
    seen: it holds its files for collection, or it was not this process' child)."""
    return {TaskStatus.COMPLETED: ExitCode.OK, TaskStatus.FAILED: ExitCode.TASK_FAILED,
            TaskStatus.CANCELLED: ExitCode.TERMINATED}.get(status)
