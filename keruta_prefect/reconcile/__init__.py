"""The reconciler: nothing keruta started outlives its reason to exist.

- ``plan``: the rules, a pure function from observed :class:`Facts` to a list of :class:`Action`;
- ``facts``: gathering them (the cluster through the Kubernetes backend, the store, Prefect, /proc);
- ``run``: one pass (:func:`reconcile`) and its :class:`ReconcileReport`;
- ``flow``: the ``keruta-reconcile`` flow (a deployment in prefect.yaml runs it every 5 minutes).
"""

from keruta_prefect.reconcile.plan import Action, Facts, plan
from keruta_prefect.reconcile.run import ActionResult, ReconcileReport, reconcile

__all__ = ["Action", "ActionResult", "Facts", "ReconcileReport", "plan", "reconcile"]
