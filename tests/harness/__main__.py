"""Run the harness cluster on loopback until interrupted, for a person or a script to try things against.

    python -m keruta_harness [--root DIR] [--kubelet run|manual] [--namespace NAME ...]

It prints the kubeconfig path it wrote (first line) and the API server's URL; Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from .cluster import Cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keruta_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="directory for the kubeconfig, volumes and git remotes (default: a new temporary one)")
    parser.add_argument("--kubelet", choices=("run", "manual"), default="run",
                        help="run: Pods' containers run as local processes; manual: nothing runs (default: run)")
    parser.add_argument("--namespace", action="append", default=[], metavar="NAME",
                        help="a namespace to create besides 'default' (repeatable)")
    parser.add_argument("--no-validate", action="store_true",
                        help="do not validate Jobs and PVCs with kubernetes-validate")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="keruta-harness-"))
    cluster = Cluster(root, kubelet=args.kubelet, validate=not args.no_validate).start()
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        for namespace in args.namespace:
            cluster.create_namespace(namespace)
        print(cluster.kubeconfig(), flush=True)
        print(f"API server: {cluster.url} (Ctrl-C stops it)", flush=True)
        stopped.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
