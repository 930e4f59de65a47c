"""What the kubelet makes of one container: its environment (values, `$(VAR)` references, Secret keys),
its command, its volumes as local directories, its resource requests; and the local processes that play
a container (signals reach its session, as a container runtime's do)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .validate import parse_quantity

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Images the harness runs as local programs: the command's first word, and what runs instead.
LOCAL_PROGRAMS = {"keruta-agent": [sys.executable, "-m", "keruta_prefect.agent"]}


def expand(text: str, env: dict[str, str]) -> str:
    """`$(VAR)` references to variables defined so far; unknown ones stay as written."""
    return _VAR_REF.sub(lambda m: env.get(m[1], m[0]), text)


def resolve_env(namespace: str, container: dict[str, Any],
                secret: Callable[[str], dict[str, Any] | None]) -> tuple[dict[str, str] | None, str]:
    """The container's environment, or (None, why) when the kubelet cannot start it (a missing Secret or
    key: CreateContainerConfigError). ``secret`` finds a Secret of the namespace by name."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            continue
        found = secret(ref["name"])
        if found is None:
            if ref.get("optional"):
                continue
            return None, f'secret "{ref["name"]}" not found'
        data = found.get("data") or {}
        if ref["key"] in data:
            env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif ref["key"] in (found.get("stringData") or {}):
            env[item["name"]] = found["stringData"][ref["key"]]
        elif not ref.get("optional"):
            return None, f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
    return env, ""


def localize(text: str, mounts: dict[str, Path]) -> str:
    """A path inside the container, as the local directory that plays its volume."""
    for mount, path in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if text == mount or text.startswith(mount + "/"):
            return str(path) + text[len(mount):]
    return text.replace("cd /work", f"cd {mounts.get('/work', '/work')}")


def volume_paths(root: Path, namespace: str, pod: str, spec: dict[str, Any]) -> dict[str, Path]:
    """Each volume of the Pod as a directory under ``root`` (a PVC's outlives the Pod)."""
    paths = {}
    for volume in spec.get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            path = root / "pvcs" / namespace / volume["persistentVolumeClaim"]["claimName"]
        else:
            path = root / "pods" / namespace / pod / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        paths[volume["name"]] = path
    return paths


def mounts_of(container: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Path]:
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or []}


def command_of(container: dict[str, Any], env: dict[str, str], mounts: dict[str, Path]) -> list[str]:
    command = [localize(expand(part, env), mounts)
               for part in (container.get("command") or []) + (container.get("args") or [])]
    if command and command[0] in LOCAL_PROGRAMS:
        command = [*LOCAL_PROGRAMS[command[0]], *command[1:]]
    return command


def process_env(env: dict[str, str], mounts: dict[str, Path], git_remotes: dict[str, Path]) -> dict[str, str]:
    """The local process' environment: the container's, paths localized, this Python's bin first on PATH,
    and git told to fetch each remote URL from its local repository."""
    out = {k: localize(v, mounts) for k, v in env.items()}
    out["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    if os.environ.get("PYTHONPATH"):  # this Python's import path too: a work tree's agent, not the installed one
        out.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
    for index, (url, path) in enumerate(git_remotes.items()):
        out[f"GIT_CONFIG_KEY_{index}"] = f"url.{path}.insteadOf"
        out[f"GIT_CONFIG_VALUE_{index}"] = url
    if git_remotes:
        out["GIT_CONFIG_COUNT"] = str(len(git_remotes))
    return out


def requests_of(spec: dict[str, Any]) -> tuple[float, float]:
    """The Pod's CPU and memory requests (the scheduler's view), summed over its containers."""
    cpu = memory = 0.0
    for container in spec["containers"]:
        requests = (container.get("resources") or {}).get("requests") or {}
        cpu += parse_quantity(requests.get("cpu", "0"))
        memory += parse_quantity(requests.get("memory", "0"))
    return cpu, memory


def unschedulable(spec: dict[str, Any], node_cpu: float, node_memory: float) -> str | None:
    """The scheduler's message when the Pod's requests do not fit the one node, or None."""
    cpu, memory = requests_of(spec)
    what = " ".join(w for w, over in (("Insufficient cpu.", cpu > node_cpu),
                                      ("Insufficient memory.", memory > node_memory)) if over)
    return f"0/1 nodes are available: 1 {what} preemption: 0/1 nodes are available: 1 No preemption victims " \
           "found for incoming pod." if what else None


def bare_repository(path: Path, files: dict[str, str]) -> None:
    """A bare git repository at ``path`` with one commit of ``files`` on `main`."""
    work = path.with_suffix(".work")
    work.mkdir(parents=True)
    for name, content in files.items():
        (work / name).write_text(content)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=work, check=True)
    subprocess.run([*git, "add", "."], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=work, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(path)], check=True)
    shutil.rmtree(work)


def session_processes(session_id: int) -> list[int]:
    """Live (non-zombie) processes of a session, from /proc; on systems without /proc, its leader."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():  # pragma: no cover - not Linux
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
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            found.append(int(entry.name))
    return found


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_limit_of(container: dict[str, Any]) -> int | None:
    """The container's ``resources.limits.memory`` in bytes, or None without one."""
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return int(parse_quantity(limit)) if limit is not None else None


def sessions_memory() -> dict[int, int]:
    """Resident memory of every session, by session id (a container's main process leads its session), as
    the memory cgroups would count their containers: one pass over /proc (RSS from /proc/PID/stat; empty on
    systems without /proc)."""
    totals: dict[int, int] = {}
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # pragma: no cover - not Linux
        return totals
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue  # it ended meanwhile
        # pid (comm) state ppid pgrp session … rss (field 24); comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2:].split()
        try:
            session, resident = int(fields[3]), int(fields[21])
        except (IndexError, ValueError):
            continue
        totals[session] = totals.get(session, 0) + resident * PAGE_SIZE
    return totals


def signal_container(pid: int, sig: int) -> None:
    """Signal the container whose main process is ``pid`` (a session leader): SIGTERM reaches its main
    process group (as the runtime sends it to PID 1); SIGKILL ends every process of its session, as a
    container's end does."""
    targets = session_processes(pid) if sig == signal.SIGKILL else [pid]
    for target in targets or [pid]:
        try:
            if target == pid:
                os.killpg(target, sig)
            else:
                os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass
