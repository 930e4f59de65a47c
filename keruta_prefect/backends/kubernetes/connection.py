"""Where the cluster connection comes from: exactly one of a kubeconfig (`keruta.kubernetes.config-path` and/or
`context`), the Pod's service account (`in-cluster`), or a prefect-kubernetes block
(`keruta.kubernetes.credentials-block`) — the settings refuse two (``settings.model.connection_conflict``).

The block is the one Prefect users already keep for their workers: a ``KubernetesCredentials`` (a bare
``NAME`` or ``kubernetes-credentials/NAME``) or a ``KubernetesClusterConfig`` (``kubernetes-cluster-config/NAME``).
It is loaded by name through Prefect (``Block.load``: the block's own validation, its nested cluster config
resolved) each time a client is asked for, so an edit made in the Prefect UI applies from the next flow run;
the same content keeps the same client.

prefect-kubernetes builds its clients with kubernetes_asyncio: ``KubernetesClusterConfig.get_api_client`` and
``KubernetesCredentials.get_client`` are coroutines that make an asyncio ApiClient, which this backend's
synchronous calls and its watch and log threads cannot use. So the block's kubeconfig and context go into the
official synchronous client through the same loader call prefect-kubernetes makes
(``load_kube_config_from_dict(config_dict, context, client_configuration)``), and a ``KubernetesCredentials``
without a cluster config falls back as its ``get_client`` does: the in-cluster service account, else the
default kubeconfig.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.config.config_exception import ConfigException

from keruta_prefect.settings import FIELD_TO_KEY, KerutaSettings, SettingsError, credentials_block_ref
from keruta_prefect.validation import one_line

DEFAULT_KUBECONFIG = "$KUBECONFIG or ~/.kube/config"
IN_CLUSTER = "the in-cluster service account"
Loader = Callable[[kubernetes.client.Configuration], str]


@dataclass(frozen=True)
class Source:
    """One way to the cluster: ``key`` (the same key, the same ApiClient), ``where`` (what it is, for an error
    line), and ``load``, which fills a Configuration and says what it used (doctor's "connection: …" line)."""

    key: tuple[Hashable, ...]
    where: str
    load: Loader


def source_of(settings: KerutaSettings) -> Source:
    """The settings' cluster connection. With a credentials block this asks Prefect for the block:
    SettingsError (one line naming the setting and its value) when it is missing or does not validate."""
    if settings.credentials_block:
        return block_source(settings.credentials_block)
    if settings.in_cluster:
        return Source(("in-cluster",), IN_CLUSTER, _in_cluster)
    return kubeconfig_source(settings.config_path, settings.context)


def kubeconfig_source(path: str | None, context: str | None) -> Source:
    where = f"kubeconfig {path or DEFAULT_KUBECONFIG}" + (f" (context {context})" if context else "")

    def load(configuration: kubernetes.client.Configuration) -> str:
        kubernetes.config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        return f"kubeconfig {path or DEFAULT_KUBECONFIG} (context {context or _current_context(path)})"

    return Source(("kubeconfig", path, context), where, load)


def block_source(value: str) -> Source:
    label = f"credentials block {value!r}"
    cluster = load_cluster_config(value)
    if cluster is None:  # a KubernetesCredentials block without a cluster config: as prefect-kubernetes does
        def ambient(configuration: kubernetes.client.Configuration) -> str:
            try:
                return f"{label} (no cluster config: {_in_cluster(configuration)})"
            except ConfigException:
                loaded = kubeconfig_source(None, None).load(configuration)
                return f"{label} (no cluster config: {loaded})"

        return Source(("block", value, None, None), f"{label} (no cluster config)", ambient)
    config, context = cluster
    where = f"{label} (context {context})"

    def load(configuration: kubernetes.client.Configuration) -> str:
        kubernetes.config.load_kube_config_from_dict(config, context=context, client_configuration=configuration,
                                                     persist_config=False)  # a block, not a file to write back
        return where

    return Source(("block", value, json.dumps(config, sort_keys=True, default=str), context), where, load)


def load_cluster_config(value: str) -> tuple[dict[str, Any], str] | None:
    """The kubeconfig (as a dict) and context name the block ``value`` holds; None for a KubernetesCredentials
    block without a cluster config. Missing or invalid: SettingsError naming the setting and the value."""
    from prefect.exceptions import ObjectNotFound
    from prefect_kubernetes.credentials import (  # type: ignore[import-untyped]  # no py.typed
        KubernetesClusterConfig,
        KubernetesCredentials,
    )
    from pydantic import ValidationError

    slug, name = credentials_block_ref(value)
    setting = f"{FIELD_TO_KEY['credentials_block']}={value!r}"
    block_cls = {cls.get_block_type_slug(): cls for cls in (KubernetesCredentials, KubernetesClusterConfig)}[slug]
    try:
        # _sync: a plain call from any thread, also one a flow runs in (Prefect would dispatch to its
        # coroutine wherever it finds an event loop or an async flow)
        block = block_cls.load(name, _sync=True)
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectNotFound):
            raise SettingsError(f"{setting}: no block {slug}/{name} in the Prefect server; create it (e.g. "
                                f"{block_cls.__name__}.from_file(...).save({name!r})) or correct the name") from None
        raise
    except RuntimeError as exc:
        if isinstance(exc.__cause__, ValidationError):
            raise SettingsError(one_line(exc.__cause__, prefix=f"{setting}: block {slug}/{name}: ")) from None
        raise
    cluster = block if isinstance(block, KubernetesClusterConfig) else block.cluster_config
    if cluster is None:
        return None
    return dict(cluster.config), str(cluster.context_name)


def _in_cluster(configuration: kubernetes.client.Configuration) -> str:
    kubernetes.config.load_incluster_config(client_configuration=configuration)
    return IN_CLUSTER


def _current_context(path: str | None) -> str:
    try:
        _contexts, current = kubernetes.config.list_kube_config_contexts(config_file=path)
        return str(current["name"])
    except (ConfigException, OSError, KeyError, TypeError):
        return "the current one"
