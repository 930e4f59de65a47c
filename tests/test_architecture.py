"""The agent contract is spelled in one module, and both backends turn the same exit facts into the same
outcome (issue: architecture)."""

from __future__ import annotations

import ast
import signal
from pathlib import Path
from typing import Any

import pytest

from keruta_prefect import contract
from keruta_prefect.backends.kubernetes.diagnose import diagnose
from keruta_prefect.backends.local import exit_facts
from keruta_prefect.logfeed import FEED
from keruta_prefect.models import Task, TaskStatus
from keruta_prefect.outcomes import AgentReport, outcome_of
from keruta_prefect.store import LogLine, Store

PACKAGE = Path(__file__).resolve().parents[1] / "keruta_prefect"

# Words of the contract no other module may spell: reasons, env names, markers.
CONTRACT_WORDS = (
    {str(reason) for reason in contract.Reason if reason not in contract.KUBERNETES_REASONS}
    | {value for name, value in vars(contract.Env).items() if name.isupper()}
    | {str(status) for status in contract.TaskStatus}
    | {contract.COLLECTED_MARKER, contract.READY_LINE, contract.READY_LOG_LINE, contract.SPOOL_FILE,
       contract.AGENT_LOG, contract.PARAM_PREFIX, contract.AGENT_LOG_PREFIX,
       contract.DEFAULT_WORK_DIR, contract.DEFAULT_ARTIFACTS_DIR}
)
# Kubernetes' own reasons (contract.KUBERNETES_REASONS) are compared as Kubernetes spells them where its
# API is read. Exit codes: any literal given as an Outcome's ``exit_code=``; in comparisons the agent's
# own codes (0 and 1 are every process' success and failure: tar's, the script's).
EXIT_NAMES = ("exit_code", "returncode", "code")
AGENT_ONLY_CODES = {int(code) for code in contract.ExitCode} - {0, 1}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants outside docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _exit_literals(tree: ast.AST) -> list[tuple[int, int]]:
    """Integer literals used as exit codes: ``exit_code=3``, ``code == 2``, ``returncode in (0, 1)``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "exit_code" and isinstance(node.value, ast.Constant) \
                and type(node.value.value) is int:
            found.append((node.value.lineno, node.value.value))
        if isinstance(node, ast.Compare):
            names = [n for n in (node.left, *node.comparators)
                     if isinstance(n, ast.Name | ast.Attribute)
                     and (n.id if isinstance(n, ast.Name) else n.attr) in EXIT_NAMES]
            if names:
                for side in (node.left, *node.comparators):
                    for const in ast.walk(side):
                        if isinstance(const, ast.Constant) and type(const.value) is int and (
                                const.value in AGENT_ONLY_CODES or const.value > contract.SIGNAL_BASE):
                            found.append((const.lineno, const.value))
    return found


def test_the_agent_contract_is_spelled_in_contract_py_only() -> None:
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "contract.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(PACKAGE.parent)
        stray += [f"{where}:{line}: {text!r}" for line, text in _strings(tree) if text in CONTRACT_WORDS]
        stray += [f"{where}:{line}: exit code {value}" for line, value in _exit_literals(tree)]
    assert not stray, "literals of the agent contract outside keruta_prefect/contract.py:\n" + "\n".join(stray)


def test_the_scan_finds_a_stray_literal(tmp_path: Path) -> None:
    """The check above can fail: it sees a reason, an env name and an exit code spelled out."""
    tree = ast.parse('def f(code):\n    """SCRIPT_FAILED in a docstring is fine"""\n'
                     '    if code == 3:\n        return Outcome(reason="SCRIPT_FAILED", exit_code=2)\n'
                     '    return os.environ["KERUTA_TASK_ID"]\n')
    found = sorted(text for _line, text in _strings(tree) if text in CONTRACT_WORDS)
    assert found == ["KERUTA_TASK_ID", "SCRIPT_FAILED"]
    assert sorted(value for _line, value in _exit_literals(tree)) == [2, 3]


# --- the same exit facts, the same outcome, on both backends -----------------------------------------

REPORTS = {
    "none": None,
    "completed": AgentReport(status=TaskStatus.COMPLETED, message="script exited with code 0 after 1.0s"),
    "failed": AgentReport(status=TaskStatus.FAILED, error_code="SCRIPT_EXIT_3", message="script exited with code 3"),
    "running": AgentReport(status=TaskStatus.IN_PROGRESS, message="keruta-agent started"),
}
# (exit status as a shell/Kubernetes reports it, the same as a local Popen returncode)
EXITS = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (143, -signal.SIGTERM), (137, -signal.SIGKILL), (9, 9),
         (130, -signal.SIGINT), (255, 255)]


def _pod_terminated(code: int) -> dict[str, Any]:
    return {"metadata": {"name": "job-x-abcde", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "main"}]},
            "status": {"containerStatuses": [{"name": "main", "state": {"terminated": {"exitCode": code}}}]}}


@pytest.mark.parametrize("report", sorted(REPORTS))
@pytest.mark.parametrize(("code", "returncode"), EXITS)
def test_both_backends_give_the_same_outcome_for_the_same_exit(code: int, returncode: int, report: str) -> None:
    stored = REPORTS[report]
    verdict = diagnose([_pod_terminated(code)], None, waited={}, image_pull_grace=60, unschedulable_grace=60)
    assert verdict.exit is not None
    on_kubernetes = outcome_of(verdict.exit, stored)
    on_local = outcome_of(exit_facts(returncode, None), stored)
    assert on_local == on_kubernetes
    assert on_local.exit_code == code
    expected = contract.outcome_from_exit(code)
    assert (on_local.status, on_local.retryable) == (expected.status, expected.retryable)


def test_an_exit_status_above_128_is_a_signal_only_when_it_names_one() -> None:
    killed = contract.outcome_from_exit(128 + signal.SIGKILL)
    assert (killed.reason, killed.retryable, "SIGKILL" in killed.message) == (contract.Reason.AGENT_KILLED, True, True)
    plain = contract.outcome_from_exit(255)  # exit(255) or exit(-1): no signal 127 exists
    assert (plain.reason, plain.retryable) == (contract.Reason.AGENT_ERROR, False)


def test_a_verdict_of_an_ended_agent_takes_the_agents_report_on_every_path() -> None:
    """The wait's deadline path included: the Job's last word with an exit is read with the report."""
    from keruta_prefect.backends.kubernetes.wait import settled

    verdict = diagnose([_pod_terminated(1)], None, waited={}, image_pull_grace=60, unschedulable_grace=60)
    outcome = settled(verdict, REPORTS["failed"])
    assert outcome is not None and (outcome.reason, outcome.message) == ("SCRIPT_EXIT_3", "script exited with code 3")
    unschedulable = diagnose([], {"status": {"conditions": [{"type": "Failed", "status": "True",
                                                             "reason": "DeadlineExceeded"}]}},
                             waited={}, image_pull_grace=60, unschedulable_grace=60)
    assert settled(unschedulable, REPORTS["failed"]) == unschedulable.outcome  # no exit: Kubernetes' word


def test_the_standard_library_modules_and_the_agent_load_what_they_say_in_a_fresh_interpreter() -> None:
    """lint-imports checks the source; this checks what really gets loaded."""
    import subprocess
    import sys

    code = ("import sys\n"
            "base = set(sys.modules)\n"
            "import keruta_prefect.contract, keruta_prefect.errors, keruta_prefect.backoff, keruta_prefect.logfeed\n"
            "leaves = {m.split('.')[0] for m in set(sys.modules) - base}\n"
            "print(sorted(leaves - set(sys.stdlib_module_names) - {'keruta_prefect'}))\n"
            "import keruta_prefect.agent.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'prefect_kubernetes', 'kubernetes', "
            "'sqlalchemy', 'sqlmodel', 'fastapi', 'starlette', 'uvicorn', 'yaml'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.splitlines()
    assert out == ["[]", "[]"], out


def test_an_exit_nobody_saw_is_the_agents_report_or_lost() -> None:
    """Local: an agent that was not this process' child; Kubernetes: an agent holding its files."""
    from keruta_prefect.outcomes import AgentExit

    local = exit_facts(1000, None)  # local.UNKNOWN_EXIT
    assert local == AgentExit(code=None)
    lost = outcome_of(local, REPORTS["running"])
    assert (lost.status, lost.reason, lost.retryable) == (TaskStatus.FAILED, contract.Reason.LOST, True)
    failed = outcome_of(local, REPORTS["failed"])
    assert (failed.status, failed.reason, failed.exit_code) == (TaskStatus.FAILED, "SCRIPT_EXIT_3", 1)
    done = outcome_of(local, REPORTS["completed"])
    assert (done.status, done.reason, done.exit_code) == (TaskStatus.COMPLETED, None, 0)


# --- log lines reach a waiting flow through the feed, not through one shared Store --------------------

def test_lines_stored_through_one_store_reach_a_follower_of_another_store_of_the_same_database(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'feed.db'}"
    api_side, flow_side = Store(url), Store(url)
    assert api_side is not flow_side
    api_side.create_task(Task(id="fed"))
    with FEED.follow(flow_side.database, "fed") as lines:
        stored = api_side.store_logs("fed", "agent", [LogLine(seq=1, level="INFO", message="hello")])
        FEED.publish(api_side.database, "fed", stored)
        again = api_side.store_logs("fed", "agent", [LogLine(seq=1, level="INFO", message="hello")])
        FEED.publish(api_side.database, "fed", again)  # a batch sent twice is stored and fed once
        assert [line.message for line in _drain(lines)] == ["hello"]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with FEED.follow(Store(other).database, "fed") as lines:
        FEED.publish(api_side.database, "fed", stored)
        assert _drain(lines) == []


def _drain(lines: Any) -> list[Any]:
    out = []
    while not lines.empty():
        out.append(lines.get_nowait())
    return out


# --- modules and classes small enough to read -----------------------------------------------------------

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 155


def test_no_module_or_class_of_the_package_is_too_long_to_read() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{where}: class {node.name}: {(node.end_lineno or 0) - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)
