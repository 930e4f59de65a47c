"""The official Kubernetes client, built once per cluster connection (not per call)."""

from __future__ import annotations

import threading
from collections.abc import Hashable

import kubernetes.client
from kubernetes.config.config_exception import ConfigException

from keruta_prefect.backends.base import BackendError
from keruta_prefect.backends.kubernetes.connection import source_of
from keruta_prefect.settings import KerutaSettings

# Connections one ApiClient keeps open to the API server: many tasks in one process share the client
# (their watches, log streams and requests run at once).
POOL_SIZE = 64
_clients: dict[tuple[Hashable, ...], tuple[kubernetes.client.ApiClient, str]] = {}
_lock = threading.Lock()
# For pods/exec only: kubernetes.stream.stream() swaps call_api on the ApiClient it is given for the length
# of the call. A client of its own keeps the shared client's concurrent requests (watches, logs) off the
# WebSocket; its lock keeps two exec calls from swapping at once. One per cluster connection, reused.
_exec_clients: dict[int, tuple[kubernetes.client.ApiClient, kubernetes.client.ApiClient, threading.Lock]] = {}


def disabled_message() -> str:
    return "Kubernetes integration is disabled (keruta.kubernetes.enabled=false)"


def api_client(settings: KerutaSettings) -> kubernetes.client.ApiClient:
    """The ApiClient for the settings' cluster connection; one per process and connection."""
    return connection(settings)[0]


def connection(settings: KerutaSettings) -> tuple[kubernetes.client.ApiClient, str]:
    """The ApiClient for the settings' cluster connection and what it was made from, in words (e.g.
    "credentials block 'prod' (context admin@prod)"). BackendError when disabled or the connection cannot be
    loaded; SettingsError when the credentials block it names is missing or invalid."""
    if not settings.enabled:
        raise BackendError(disabled_message())
    source = source_of(settings)  # with a credentials block: a request to Prefect, outside the lock
    with _lock:
        found = _clients.get(source.key)
        if found is not None:
            return found
        configuration = kubernetes.client.Configuration()
        try:
            used = source.load(configuration)
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise BackendError(f"cannot load the cluster connection from {source.where}: {exc}") from exc
        configuration.connection_pool_maxsize = POOL_SIZE
        _clients[source.key] = (kubernetes.client.ApiClient(configuration), used)
        return _clients[source.key]


def exec_client(api: kubernetes.client.ApiClient) -> tuple[kubernetes.client.ApiClient, threading.Lock]:
    """The ApiClient (and the lock to hold around stream()) for exec calls on ``api``'s cluster."""
    with _lock:
        found = _exec_clients.get(id(api))
        if found is None or found[0] is not api:
            found = (api, kubernetes.client.ApiClient(api.configuration), threading.Lock())
            _exec_clients[id(api)] = found
        return found[1], found[2]
