"""Run the harness cluster on loopback until interrupted, for a person or a script to try things against.

    python -m keruta_harness [--kubeconfig PATH] [--root DIR] [--kubelet run|manual] [--namespace NAME ...]

It writes a kubeconfig for the cluster (to PATH with ``--kubeconfig``, else into the root directory), then prints
that path (first line, once the cluster answers) and the API server's URL; Ctrl-C (or SIGTERM) stops it. Point
kubectl, k9s or ``keruta-prefect doctor`` at it, or run the shared Kubernetes tests against it as a "real" cluster
(the official client only, tests/targets.py):

    python -m keruta_harness --kubeconfig /tmp/h/kubeconfig --namespace keruta
    KUBECONFIG=/tmp/h/kubeconfig kubectl get pods            # in another shell (the context's namespace: keruta)

deployments/README.md shows the whole run of the shared tests against it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .cluster import Cluster

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def write_kubeconfig(cluster: Cluster, path: Path, namespace: str) -> Path:
    """The cluster's kubeconfig at ``path``, written whole at once (a reader never sees half of it)."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = cluster.kubeconfig(path.with_name(f".{path.name}.partial"), namespace=namespace)
    os.replace(partial, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keruta_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, default=None, metavar="PATH",
                        help="where to write the cluster's kubeconfig (default: ROOT/kubeconfig)")
    parser.add_argument("--root", type=Path, default=None,
                        help="directory for the kubeconfig, volumes and git remotes (default: a new temporary one)")
    parser.add_argument("--kubelet", choices=("run", "manual"), default="run",
                        help="run: Pods' containers run as local processes; manual: nothing runs (default: run)")
    parser.add_argument("--namespace", action="append", default=[], metavar="NAME",
                        help="a namespace to create besides 'default' (repeatable; the first one is the "
                             "kubeconfig context's namespace)")
    parser.add_argument("--no-validate", action="store_true",
                        help="do not validate Jobs and PVCs with kubernetes-validate")
    args = parser.parse_args(argv)
    for namespace in args.namespace:
        if not DNS_LABEL.fullmatch(namespace):
            parser.error(f"--namespace {namespace!r}: a namespace is a DNS label (lowercase letters, digits and "
                         "'-', at most 63)")
    root = args.root or Path(tempfile.mkdtemp(prefix="keruta-harness-"))
    try:  # before anything starts: a root or a kubeconfig path it cannot write is one line
        root.mkdir(parents=True, exist_ok=True)
        target = (args.kubeconfig or root / "kubeconfig").expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.with_name(f".{target.name}.probe")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        print(f"python -m keruta_harness: cannot write {exc.filename or root}: {exc.strerror}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    cluster = Cluster(root, kubelet=args.kubelet, validate=not args.no_validate).start()
    try:
        for namespace in args.namespace:
            cluster.create_namespace(namespace)
        context_namespace = args.namespace[0] if args.namespace else "default"
        kubeconfig = write_kubeconfig(cluster, args.kubeconfig or root / "kubeconfig", context_namespace)
        print(kubeconfig, flush=True)
        print(f"API server: {cluster.url} (Ctrl-C stops it)", flush=True)
        stopped.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
