"""Entrypoint of the `keruta-dispatch` deployment (see prefect.yaml). The flow lives in keruta_prefect."""

from keruta_prefect.pipelines import keruta_dispatch

__all__ = ["keruta_dispatch"]
