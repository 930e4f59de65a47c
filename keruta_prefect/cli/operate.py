"""Commands for the operator: settings, blocks, the keruta API server, manifests and the cluster check."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys

from keruta_prefect.cli.options import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    UsageError,
    block_option,
    in_range,
    settings_from,
    task_file,
)
from keruta_prefect.contract import Env
from keruta_prefect.settings import (
    KerutaSettings,
    settings_markdown_table,
    settings_properties_file,
    settings_to_properties,
)


def prefect_for_connection(settings: KerutaSettings) -> contextlib.AbstractContextManager[object]:
    """A credentials block (keruta.kubernetes.credentials-block) is read from Prefect: its temporary server
    gets the CLI's startup time, as for the commands that always use Prefect."""
    if not (settings.enabled and settings.credentials_block):
        return contextlib.nullcontext()
    from keruta_prefect.cli import _prefect_defaults

    return _prefect_defaults()


def cmd_settings_show(args: argparse.Namespace) -> int:
    settings = settings_from(args.properties)
    if args.json:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    else:
        for key, value in settings_to_properties(settings).items():
            print(f"{key}={value}")
    return EXIT_OK


def cmd_settings_keys(args: argparse.Namespace) -> int:
    print(settings_properties_file() if args.format == "properties" else settings_markdown_table(), end="")
    return EXIT_OK


def cmd_blocks_seed(args: argparse.Namespace) -> int:
    settings = settings_from(args.properties)
    block_option("--name", args.name)
    from keruta_prefect.blocks import seed

    if sys.stderr.isatty():  # progress for a person; scripts get the report (or one error line) only
        print(f"seeding blocks '{args.name}' in the Prefect server…", file=sys.stderr)
    report = seed(settings, name=args.name, force=args.force)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        for line in report.lines():
            print(line)
    return EXIT_OK


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from keruta_prefect.api import create_app
    from keruta_prefect.store import get_store

    settings = settings_from(args.properties)
    port = in_range("--port", args.port, 1, 65535) if args.port is not None else settings.api_port
    try:  # the address first: a clear line now rather than the server's log lines later
        family = socket.getaddrinfo(args.host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((args.host, port), family=family):
            pass
    except OSError as exc:
        raise UsageError(f"--host={args.host!r} --port={port}: cannot listen there: {exc.strerror or exc}") from None
    store = get_store()
    token = os.environ.get(Env.API_TOKEN)
    if not token:
        from keruta_prefect.blocks import read_api_credentials

        credentials = read_api_credentials(block_option("--block", args.block))
        if credentials is None:
            raise UsageError("no API token: set KERUTA_API_TOKEN or run `keruta-prefect blocks seed`")
        token = credentials.token.get_secret_value()
    app = create_app(store, token, artifacts_root=settings.storage_root(),
                     max_file_size=settings.artifacts_max_file_size, max_total_size=settings.artifacts_max_total_size)
    print(f"keruta API on http://{args.host}:{port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=port, log_level="info")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """The Job (and PVC) of a task as YAML, offline; --server-dry-run asks the cluster to check them."""
    import yaml

    from keruta_prefect.manifest import build_job, build_pvc
    from keruta_prefect.models import RunContext

    settings = settings_from(args.properties)
    task = task_file(args.task_file)
    in_range("--attempt", args.attempt, 1, 10000)
    ctx = RunContext(attempt=args.attempt, root_task_id=task.parent_id)
    documents = [doc for doc in (build_pvc(task, settings, ctx), build_job(task, settings, ctx)) if doc]
    print(yaml.safe_dump_all(documents, sort_keys=False, allow_unicode=True), end="")
    if args.server_dry_run:
        from keruta_prefect.backends.kubernetes.api import Conflict, KubeError, KubeUnavailable, dry_run_create
        from keruta_prefect.backends.kubernetes.client import api_client

        with prefect_for_connection(settings):
            api = api_client(settings)
        for doc in documents:
            namespace, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
            try:
                dry_run_create(api, doc, f"server-side dry run of {doc['kind']} {name}")
            except Conflict:
                print(f"✓ {doc['kind']} {name} exists already in {namespace}", file=sys.stderr)
                continue
            except KubeUnavailable:  # no answer (or 5xx, 429) is no usage error: one line, exit 1
                raise
            except KubeError as exc:  # the edge: one line (the cause is the HTTP answer, said in it)
                raise UsageError(str(exc)) from None
            print(f"✓ the cluster accepts {doc['kind']} {namespace}/{name} (server-side dry run)", file=sys.stderr)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from keruta_prefect.backends.kubernetes.doctor import run_checks

    if args.properties or not args.settings_block:
        settings = settings_from(args.properties)
    else:
        from keruta_prefect.blocks import KerutaKubernetesSettings, read_settings

        stored = read_settings(block_option("--settings-block", args.settings_block))
        if stored is None:
            raise UsageError(f"--settings-block={args.settings_block!r}: no block "
                             f"{KerutaKubernetesSettings.get_block_type_slug()}/{args.settings_block}; create it "
                             f"with `keruta-prefect blocks seed --name {args.settings_block}`")
        settings = stored
    emit = None if args.json else (lambda check: print(check.line(), flush=True))
    with prefect_for_connection(settings):
        checks = run_checks(settings, args.namespace, emit=emit)
    failed = sum(not c.ok for c in checks)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        print(f"{len(checks) - failed} passed, {failed} failed")
    return EXIT_OK if failed == 0 else EXIT_TASK_FAILED


def cmd_reconcile(args: argparse.Namespace) -> int:
    """One keruta-reconcile pass here: the report as a table (or JSON); exit 1 if an action failed."""
    block_option("--settings-block", args.settings_block)
    if args.properties:
        settings_from(args.properties)
    from keruta_prefect.blocks import load_settings
    from keruta_prefect.reconcile import reconcile
    from keruta_prefect.store import get_store

    store = get_store()
    report = reconcile(load_settings(args.settings_block, properties=args.properties), store, dry_run=args.dry_run)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        for line in report.lines():
            print(line)
    return EXIT_TASK_FAILED if report.failed else EXIT_OK
