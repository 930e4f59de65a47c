"""keruta-prefect: run keruta agent tasks as Prefect flows, locally or as Kubernetes Jobs.

The flows are importable for composition::

    from keruta_prefect.flows import keruta_task
"""

__version__ = "0.1.0"
