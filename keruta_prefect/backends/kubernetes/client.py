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
# of the call. Clients of their own keep the shared client's concurrent requests (watches, logs) off the
# WebSocket; each one's lock keeps two exec calls from swapping at once on it. A few per cluster connection,
# reused: many tasks collecting at once connect side by side instead of one after the other.
EXEC_CLIENTS = 8
ExecClient = tuple[kubernetes.client.ApiClient, threading.Lock]
_exec_clients: dict[int, tuple[kubernetes.client.ApiClient, list[ExecClient]]] = {}
_next_exec = 0


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


def exec_client(api: kubernetes.client.ApiClient) -> ExecClient:
    """An ApiClient (and the lock to hold around stream()) for an exec call on ``api``'s cluster: one not
    connecting at the moment if there is one, else the next in turn."""
    global _next_exec
    with _lock:
        found = _exec_clients.get(id(api))
        if found is None or found[0] is not api:
            found = (api, [(kubernetes.client.ApiClient(api.configuration), threading.Lock())
                           for _ in range(EXEC_CLIENTS)])
            _exec_clients[id(api)] = found
        pool = found[1]
        free = next((pair for pair in pool if not pair[1].locked()), None)
        if free is not None:
            return free
        _next_exec = (_next_exec + 1) % len(pool)
        return pool[_next_exec]
