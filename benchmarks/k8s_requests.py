"""Kubernetes API requests one keruta task costs, by task duration (counted at the harness cluster).

    .venv/bin/python -m benchmarks.k8s_requests 5 60

Runs the keruta-task flow on the Kubernetes backend against the test harness (kmock + a kubelet that
runs the real agent), one task per duration, and prints the requests by verb and resource.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_tmp = Path(tempfile.mkdtemp(prefix="keruta-bench-"))
os.environ["PREFECT_HOME"] = str(_tmp / "prefect")
os.environ["KERUTA_HOME"] = str(_tmp / "home")
os.environ["KERUTA_DATABASE_URL"] = f"sqlite:///{_tmp / 'keruta.db'}"


def main(durations: list[int]) -> None:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from keruta_prefect.api import ApiServer, create_app
    from keruta_prefect.blocks import seed
    from keruta_prefect.flows import keruta_task
    from keruta_prefect.settings import KerutaSettings
    from keruta_prefect.store import get_store
    from tests.harness.cluster import Cluster

    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for seconds in durations:
            cluster = Cluster(_tmp / f"cluster-{seconds}").start()
            server = ApiServer(create_app(get_store(), "bench-token")).start()
            cluster.create_secret("keruta-api-token", {"token": "bench-token"})
            block = f"bench-{uuid.uuid4().hex[:8]}"
            seed(KerutaSettings(config_path=str(cluster.kubeconfig()), api_url=server.url, artifacts_mode="off"),
                 name=block)
            before = len(cluster.calls)
            result = keruta_task(task_spec={"script": f"echo start\nsleep {seconds}\necho end"}, backend="kubernetes",
                                 settings_block=block)
            calls = cluster.calls[before:]
            counts = Counter(f"{c.verb} {c.resource}{'/' + c.subresource if c.subresource else ''}" for c in calls
                             if c.resource)
            print(f"task of {seconds:>3}s: {result.status}, {sum(counts.values())} Kubernetes API requests: "
                  + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items())), flush=True)
            server.stop()
            from keruta_prefect.backends.kubernetes import watch

            watch.stop_all()
            cluster.stop()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [5, 60])
