"""Entrypoint of the `keruta-reconcile` deployment (see prefect.yaml). The flow lives in keruta_prefect."""

from keruta_prefect.reconcile.flow import keruta_reconcile

__all__ = ["keruta_reconcile"]
