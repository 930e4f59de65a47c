"""The official Kubernetes client, built once per cluster connection (not per call)."""

from __future__ import annotations

import threading

import kubernetes.client
import kubernetes.config
from kubernetes.config.config_exception import ConfigException

from keruta_prefect.backends.base import BackendError
from keruta_prefect.settings import KerutaSettings

# Connections one ApiClient keeps open to the API server: many tasks in one process share the client
# (their watches, log streams and requests run at once).
POOL_SIZE = 64
_clients: dict[tuple[bool, str | None, str | None], kubernetes.client.ApiClient] = {}
_lock = threading.Lock()
# For pods/exec only: kubernetes.stream.stream() swaps call_api on the ApiClient it is given for the length
# of the call. A client of its own keeps the shared client's concurrent requests (watches, logs) off the
# WebSocket; its lock keeps two exec calls from swapping at once. One per cluster connection, reused.
_exec_clients: dict[int, tuple[kubernetes.client.ApiClient, kubernetes.client.ApiClient, threading.Lock]] = {}


def disabled_message() -> str:
    return "Kubernetes integration is disabled (keruta.kubernetes.enabled=false)"


def api_client(settings: KerutaSettings) -> kubernetes.client.ApiClient:
    """The ApiClient for the settings' cluster connection; one per process and connection."""
    if not settings.enabled:
        raise BackendError(disabled_message())
    key = (settings.in_cluster, settings.config_path, settings.context)
    with _lock:
        found = _clients.get(key)
        if found is not None:
            return found
        configuration = kubernetes.client.Configuration()
        try:
            if settings.in_cluster:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            else:
                kubernetes.config.load_kube_config(config_file=settings.config_path, context=settings.context,
                                                   client_configuration=configuration)
        except (ConfigException, OSError, TypeError) as exc:
            where = "the in-cluster service account" if settings.in_cluster else (
                f"kubeconfig {settings.config_path or '$KUBECONFIG or ~/.kube/config'}"
                + (f" (context {settings.context})" if settings.context else ""))
            raise BackendError(f"cannot load the cluster connection from {where}: {exc}") from exc
        configuration.connection_pool_maxsize = POOL_SIZE
        client = kubernetes.client.ApiClient(configuration)
        _clients[key] = client
        return client


def exec_client(api: kubernetes.client.ApiClient) -> tuple[kubernetes.client.ApiClient, threading.Lock]:
    """The ApiClient (and the lock to hold around stream()) for exec calls on ``api``'s cluster."""
    with _lock:
        found = _exec_clients.get(id(api))
        if found is None or found[0] is not api:
            found = (api, kubernetes.client.ApiClient(api.configuration), threading.Lock())
            _exec_clients[id(api)] = found
        return found[1], found[2]
