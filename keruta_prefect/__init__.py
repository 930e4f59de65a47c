"""keruta-prefect: run keruta agent tasks as Prefect flows, locally or as Kubernetes Jobs.

The flows are importable for composition (lazily: the agent imports this package without Prefect)::

    from keruta_prefect import keruta_task, keruta_pipeline, keruta_dispatch
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "keruta_task": "keruta_prefect.flows",
    "KerutaTaskFailed": "keruta_prefect.flows",
    "keruta_pipeline": "keruta_prefect.pipelines",
    "keruta_dispatch": "keruta_prefect.pipelines",
    "PipelineResult": "keruta_prefect.pipelines",
    "PipelineFailed": "keruta_prefect.pipelines",
    "TaskResult": "keruta_prefect.models",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keruta_prefect' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
