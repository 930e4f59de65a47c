"""How an attempt ended, from the facts a backend saw and the agent's own report. Pure.

Backends do not decide outcomes of an agent's exit themselves: each gathers :class:`AgentExit` (the
exit code it saw, if any, and what else it knows), reads the task's stored report, and calls
:func:`outcome_of`. So the same exit facts give the same outcome on every backend.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from keruta_prefect.contract import SIGNAL_BASE, ExitCode, Reason, TaskStatus, exit_code_after_report, outcome_from_exit


class Outcome(BaseModel):
    """How an attempt ended. ``retryable`` marks system failures worth a new attempt."""

    status: TaskStatus
    exit_code: int | None = None
    reason: str | None = None  # a contract.Reason, the agent's errorCode, or a Kubernetes reason passed through
    message: str = ""  # what a person should know or do
    retryable: bool = False


class AgentExit(BaseModel):
    """What a backend saw of the agent's end."""

    model_config = ConfigDict(frozen=True)

    code: int | None  # shell convention (128 + N: killed by signal N); None: the exit status cannot be seen
    detail: str | None = None  # the agent's own last words, when the backend has them
    oom_killed: bool = False  # the kernel killed it for memory (a container's OOMKilled)
    memory_limit: str | None = None  # the memory limit it ran under, if known
    note: str | None = None  # added to the message in parentheses (e.g. the Job condition's reason)


class AgentReport(BaseModel):
    """What the agent reported to the keruta API, as stored with the task."""

    model_config = ConfigDict(frozen=True)

    status: TaskStatus
    error_code: str | None = None
    message: str | None = None


def outcome_of(facts: AgentExit, report: AgentReport | None) -> Outcome:
    """The attempt's outcome: the exit code's meaning (contract.outcome_from_exit), in the agent's own
    words where it reported them (why its script failed, how long it took)."""
    if facts.oom_killed:
        limit = f" (limit {facts.memory_limit})" if facts.memory_limit else ""
        outcome = Outcome(status=TaskStatus.FAILED, exit_code=facts.code, reason=Reason.OOM_KILLED,
                          message=f"the agent container ran out of memory{limit} and was killed; raise the task's "
                                  "resources.memoryLimit or keruta.kubernetes.default-memory-limit")
    elif facts.code is None:
        outcome = _reported(report)
    else:
        meaning = outcome_from_exit(facts.code)
        status = meaning.status
        reason: str | None = meaning.reason
        message = meaning.message
        if facts.code in (ExitCode.OK, ExitCode.TASK_FAILED) and report is not None:
            # The script's own end: the agent reported it (SCRIPT_EXIT_3, TIMEOUT…; how long it ran).
            reason = report.error_code or reason if status == TaskStatus.FAILED else None
            message = report.message or message
        elif facts.detail and status == TaskStatus.FAILED and facts.code <= SIGNAL_BASE:
            message = facts.detail  # the agent said why it stopped (a signal's victim says nothing)
        outcome = Outcome(status=status, exit_code=facts.code, reason=reason, message=message,
                          retryable=meaning.retryable)
    if facts.note:
        outcome = outcome.model_copy(update={"message": f"{outcome.message} ({facts.note})"})
    return outcome


def _reported(report: AgentReport | None) -> Outcome:
    """No exit status to see: the agent's final report stands; without one the attempt was lost."""
    if report is None or not report.status.terminal:
        return Outcome(status=TaskStatus.FAILED, reason=Reason.LOST, retryable=True,
                       message="keruta-agent ended without reporting a final status")
    code = exit_code_after_report(report.status)
    meaning = outcome_from_exit(code or ExitCode.TASK_FAILED)  # unchanged: COMPLETED falls back as before
    reason = None if report.status == TaskStatus.COMPLETED else report.error_code or meaning.reason
    return Outcome(status=report.status, exit_code=code, reason=reason, message=report.message or meaning.message)
