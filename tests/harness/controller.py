"""The Job controller (and the garbage collector's part for Jobs): one Pod per Job with the standard labels
and owner references; Job conditions as Kubernetes >= 1.31 sets them (SuccessCriteriaMet/FailureTarget
before Complete/Failed); podFailurePolicy, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished;
Background, Foreground and Orphan deletion."""

from __future__ import annotations

import asyncio
import copy
import random
import string
from dataclasses import dataclass
from typing import Any

import kmock

from .common import JOBS, PODS, now_iso
from .kubelet import Kubelet
from .store import Store


@dataclass(frozen=True)
class Verdict:
    """What the controller does when a Pod of a Job failed: "fail" the Job (reason, message) or "retry"
    (a new Pod); ``counted``: the failure is added to the Job's `failed` count."""

    action: str
    reason: str = ""
    message: str = ""
    counted: bool = True


def job_finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def failed_pod_verdict(job: dict[str, Any], pod: dict[str, Any]) -> Verdict:
    """podFailurePolicy (FailJob on exit codes, Ignore on a disruption), then backoffLimit."""
    meta, status = pod["metadata"], pod["status"]
    rules = (job["spec"].get("podFailurePolicy") or {}).get("rules") or []
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
    codes = {c["name"]: (c.get("state") or {}).get("terminated", {}).get("exitCode")
             for c in status.get("containerStatuses") or []}
    for index, rule in enumerate(rules):
        on_codes = rule.get("onExitCodes")
        if on_codes and codes.get(on_codes.get("containerName", "main")) in on_codes["values"] \
                and rule["action"] == "FailJob":
            return Verdict("fail", "PodFailurePolicy",
                           f"Container {on_codes.get('containerName')} for pod {meta['namespace']}/{meta['name']} "
                           f"failed with exit code {codes.get(on_codes.get('containerName'))} matching "
                           f"FailJob rule at index {index}", counted=False)
        if rule.get("onPodConditions") and disrupted and rule["action"] == "Ignore":
            return Verdict("retry", counted=False)
    failed = int((job.get("status") or {}).get("failed") or 0) + 1
    if failed > int(job["spec"].get("backoffLimit", 6)):
        return Verdict("fail", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    return Verdict("retry")


class JobController:
    def __init__(self, store: Store, kubelet: Kubelet) -> None:
        self.store = store
        self.kubelet = kubelet
        self.finished_pods: set[tuple[str | None, str]] = set()
        store.listeners.append(self.react)

    def react(self, resource: kmock.resource, obj: dict[str, Any], kind: str) -> None:
        if resource == JOBS and kind == "ADDED":
            self.store.spawn(self._start_job(obj))
        elif resource == PODS and kind == "MODIFIED":
            phase = (obj.get("status") or {}).get("phase")
            key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
            if phase in ("Succeeded", "Failed") and key not in self.finished_pods:
                self.finished_pods.add(key)  # the controller reacts to a Pod's end once
                self.store.spawn(self._pod_finished(obj))

    def pods_of(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.store.labelled(PODS, namespace, "job-name", job)

    async def _start_job(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        await self.store.patch(JOBS, meta["namespace"], meta["name"], {"status": {"startTime": now_iso(),
                                                                                  "active": 1}})
        await self._new_pod(job)
        deadline = job["spec"].get("activeDeadlineSeconds")
        if deadline:
            self.store.spawn(self._deadline(meta["namespace"], meta["name"], float(deadline)))

    async def _new_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"]["template"])
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update({"batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"],
                       "batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"]})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{meta['name']}-{suffix}", "namespace": meta["namespace"], "labels": labels,
                         "annotations": template.get("metadata", {}).get("annotations") or {},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": template["spec"],
            "status": {"phase": "Pending", "conditions": []},
        }
        created = await self.store.put(PODS, pod)
        self.kubelet.admit(created)
        return created

    async def _deadline(self, namespace: str, name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        job = self.store.get(JOBS, namespace, name)
        if job is None or job_finished(job):
            return
        await self._fail_job(namespace, name, "DeadlineExceeded", "Job was active longer than specified deadline")
        self._delete_pods(namespace, name)

    async def _fail_job(self, namespace: str, name: str, reason: str, message: str) -> None:
        stamp = now_iso()
        job = self.store.get(JOBS, namespace, name) or {}
        conditions = list((job.get("status") or {}).get("conditions") or [])
        conditions += [{"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": stamp},
                       {"type": "Failed", "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": stamp}]
        await self.store.patch(JOBS, namespace, name, {"status": {"conditions": conditions, "active": 0}})
        self.store.spawn(self._ttl(namespace, name))

    async def _ttl(self, namespace: str, name: str) -> None:
        job = self.store.get(JOBS, namespace, name)
        ttl = (job or {}).get("spec", {}).get("ttlSecondsAfterFinished")
        if ttl is None or ttl > 600:
            return
        await asyncio.sleep(float(ttl))
        if self.store.get(JOBS, namespace, name) is not None:
            await self.delete_job(namespace, name)

    async def _pod_finished(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        job_name = meta.get("labels", {}).get("job-name")
        if not job_name or meta.get("deletionTimestamp"):
            return
        if pod["status"]["phase"] == "Failed" and not any(
                c.get("type") == "DisruptionTarget" for c in pod["status"].get("conditions") or []):
            await asyncio.sleep(0.05)  # an eviction marks the Pod before its container ends: see it whole
            pod = self.store.get(PODS, namespace, meta["name"]) or pod
        job = self.store.get(JOBS, namespace, job_name)
        if job is None or job_finished(job):
            return
        if pod["status"]["phase"] == "Succeeded":
            stamp = now_iso()
            await self.store.patch(JOBS, namespace, job_name, {"status": {
                "active": 0, "succeeded": 1, "completionTime": stamp,
                "conditions": [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                                "lastTransitionTime": stamp},
                               {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                "lastTransitionTime": stamp}]}})
            self.store.spawn(self._ttl(namespace, job_name))
            return
        verdict = failed_pod_verdict(job, pod)
        if verdict.counted:
            failed = int((job.get("status") or {}).get("failed") or 0) + 1
            await self.store.patch(JOBS, namespace, job_name, {"status": {"failed": failed}})
        if verdict.action == "fail":
            await self._fail_job(namespace, job_name, verdict.reason, verdict.message)
        else:
            await self._new_pod(job)

    # --- deletion ------------------------------------------------------------------------------------
    def _delete_pods(self, namespace: str, job: str) -> None:
        for pod in self.pods_of(namespace, job):
            self.store.spawn(self.kubelet.delete_pod(namespace, pod["metadata"]["name"]))

    async def delete_job(self, namespace: str, name: str, policy: str = "Background") -> None:
        """Delete the Job; its Pods go after it (Background), before it (Foreground) or stay (Orphan)."""
        if policy == "Foreground":
            await self.store.patch(JOBS, namespace, name, {"metadata": {
                "deletionTimestamp": now_iso(), "finalizers": ["foregroundDeletion"]}})
            self.store.spawn(self._foreground_delete(namespace, name))
            return
        await self.store.remove(JOBS, namespace, name)
        if policy != "Orphan":
            self._delete_pods(namespace, name)

    async def _foreground_delete(self, namespace: str, name: str) -> None:
        pods = self.pods_of(namespace, name)
        await asyncio.gather(*(self.kubelet.delete_pod(namespace, p["metadata"]["name"]) for p in pods))
        await self.store.remove(JOBS, namespace, name)
