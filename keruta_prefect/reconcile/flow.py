"""The ``keruta-reconcile`` flow: one reconcile pass, its report published as a Prefect table artifact."""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from its signature.
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from keruta_prefect.blocks import DEFAULT_BLOCK, load_settings
from keruta_prefect.reconcile.run import ReconcileReport, reconcile
from keruta_prefect.store import get_store

ARTIFACT_KEY = "keruta-reconcile"


@flow(name="keruta-reconcile")
def keruta_reconcile(settings_block: str = DEFAULT_BLOCK, dry_run: bool = False) -> ReconcileReport:
    """Delete the Jobs, Pods and volumes, stop the local agents and remove the work directories that no live
    flow run owns any more, mark lost tasks and release dead claims (see keruta_prefect.reconcile.plan)."""
    logger = get_run_logger()
    report = reconcile(load_settings(settings_block), get_store(), dry_run=dry_run)
    for line in report.lines():
        logger.log(30 if line.startswith("warning: ") else 20, "%s", line)
    rows = report.rows() or [{"action": "(nothing to do)", "namespace": "", "name": "", "outcome": "",
                              "why": ", ".join(f"{n} {what}" for what, n in report.looked_at.items())}]
    create_table_artifact(rows, key=ARTIFACT_KEY,
                          description=f"keruta-reconcile{' (dry run)' if dry_run else ''}: {len(report.actions)} "
                                      "actions")
    return report
