"""The local backend (the embedded default): keruta-agent as a subprocess against an embedded keruta API.

The API runs in this process on a free loopback port with a token made for this process; the agent
reports to it over real HTTP exactly as it would from a Pod.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from keruta_prefect import contract
from keruta_prefect.api import ApiServer, create_app
from keruta_prefect.artifacts import CollectResult, attempt_dir, collect_with_tar
from keruta_prefect.backends.base import LogSink, Outcome, RunContext, RunHandle, agent_report
from keruta_prefect.logfeed import FEED, FedLine
from keruta_prefect.manifest import attempt_timeout, task_env
from keruta_prefect.models import Task, overlay
from keruta_prefect.outcomes import AgentExit, outcome_of
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store
from keruta_prefect.validation import parse_byte_size

EXIT_POLL_SECONDS = 0.02  # how often wait() looks whether the agent process has ended (lines come at once)
_embedded: dict[str, tuple[ApiServer, str]] = {}
_embedded_lock = threading.Lock()
# The agents this process started, by "task/attempt": the process and the embedded API it reports to.
_procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}


def embedded_api(store: Store, settings: KerutaSettings) -> tuple[ApiServer, str]:
    """One keruta API per process and database, started on first use: (server, token)."""
    key = str(store.engine.url)
    with _embedded_lock:
        found = _embedded.get(key)
        if found is None or not found[0].thread.is_alive():
            token = secrets.token_urlsafe(32)
            app = create_app(
                store, token, artifacts_root=settings.storage_root(),
                max_file_size=settings.artifacts_max_file_size, max_total_size=settings.artifacts_max_total_size,
            )
            found = (ApiServer(app).start(), token)
            _embedded[key] = found
        return found


class LocalBackend:
    name = "local"

    def __init__(self, settings: KerutaSettings, store: Store, *, grace_seconds: float = 2.0) -> None:
        self.settings = settings
        self.store = store
        self.grace_seconds = grace_seconds

    def launch(self, task: Task, ctx: RunContext) -> RunHandle:
        server, token = embedded_api(self.store, self.settings)
        work_dir = self._work_dir(task.id, ctx.attempt)
        (work_dir / contract.AGENT_DIR).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(contract.ENV_PREFIX)}
        env.update(task_env(task, self.settings))
        env.update({contract.Env.API_URL: server.url, contract.Env.API_TOKEN: token})
        env.update(task.additional_env)
        resources = overlay(task.resources, ctx.resources)
        timeout = attempt_timeout(task, self.settings, ctx)
        env.pop(contract.Env.MEMORY_LIMIT, None)  # only the attempt's own limit, enforced by the agent (no cgroup)
        if resources is not None and resources.memory_limit:
            env[contract.Env.MEMORY_LIMIT] = str(parse_byte_size(resources.memory_limit))
        command = [
            sys.executable, "-m", "keruta_prefect.agent", "run",
            "--task-id", task.id, "--api-url", server.url,
            "--work-dir", str(work_dir),
            "--artifacts-dir", str(self._artifacts_dir(work_dir)),
            "--timeout", str(timeout),
            "--grace", str(self.grace_seconds),
        ]
        agent_log = (work_dir / contract.AGENT_LOG).open("ab")
        try:
            proc = subprocess.Popen(command, env=env, cwd=work_dir, stdin=subprocess.DEVNULL,
                                    stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            agent_log.close()
        _procs[f"{task.id}/{ctx.attempt}"] = (proc, server.url)
        return RunHandle(backend=self.name, task_id=task.id, attempt=ctx.attempt, flow_run_id=ctx.flow_run_id,
                         name=work_dir.name, pid=proc.pid, resources=resources,
                         timeout_seconds=timeout)

    @staticmethod
    def _artifacts_dir(work_dir: Path) -> Path:
        return work_dir / contract.AGENT_DIR / "artifacts"

    def _work_dir(self, task_id: str, attempt: int) -> Path:
        """Derived from the task and attempt, so a flow that comes back to an attempt finds it again."""
        return attempt_dir(self.settings.work_root(), task_id, attempt)

    def wait(self, handle: RunHandle, on_log: LogSink | None = None) -> Outcome:
        proc, _api_url = _procs.get(f"{handle.task_id}/{handle.attempt}", (None, None))
        with FEED.follow(self.store.database, handle.task_id) as lines:
            while True:
                self._drain(lines, on_log)
                code = proc.poll() if proc is not None else _pid_exit(handle.pid)
                if code is not None:
                    break
                time.sleep(EXIT_POLL_SECONDS)
            self._drain(lines, on_log)
        return self._outcome(handle, code)

    @staticmethod
    def _drain(lines: queue.SimpleQueue[FedLine], on_log: LogSink | None) -> None:
        while True:
            try:
                row = lines.get_nowait()
            except queue.Empty:
                return
            if on_log is not None:
                on_log(row.level, row.message)

    def _outcome(self, handle: RunHandle, code: int) -> Outcome:
        agent_log = self._work_dir(handle.task_id, handle.attempt) / contract.AGENT_LOG
        facts = exit_facts(code, _last_line(agent_log))
        return outcome_of(facts, agent_report(self.store, handle.task_id))

    def collect(self, handle: RunHandle, dest: Path) -> CollectResult:
        """The work directory's artifacts, through the very path a Pod's take: a tar stream into the safe
        extractor (caps, checksums, hostile-entry rejection); files tar could not read are named, and a
        failing tar is recorded (see artifacts.collect_with_tar)."""
        source = self._artifacts_dir(self._work_dir(handle.task_id, handle.attempt))
        if not source.is_dir():
            return CollectResult()
        return collect_with_tar(source, dest, max_file_size=self.settings.artifacts_max_file_size,
                                max_total_size=self.settings.artifacts_max_total_size)

    def exists(self, handle: RunHandle) -> bool:
        """Is the attempt's agent still running (in this process or another)?"""
        return handle.pid is not None and handle.pid in session_processes(handle.pid)

    def can_reattach(self, handle: RunHandle) -> bool:
        """Only an agent this process started (and whose embedded API still serves it) can report here;
        one left by a flow process that died lost its API and token with it."""
        proc, api_url = _procs.get(f"{handle.task_id}/{handle.attempt}", (None, None))
        if proc is None or proc.pid != handle.pid:
            return False
        server, _token = embedded_api(self.store, self.settings)
        return api_url == server.url

    def cancel(self, handle: RunHandle) -> str | None:
        """Stop the agent and everything it started: SIGTERM to the agent (it stops the script
        gracefully and reports CANCELLED), then after the grace period SIGKILL to every process left in
        the agent's session — like a container's boundary, found without any in-memory handle.
        None when all are gone; else one line naming the processes that are still there."""
        if handle.pid is None:
            return None
        proc, _api_url = _procs.get(f"{handle.task_id}/{handle.attempt}", (None, None))
        try:
            os.kill(handle.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.grace_seconds + 3
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our own child, so it does not linger as a zombie
            if not session_processes(handle.pid):
                return None
            time.sleep(0.05)
        for pid in session_processes(handle.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while session_processes(handle.pid) and time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            time.sleep(0.05)
        left = session_processes(handle.pid)
        if left:
            return (f"processes {', '.join(map(str, left))} of agent {handle.pid} were still there 5 s after "
                    "SIGKILL")
        return None


    def attempts_of_flow_run(self, flow_run_id: str, namespaces: Iterable[str]) -> list[RunHandle]:
        """None beyond the run records (written right after launch): a local agent reports to the embedded
        API of the process that launched it, so one whose flow process died before recording it has lost
        its API and ends when its retry budget runs out."""
        return []

    def release_volume(self, task: Task, root_task_id: str) -> str | None:
        """Local attempts share no volume: a task tree's work directories stay with their attempts."""
        return None


def session_processes(session_id: int) -> list[int]:
    """Live (non-zombie) processes of a session, from /proc; on systems without /proc, the group."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(session_id, 0)
        except ProcessLookupError:
            return []
        return [session_id]
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session …; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            found.append(int(entry.name))
    return found


class AgentProcess(NamedTuple):
    """A keruta agent running on this machine, as its command line says (see LocalBackend.launch)."""

    pid: int
    task_id: str
    work_dir: Path
    started: float  # seconds since the epoch


def agent_processes(work_root: Path) -> list[AgentProcess]:
    """The keruta agents whose work directory is under ``work_root`` (from /proc; none without it)."""
    proc_root, root = Path("/proc"), work_root.resolve()
    try:
        boot = next(float(line.split()[1]) for line in (proc_root / "stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration):  # pragma: no cover - not Linux
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if "keruta_prefect.agent" not in args or "--work-dir" not in args or "--task-id" not in args:
            continue
        option = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        work_dir = Path(option["--work-dir"])
        if root not in work_dir.resolve().parents:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        found.append(AgentProcess(int(entry.name), option["--task-id"], work_dir, boot + int(fields[19]) / ticks))
    return found


UNKNOWN_EXIT = 1000  # the agent was not our child (another process launched it): no exit status


def exit_facts(returncode: int, agent_said: str | None) -> AgentExit:
    """What the local backend saw of an agent's end: its return code (negative: killed by that signal;
    UNKNOWN_EXIT: not our child, so not seen) and the last line of its own log."""
    if returncode == UNKNOWN_EXIT:
        return AgentExit(code=None, detail=agent_said)
    return AgentExit(code=contract.exit_code_of_returncode(returncode), detail=agent_said)


def _pid_exit(pid: int | None) -> int | None:
    """Exit status of a process that is not our child: None while it runs, else UNKNOWN_EXIT."""
    if pid is None or pid not in session_processes(pid):
        return UNKNOWN_EXIT
    return None


def _last_line(path: Path) -> str | None:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1][:500] if lines else None
