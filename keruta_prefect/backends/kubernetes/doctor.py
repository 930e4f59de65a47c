"""`keruta-prefect doctor`: the seed's FAQ as checks, each printed ✓/✗ with the fix.

PERMISSIONS is the one list of what the backend does to the cluster: the doctor checks it with
SelfSubjectAccessReviews, deployments/rbac.yaml grants exactly it, and a test compares both with the
calls the backend really makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kubernetes.client

from keruta_prefect.backends.base import BackendError
from keruta_prefect.backends.kubernetes.api import Forbidden, KubeError, NotFound, dry_run_create, request
from keruta_prefect.backends.kubernetes.client import connection
from keruta_prefect.manifest import build_job
from keruta_prefect.models import RunContext, Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.validation import check_image

# (API group, resource, subresource, verb): what keruta-prefect's Kubernetes backend calls.
PERMISSIONS: list[tuple[str, str, str | None, str]] = [
    ("batch", "jobs", None, "create"),
    ("batch", "jobs", None, "get"),
    ("batch", "jobs", None, "list"),
    ("batch", "jobs", None, "delete"),
    ("", "pods", None, "list"),
    ("", "pods", None, "watch"),
    ("", "pods", None, "delete"),  # the reconciler: a Pod whose Job is gone
    ("", "pods", "log", "get"),
    ("", "pods", "exec", "create"),  # artifact collection (keruta.artifacts.mode=exec)
    ("", "persistentvolumeclaims", None, "create"),
    ("", "persistentvolumeclaims", None, "list"),  # the reconciler: volumes of finished task trees
    ("", "persistentvolumeclaims", None, "delete"),
]
# The doctor's own look at the token Secret (restricted to that one Secret in the Role).
SECRET_PERMISSION = ("", "secrets", None, "get")


@dataclass
class Check:
    ok: bool
    text: str
    fix: str = ""

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.text}" + (f"\n    fix: {self.fix}" if not self.ok and self.fix else "")



def run_checks(settings: KerutaSettings, namespace: str | None = None,
               emit: Callable[[Check], None] | None = None) -> list[Check]:
    namespace = namespace or settings.default_namespace
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if emit is not None:
            emit(check)

    block = settings.credentials_block
    fix_block = f"edit the block {block!r} (its kubeconfig and context name: Prefect UI → Blocks)" if block else ""
    try:
        api, used = connection(settings)
    except BackendError as exc:
        add(Check(False, str(exc), fix_block or "set keruta.kubernetes.config-path / context, in-cluster=true in a "
                  "Pod, or credentials-block (a prefect-kubernetes block)"))
        return checks
    try:
        version = request(kubernetes.client.VersionApi(api).get_code, what="read the cluster's version")
        add(Check(True, f"cluster reachable at {api.configuration.host} (Kubernetes {version.get('gitVersion')}); "
                  f"connection: {used}"))
    except (KubeError, ValueError) as exc:
        raw = exc.__cause__ or exc  # the HTTP answer's reason, or the transport error's innermost reason
        cause = getattr(raw, "reason", None) or raw
        text = str(cause).split(": ", 1)[-1] if ": " in str(cause) else str(cause)
        add(Check(False, f"cannot reach the cluster at {api.configuration.host}: {text[:200]}; connection: {used}",
                  f"{fix_block} and check the network" if block else
                  "check the kubeconfig (keruta.kubernetes.config-path and context) and the network"))
        return checks

    sample = build_job(Task(id="keruta-doctor", title="doctor"), settings, RunContext())
    sample["metadata"]["namespace"] = namespace
    try:
        dry_run_create(api, sample, f"create Job {sample['metadata']['name']} in namespace {namespace} (dry run)")
        add(Check(True, f"namespace {namespace} exists and accepts agent Jobs (server-side dry run)"))
    except NotFound as exc:
        add(Check(False, f"namespace {namespace} does not exist ({exc.detail})",
                  f"kubectl create namespace {namespace}, or set keruta.kubernetes.default-namespace"))
    except Forbidden as exc:
        add(Check(False, f"cannot create Jobs in namespace {namespace}: {exc.detail}",
                  "kubectl apply -f deployments/rbac.yaml (and bind it to the account keruta-prefect uses)"))
    except KubeError as exc:
        add(Check(False, f"the cluster refuses the agent Job: {exc.answer}",
                  "keruta-prefect render --server-dry-run shows the manifest the cluster refuses"))

    authz = kubernetes.client.AuthorizationV1Api(api)
    for group, resource, subresource, verb in [*PERMISSIONS, SECRET_PERMISSION]:
        name = settings.token_secret_name if resource == "secrets" else None
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"namespace": namespace, "group": group, "resource": resource,
                                                  "verb": verb, **({"subresource": subresource} if subresource else {}),
                                                  **({"name": name} if name else {})}}}
        what = f"{verb} {resource}{'/' + subresource if subresource else ''}{'.' + group if group else ''}"
        try:
            answer = request(authz.create_self_subject_access_review, review, what=f"ask whether it may {what}")
            allowed = bool((answer.get("status") or {}).get("allowed"))
        except KubeError as exc:
            add(Check(False, f"cannot ask whether it may {what}: {exc.answer}"))
            continue
        add(Check(allowed, f"may {what} in {namespace}",
                  f"grant `{verb}` on `{resource}{'/' + subresource if subresource else ''}`: "
                  "kubectl apply -f deployments/rbac.yaml"))

    core = kubernetes.client.CoreV1Api(api)
    secret_name, key = settings.token_secret_name, settings.token_secret_key
    try:
        secret = request(core.read_namespaced_secret, secret_name, namespace,
                         what=f"read Secret {secret_name} in namespace {namespace}")
        keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
        if key in keys:
            add(Check(True, f"Secret {secret_name} has the key {key} (the agents' API token)"))
        else:
            add(Check(False, f"Secret {secret_name} has no key {key} (it has: {', '.join(sorted(keys)) or 'none'})",
                      f"kubectl create secret generic {secret_name} --from-literal={key}=<token> (or set "
                      "keruta.kubernetes.token-secret-key)"))
    except NotFound:
        add(Check(False, f"Secret {secret_name} not found in namespace {namespace}",
                  f"kubectl -n {namespace} create secret generic {secret_name} --from-literal={key}=<token>"))
    except KubeError as exc:
        add(Check(False, f"cannot read Secret {secret_name}: {exc.answer}"))

    image = settings.default_image
    try:
        check_image(image)
        valid = True
    except ValueError:
        valid = False
    if not valid:
        add(Check(False, f"default image {image!r} is not a valid image reference",
                  "set keruta.kubernetes.default-image, e.g. registry.example.com/keruta-agent:1.0"))
    else:
        pinned = not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1] or "@" in image)
        add(Check(True, f"default image {image} looks valid"
                  + ("" if pinned else " (not pinned to a version: runs may differ over time)")))
    return checks
