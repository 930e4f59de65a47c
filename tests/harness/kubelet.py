"""The kubelet of the cluster's one node: schedules a Pod if its requests fit, then runs its init and main
containers in order as local processes (volumes mapped to directories, env from Secrets), reports their
states as a real kubelet does, and stops them gracefully on deletion.

Node faults on demand: images that cannot be pulled, OOM kills, evictions, a finalizer that keeps a deleted
Pod. A container's ``resources.limits.memory`` is enforced as its cgroup would: the resident memory of its
processes is watched, and over the limit the container is killed (SIGKILL) and reported OOMKilled, exit code
137. In ``manual`` mode nothing runs: the test drives Pod status itself (see Cluster.run_pod)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from . import containers
from .common import PODS, SECRETS, now_iso
from .logs import Logs
from .store import Store
from .validate import image_problem


def pod_conditions(spec: dict[str, Any], status: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pod's conditions once its containers are as ``status`` says: the kubelet's Initialized,
    ContainersReady and Ready beside the scheduler's (and the eviction's) conditions."""
    def is_(value: bool) -> str:
        return "True" if value else "False"

    inits = {s["name"]: s for s in status.get("initContainerStatuses") or []}
    initialized = all(((inits.get(c["name"]) or {}).get("state") or {}).get("terminated", {}).get("exitCode") == 0
                      for c in spec.get("initContainers") or [])
    mains = {s["name"]: s for s in status.get("containerStatuses") or []}
    ready = initialized and all((mains.get(c["name"]) or {}).get("ready") for c in spec["containers"])
    kept = [c for c in status.get("conditions") or []
            if c.get("type") not in ("Initialized", "ContainersReady", "Ready")]
    return [*kept, {"type": "Initialized", "status": is_(initialized)},
            {"type": "ContainersReady", "status": is_(ready)}, {"type": "Ready", "status": is_(ready)}]


async def set_container(store: Store, namespace: str, pod: str, container: str, state: dict[str, Any], *,
                        init: bool = False, phase: str | None = None, extra: dict[str, Any] | None = None,
                        ready: bool = False) -> None:
    """Report a container's ``state`` in its Pod's status (and the Pod's ``phase``, ``extra`` fields)."""
    current = store.get(PODS, namespace, pod)
    if current is None:
        return
    key = "initContainerStatuses" if init else "containerStatuses"
    statuses = [s for s in (current.get("status") or {}).get(key) or [] if s["name"] != container]
    spec = next((c for c in current["spec"].get("initContainers" if init else "containers") or []
                 if c["name"] == container), {"image": ""})
    statuses.append({"name": container, "image": spec.get("image", ""), "imageID": "", "ready": ready,
                     "restartCount": 0, "started": "running" in state, "state": state})
    status: dict[str, Any] = {key: statuses}
    merged = {**(current.get("status") or {}), key: statuses}
    status["conditions"] = pod_conditions(current["spec"], merged)
    if phase:
        status["phase"] = phase
    if extra:
        status.update(extra)
    await store.patch(PODS, namespace, pod, {"status": status})


class Kubelet:
    def __init__(self, store: Store, logs: Logs, root: Path, mode: str = "run") -> None:
        self.store = store
        self.logs = logs
        self.root = root
        self.mode = mode  # "run": containers run as processes; "manual": the test drives Pod status
        self.node_cpu = 4.0
        self.node_memory = 16 * 2**30
        self.grace_seconds = 2.0
        self.memory_poll_seconds = 0.1  # how often containers' memory is compared with their limits (a /proc scan)
        self.limited: dict[tuple[str, str], tuple[asyncio.subprocess.Process, int]] = {}  # running, with a limit
        self._memory_watch: asyncio.Task[None] | None = None
        self.unpullable: set[str] = set()  # images whose pull fails
        self.git_remotes: dict[str, Path] = {}  # URL -> local bare repository
        self.processes: dict[tuple[str, str], asyncio.subprocess.Process] = {}  # (namespace, pod) -> running
        self.oom: set[tuple[str, str]] = set()  # (namespace, pod) whose container was OOM-killed
        self.stuck_pods: set[tuple[str, str]] = set()  # (namespace, pod): a finalizer keeps them after deletion

    def admit(self, pod: dict[str, Any]) -> None:
        """A new Pod is bound to this node."""
        if self.mode == "run":
            self.store.spawn(self.run_pod(pod))

    async def run_pod(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        spec = pod["spec"]
        unschedulable = containers.unschedulable(spec, self.node_cpu, self.node_memory)
        if unschedulable:
            await self.store.patch(PODS, namespace, name, {"status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}]}})
            return
        await self.store.patch(PODS, namespace, name, {"spec": {"nodeName": "harness-node"}, "status": {
            "conditions": [{"type": "PodScheduled", "status": "True"}], "startTime": now_iso()}})
        volumes = containers.volume_paths(self.root, namespace, name, spec)
        for init in spec.get("initContainers") or []:
            code = await self._run_container(namespace, name, init, volumes, init=True)
            if code is None:
                return
            if code != 0:
                await self.store.patch(PODS, namespace, name, {"status": {"phase": "Failed"}})
                return
        for container in spec["containers"]:
            code = await self._run_container(namespace, name, container, volumes, init=False)
            if code is None:
                return
            phase = "Succeeded" if code == 0 else "Failed"
            current = self.store.get(PODS, namespace, name)
            if current is not None and not current["metadata"].get("deletionTimestamp"):
                await self.store.patch(PODS, namespace, name, {"status": {"phase": phase}})

    async def _prepare(self, namespace: str, pod: str, container: dict[str, Any], *,
                       init: bool) -> dict[str, str] | None:
        """The container's environment once its image is pulled; None (and a waiting state) if it cannot be."""
        name, image = container["name"], container["image"]
        problem = image_problem(image)
        if problem is not None:
            await set_container(self.store, namespace, pod, name, {"waiting": {
                "reason": "InvalidImageName", "message": f'Failed to apply default image tag "{image}": couldn\'t '
                f'parse image name "{image}": {problem}'}}, init=init)
            return None
        if image in self.unpullable:
            await set_container(self.store, namespace, pod, name, {"waiting": {
                "reason": "ErrImagePull", "message": f'rpc error: code = NotFound desc = failed to pull and unpack '
                f'image "{image}": not found'}}, init=init)
            await asyncio.sleep(0.3)
            await set_container(self.store, namespace, pod, name, {"waiting": {
                "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}, init=init)
            return None
        env, why = containers.resolve_env(namespace, container, lambda secret: self.store.get(SECRETS, namespace,
                                                                                               secret))
        if env is None:
            await set_container(self.store, namespace, pod, name, {"waiting": {
                "reason": "CreateContainerConfigError", "message": why}}, init=init)
        return env

    async def _run_container(self, namespace: str, pod: str, container: dict[str, Any], volumes: dict[str, Path],
                             *, init: bool) -> int | None:
        """Run one container to its end; None when the Pod cannot proceed (pull or config error, deletion)."""
        env = await self._prepare(namespace, pod, container, init=init)
        if env is None:
            return None
        name = container["name"]
        mounts = containers.mounts_of(container, volumes)
        workdir = containers.localize(container.get("workingDir") or "/", mounts)
        if not Path(workdir).is_dir():
            workdir = str(self.root)
        started = now_iso()
        proc = await asyncio.create_subprocess_exec(
            *containers.command_of(container, env, mounts), env=containers.process_env(env, mounts, self.git_remotes),
            cwd=workdir, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.processes[(namespace, pod)] = proc
        limit = containers.memory_limit_of(container)
        if limit:
            self.limited[(namespace, pod)] = (proc, limit)
            if self._memory_watch is None or self._memory_watch.done():
                self._memory_watch = asyncio.create_task(self._enforce_memory())
        await set_container(self.store, namespace, pod, name, {"running": {"startedAt": started}}, init=init,
                                 phase=None if init else "Running", ready=not init)
        assert proc.stdout is not None
        while raw := await proc.stdout.readline():
            await self.logs.append(namespace, pod, name, raw.decode("utf-8", "replace").rstrip("\n"))
        code = await proc.wait()
        self.limited.pop((namespace, pod), None)
        self.processes.pop((namespace, pod), None)
        self.logs.finish(namespace, pod, name)
        oom = (namespace, pod) in self.oom
        exit_code = 137 if oom else (128 - code if code < 0 else code)
        reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        current = self.store.get(PODS, namespace, pod)
        if current is None:
            return None
        await set_container(self.store, namespace, pod, name, {"terminated": {
            "exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now_iso()}}, init=init)
        await self.store.notify()
        if current["metadata"].get("deletionTimestamp"):
            return None
        return exit_code

    async def _enforce_memory(self) -> None:
        """The memory cgroups' part, for every running container with a limit at once: one look at /proc (in a
        thread, so the API server goes on answering) per poll; a container whose processes hold more than its
        limit is ended by the kernel's OOM killer (SIGKILL) and reported OOMKilled. Ends when none is left."""
        while self.limited:
            totals = await asyncio.to_thread(containers.sessions_memory)
            for (namespace, pod), (proc, limit) in list(self.limited.items()):
                if proc.returncode is None and totals.get(proc.pid, 0) > limit:
                    self.limited.pop((namespace, pod), None)
                    self.oom_kill(namespace, pod)
            await asyncio.sleep(self.memory_poll_seconds)

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Graceful deletion: deletionTimestamp, SIGTERM, grace period, SIGKILL, then the Pod is gone."""
        if self.store.get(PODS, namespace, name) is None:
            return
        await self.store.patch(PODS, namespace, name, {"metadata": {
            "deletionTimestamp": now_iso(), "deletionGracePeriodSeconds": int(self.grace_seconds)}})
        if await self.stop_container(namespace, name):
            await asyncio.sleep(0.05)
        if (namespace, name) in self.stuck_pods:
            return  # a finalizer nobody removes: the Pod stays, marked for deletion
        await self.store.remove(PODS, namespace, name)

    async def stop_container(self, namespace: str, pod: str) -> bool:
        """What the kubelet does to stop a container: SIGTERM, the grace period, SIGKILL. False if none ran."""
        proc = self.processes.get((namespace, pod))
        if proc is None:
            return False
        containers.signal_container(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.grace_seconds)
        except TimeoutError:
            containers.signal_container(proc.pid, signal.SIGKILL)
            await proc.wait()
        return True

    def kill_all(self) -> None:
        for key, proc in list(self.processes.items()):
            containers.signal_container(proc.pid, signal.SIGKILL)
            self.processes.pop(key, None)

    # --- node faults ---------------------------------------------------------------------------------
    def oom_kill(self, namespace: str, pod: str) -> None:
        self.oom.add((namespace, pod))
        proc = self.processes.get((namespace, pod))
        if proc is not None:
            containers.signal_container(proc.pid, signal.SIGKILL)

    async def evict(self, namespace: str, pod: str) -> None:
        await self.store.patch(PODS, namespace, pod, {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
             "message": "Eviction API: evicting"}]}})
        await self.stop_container(namespace, pod)  # as on any deletion
        await set_container(self.store, namespace, pod, "main", {"terminated": {
            "exitCode": 137, "reason": "Error", "startedAt": now_iso(), "finishedAt": now_iso()}},
            phase="Failed", extra={"reason": "Evicted", "message": "The node was low on resource: memory."})

    def add_git_remote(self, url: str, files: dict[str, str]) -> Path:
        """A repository the clone init container can fetch `url` from (mapped with git's insteadOf)."""
        path = self.root / "git" / f"repo-{len(self.git_remotes)}"
        containers.bare_repository(path, files)
        self.git_remotes[url] = path
        return path
