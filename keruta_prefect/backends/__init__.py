"""The backends that run a keruta task's agent: ``local`` (a subprocess) and ``kubernetes`` (a Job).

Each implements :class:`keruta_prefect.backends.base.Backend`, and nothing outside a backend reaches
around that interface; :func:`get_backend` is the one place that knows them by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from keruta_prefect.backends.base import Backend
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import Store

BackendName = Literal["local", "kubernetes"]
BACKENDS: tuple[BackendName, ...] = ("local", "kubernetes")


def get_backend(name: str, settings: KerutaSettings, store: Store) -> Backend:
    """The backend called ``name`` (imported on first use: the Kubernetes client is heavy)."""
    if name == "local":
        from keruta_prefect.backends.local import LocalBackend

        return LocalBackend(settings, store)
    if name == "kubernetes":
        from keruta_prefect.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings, store)
    raise ValueError(f"backend={name!r}: allowed: {', '.join(BACKENDS)}")
