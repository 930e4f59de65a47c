"""Entrypoint of the `keruta-pipeline` deployment (see prefect.yaml). The flow lives in keruta_prefect."""

from keruta_prefect.pipelines import keruta_pipeline

__all__ = ["keruta_pipeline"]
