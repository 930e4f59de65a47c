"""`keruta-prefect`: run a task, show settings, seed blocks, serve the keruta API.

Bad input of any kind (an option, a file, a setting, a stored block, the database or Prefect server
a setting points at) ends with one line on stderr naming the field and the value, and exit code 2; a
task that did not complete ends with exit code 1; anything unexpected ends with one line and exit
code 4 (``--debug`` or ``KERUTA_DEBUG=1`` shows its traceback). Never a bare traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from keruta_prefect.backends.base import BackendError
from keruta_prefect.errors import PermanentError
from keruta_prefect.models import Task, TaskSpecError
from keruta_prefect.settings import (
    KerutaSettings,
    SettingsError,
    load_properties_file,
    settings_markdown_table,
    settings_properties_file,
    settings_to_properties,
)
from keruta_prefect.validation import check_block_name, single_line

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNEXPECTED = 0, 1, 2, 4
# Prefect gives its temporary (ephemeral) server 20 s to start; a first start (database creation and
# migrations) on a 2-core machine takes longer. Ours unless the user set the setting (env or profile).
EPHEMERAL_STARTUP_TIMEOUT = 180
DEBUG_HINT = "run with --debug (or KERUTA_DEBUG=1) to see the traceback"


class UsageError(PermanentError):
    pass


def _block_option(option: str, name: str) -> str:
    try:
        return check_block_name(name)
    except ValueError as exc:
        raise UsageError(f"{option}={name!r}: must be {exc}") from None


def _in_range(option: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise UsageError(f"{option}={value}: must be between {low} and {high}")
    return value


def _limit_option(name: str) -> str | None:
    """--concurrency-limit: '' for none, else a name Prefect accepts (checked by Prefect's own model)."""
    if not name:
        return None
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from pydantic import ValidationError

    try:
        GlobalConcurrencyLimitCreate(name=name, limit=1)
    except ValidationError as exc:
        raise UsageError(f"--concurrency-limit={name!r}: {exc.errors(include_url=False)[0]['msg']}") from None
    return name


def _check_stored_settings(settings_block: str, properties: str | None = None) -> None:
    """Before a flow starts: the task database opens, and the settings block (seeded on first use) is valid."""
    from keruta_prefect.blocks import load_settings
    from keruta_prefect.store import get_store

    _block_option("--settings-block", settings_block)
    get_store()
    load_settings(settings_block, properties=properties)


def _settings(path: str | None) -> KerutaSettings:
    warnings: list[str] = []
    settings = load_properties_file(path, warn=warnings) if path else KerutaSettings()
    for warning in warnings:
        print(f"keruta-prefect: warning: {warning}", file=sys.stderr)
    return settings


def cmd_settings_show(args: argparse.Namespace) -> int:
    settings = _settings(args.properties)
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
    settings = _settings(args.properties)
    _block_option("--name", args.name)
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

    settings = _settings(args.properties)
    port = _in_range("--port", args.port, 1, 65535) if args.port is not None else settings.api_port
    try:  # the address first: a clear line now rather than the server's log lines later
        family = socket.getaddrinfo(args.host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((args.host, port), family=family):
            pass
    except OSError as exc:
        raise UsageError(f"--host={args.host!r} --port={port}: cannot listen there: {exc.strerror or exc}") from None
    store = get_store()
    token = os.environ.get("KERUTA_API_TOKEN")
    if not token:
        from keruta_prefect.blocks import read_api_credentials

        credentials = read_api_credentials(_block_option("--block", args.block))
        if credentials is None:
            raise UsageError("no API token: set KERUTA_API_TOKEN or run `keruta-prefect blocks seed`")
        token = credentials.token.get_secret_value()
    app = create_app(store, token, artifacts_root=settings.storage_root(),
                     max_file_size=settings.artifacts_max_file_size, max_total_size=settings.artifacts_max_total_size)
    print(f"keruta API on http://{args.host}:{port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=port, log_level="info")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    spec = _task_file(args.task_file)  # fail fast, before Prefect starts
    _block_option("--settings-block", args.settings_block)
    if args.properties:
        _settings(args.properties)
        os.environ["KERUTA_PROPERTIES"] = str(Path(args.properties).resolve())
    _check_stored_settings(args.settings_block, args.properties)

    from keruta_prefect.flows import KerutaTaskFailed, keruta_task

    print(f"running keruta task {spec.id} ({spec.title or 'untitled'}) on the {args.backend} backend…",
          file=sys.stderr)
    state = keruta_task(task_spec=spec.model_dump(mode="json", by_alias=True), backend=args.backend,
                        settings_block=args.settings_block, return_state=True)
    try:
        result = state.result()
    except KerutaTaskFailed as exc:
        result = exc.result
    except (SettingsError, TaskSpecError):
        raise  # bad input found inside the flow: exit 2, one line
    except Exception as exc:
        print(f"keruta-prefect: the flow failed: {single_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_TASK_FAILED
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        code = f" exit code {result.exit_code}" if result.exit_code is not None else ""
        why = f" — {result.reason}: {result.message}" if result.status != "COMPLETED" else ""
        duration = f", {result.duration_seconds:.1f}s" if result.duration_seconds is not None else ""
        print(f"{result.status} task {result.task_id} (attempt {result.attempt},{code}{duration}, "
              f"{result.log_lines} log lines, {len(result.artifacts)} artifacts){why}")
        if result.artifacts_note:
            print(f"artifacts: {result.artifacts_note}")
    return EXIT_OK if result.status == "COMPLETED" else EXIT_TASK_FAILED


def _task_file(path_text: str) -> Task:
    from keruta_prefect.models import parse_task_spec

    path = Path(path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--task-file={path_text!r}: {exc.strerror}") from None
    return parse_task_spec(data, source=str(path))


def cmd_render(args: argparse.Namespace) -> int:
    """The Job (and PVC) of a task as YAML, offline; --server-dry-run asks the cluster to check them."""
    import yaml

    from keruta_prefect.manifest import build_job, build_pvc
    from keruta_prefect.models import RunContext

    settings = _settings(args.properties)
    task = _task_file(args.task_file)
    _in_range("--attempt", args.attempt, 1, 10000)
    ctx = RunContext(attempt=args.attempt, root_task_id=task.parent_id)
    documents = [doc for doc in (build_pvc(task, settings, ctx), build_job(task, settings, ctx)) if doc]
    print(yaml.safe_dump_all(documents, sort_keys=False, allow_unicode=True), end="")
    if args.server_dry_run:
        from keruta_prefect.backends.kubernetes.api import Conflict, KubeError, Unreachable, dry_run_create
        from keruta_prefect.backends.kubernetes.client import api_client

        api = api_client(settings)
        for doc in documents:
            namespace, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
            try:
                dry_run_create(api, doc, f"the cluster refuses {doc['kind']} {name}")
            except Conflict:
                print(f"✓ {doc['kind']} {name} exists already in {namespace}", file=sys.stderr)
                continue
            except Unreachable:  # no answer is no usage error: it stays what it is
                raise
            except KubeError as exc:  # the edge: one line (the cause is the HTTP answer, said in it)
                raise UsageError(str(exc)) from None
            print(f"✓ the cluster accepts {doc['kind']} {namespace}/{name} (server-side dry run)", file=sys.stderr)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from keruta_prefect.backends.kubernetes.doctor import run_checks

    if args.properties or not args.settings_block:
        settings = _settings(args.properties)
    else:
        from keruta_prefect.blocks import KerutaKubernetesSettings, read_settings

        stored = read_settings(_block_option("--settings-block", args.settings_block))
        if stored is None:
            raise UsageError(f"--settings-block={args.settings_block!r}: no block "
                             f"{KerutaKubernetesSettings.get_block_type_slug()}/{args.settings_block}; create it "
                             f"with `keruta-prefect blocks seed --name {args.settings_block}`")
        settings = stored
    emit = None if args.json else (lambda check: print(check.line(), flush=True))
    checks = run_checks(settings, args.namespace, emit=emit)
    failed = sum(not c.ok for c in checks)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        print(f"{len(checks) - failed} passed, {failed} failed")
    return EXIT_OK if failed == 0 else EXIT_TASK_FAILED


def cmd_tasks_logs(args: argparse.Namespace) -> int:
    from keruta_prefect.store import get_store

    store = get_store()
    store.get_task(args.task_id)
    rows = store.logs(args.task_id)
    if args.json:
        print(json.dumps([{"ts": r.ts.isoformat(), "source": r.source, "seq": r.seq, "level": r.level,
                           "message": r.message} for r in rows], indent=2))
    else:
        for row in rows:
            print(f"{row.ts.isoformat()} {row.level:5} {row.message}")
    return EXIT_OK


def cmd_tasks_add(args: argparse.Namespace) -> int:
    """Store a task as PENDING: keruta-dispatch picks it up (highest priority first)."""
    from keruta_prefect.store import TaskExists, get_store

    task = _task_file(args.task_file)
    try:
        stored = get_store().create_task(task)
    except TaskExists as exc:
        raise UsageError(f"{exc} (id={task.id!r}; give another id, or none for a fresh one)") from None
    if args.json:
        print(stored.model_dump_json(by_alias=True, indent=2))
    else:
        print(f"{stored.id}\t{stored.status}\tpriority {stored.priority}\t{stored.title}")
    return EXIT_OK


def _at_least_one(**values: int) -> None:
    for name, value in values.items():
        _in_range(f"--{name.replace('_', '-')}", value, 1, 1000)


def _print_runs(runs: list[Any]) -> None:
    for run in runs:
        print(f"{run.status}\t{run.task_id}" + (f"\t{run.error}" if run.error else ""))


def cmd_dispatch(args: argparse.Namespace) -> int:
    """One pass of keruta-dispatch in this process (the deployment runs it on a schedule)."""
    _at_least_one(max_tasks=args.max_tasks, concurrency=args.concurrency)
    limit = _limit_option(args.concurrency_limit)
    _check_stored_settings(args.settings_block)
    from keruta_prefect.pipelines import keruta_dispatch

    print(f"dispatching up to {args.max_tasks} PENDING tasks on the {args.backend} backend…", file=sys.stderr)
    result = keruta_dispatch(max_tasks=args.max_tasks, concurrency=args.concurrency, backend=args.backend,
                             settings_block=args.settings_block, concurrency_limit=limit)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_runs(result.runs)
        print(f"{len(result.claimed)} tasks dispatched")
    return EXIT_OK if all(r.status == "COMPLETED" for r in result.runs) else EXIT_TASK_FAILED


def cmd_pipeline(args: argparse.Namespace) -> int:
    """A pipeline file: {"parent": {...} | "id" | null, "children": [...]} through keruta-pipeline."""
    from keruta_prefect.pipelines import PipelineFailed, check_pipeline, keruta_pipeline

    _at_least_one(concurrency=args.concurrency)
    limit = _limit_option(args.concurrency_limit)
    path = Path(args.file)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--file={args.file!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--file={args.file!r}: not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"parent", "children"}:
        raise TaskSpecError(f"{args.file}: expected an object with 'parent' and/or 'children'")
    children = data.get("children") or []
    if not isinstance(children, list):
        raise TaskSpecError(f"{args.file}: children={str(children)[:60]!r}: expected a list of task specs or ids")
    check_pipeline(data.get("parent"), children)  # fail fast, before Prefect starts
    _check_stored_settings(args.settings_block)
    print(f"running a pipeline of {len(children) + (1 if data.get('parent') else 0)} tasks, "
          f"{args.concurrency} at a time, on the {args.backend} backend…", file=sys.stderr)
    state = keruta_pipeline(parent=data.get("parent"), children=children, concurrency=args.concurrency,
                            backend=args.backend, settings_block=args.settings_block,
                            concurrency_limit=limit, return_state=True)
    try:
        result = state.result()
    except PipelineFailed as exc:
        result = exc.result
    except (SettingsError, TaskSpecError):
        raise
    except Exception as exc:
        raise UsageError(single_line(str(exc)) or type(exc).__name__) from None
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_runs(result.runs)
        print(result.summary())
    return EXIT_OK if result.completed else EXIT_TASK_FAILED


def cmd_tasks_list(args: argparse.Namespace) -> int:
    from keruta_prefect.models import TaskStatus
    from keruta_prefect.store import get_store

    status = None
    if args.status:
        try:
            status = TaskStatus(args.status.upper())
        except ValueError:
            raise UsageError(f"--status={args.status!r}: allowed: {', '.join(TaskStatus)}") from None
    _in_range("--limit", args.limit, 1, 100000)
    tasks = get_store().list_tasks(status, limit=args.limit)
    if args.json:
        print(json.dumps([t.model_dump(mode="json", by_alias=True) for t in tasks], indent=2))
    else:
        for t in tasks:
            print(f"{t.id}\t{t.status}\t{t.priority}\t{t.title}")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (naming the option and the value) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keruta-prefect", description="Run keruta tasks from Prefect.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="on an error, also print its traceback (or set KERUTA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task (a JSON task spec) through the keruta-task flow")
    run.add_argument("--task-file", required=True)
    run.add_argument("--backend", default="local", choices=["local", "kubernetes"])
    run.add_argument("--settings-block", default="default")
    run.add_argument("--properties", help="application.properties used if the settings block does not exist yet")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(func=cmd_run)

    settings = sub.add_parser("settings", help="inspect settings")
    ssub = settings.add_subparsers(dest="settings_command", required=True)
    show = ssub.add_parser("show", help="the effective settings of a properties file (or the defaults)")
    show.add_argument("--properties")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_settings_show)
    keys = ssub.add_parser("keys", help="every key with its default (a markdown table, or a properties file)")
    keys.add_argument("--format", choices=["markdown", "properties"], default="markdown")
    keys.set_defaults(func=cmd_settings_keys)

    blocks = sub.add_parser("blocks", help="Prefect blocks")
    bsub = blocks.add_subparsers(dest="blocks_command", required=True)
    seed = bsub.add_parser("seed", help="register block types; create the documents only if absent")
    seed.add_argument("--properties")
    seed.add_argument("--name", default="default")
    seed.add_argument("--force", action="store_true", help="overwrite existing documents")
    seed.add_argument("--json", action="store_true")
    seed.set_defaults(func=cmd_blocks_seed)

    api = sub.add_parser("api", help="serve the keruta API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int)
    api.add_argument("--properties")
    api.add_argument("--block", default="default", help="keruta-api block holding the token")
    api.set_defaults(func=cmd_api)

    render = sub.add_parser("render", help="the agent Job (and volume) of a task as YAML, offline")
    render.add_argument("--task-file", required=True)
    render.add_argument("--properties", help="settings (default: the built-in defaults)")
    render.add_argument("--attempt", type=int, default=1)
    render.add_argument("--server-dry-run", action="store_true", help="also ask the cluster to validate them")
    render.set_defaults(func=cmd_render)

    doctor = sub.add_parser("doctor", help="check the cluster connection, namespace, permissions and token Secret")
    doctor.add_argument("--properties", help="settings file (default: the built-in defaults)")
    doctor.add_argument("--settings-block", help="or: the stored settings block of this name")
    doctor.add_argument("--namespace", help="default: keruta.kubernetes.default-namespace")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    tasks = sub.add_parser("tasks", help="stored tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True)
    tlist = tsub.add_parser("list")
    tlist.add_argument("--status")
    tlist.add_argument("--limit", type=int, default=100)
    tlist.add_argument("--json", action="store_true")
    tlist.set_defaults(func=cmd_tasks_list)
    tlogs = tsub.add_parser("logs")
    tlogs.add_argument("task_id")
    tlogs.add_argument("--json", action="store_true")
    tlogs.set_defaults(func=cmd_tasks_logs)
    tadd = tsub.add_parser("add", help="store a task as PENDING for keruta-dispatch")
    tadd.add_argument("--task-file", required=True)
    tadd.add_argument("--json", action="store_true")
    tadd.set_defaults(func=cmd_tasks_add)

    for name, func, text in (("dispatch", cmd_dispatch, "one keruta-dispatch pass here: claim PENDING tasks, run them"),
                             ("pipeline", cmd_pipeline, "a parent and children (a JSON file) through keruta-pipeline")):
        cmd = sub.add_parser(name, help=text)
        if name == "dispatch":
            cmd.add_argument("--max-tasks", type=int, default=10)
        else:
            cmd.add_argument("--file", required=True, help='{"parent": {...}, "children": [{...}, ...]}')
        cmd.add_argument("--concurrency", type=int, default=4)
        cmd.add_argument("--backend", default="local", choices=["local", "kubernetes"])
        cmd.add_argument("--settings-block", default="default")
        cmd.add_argument("--concurrency-limit", default="keruta-tasks",
                         help="Prefect global concurrency limit shared by all keruta flows ('' for none)")
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(func=func)
    _add_debug_everywhere(parser)
    return parser


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--debug` after the command too (`keruta-prefect run --debug …`); SUPPRESS keeps the global value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _add_debug_everywhere(child)


def _uses_prefect(args: argparse.Namespace) -> bool:
    if args.command == "doctor":
        return bool(args.settings_block and not args.properties)
    if args.command == "api":
        return not os.environ.get("KERUTA_API_TOKEN")
    return args.command in ("run", "blocks", "dispatch", "pipeline")


@contextlib.contextmanager
def _prefect_defaults() -> Iterator[int]:
    """A generous startup time for Prefect's temporary server, as a *default*: a value the user set
    (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS in the environment or a Prefect profile) wins."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT
    from prefect.settings import temporary_settings

    with temporary_settings(set_defaults={STARTUP_TIMEOUT: EPHEMERAL_STARTUP_TIMEOUT}) as settings:
        yield settings.server.ephemeral.startup_timeout_seconds


def error_line(exc: BaseException, *, startup_timeout: int | None = None) -> tuple[int, str]:
    """The exit code and the one line for an error: bad input (2) names the field and the value."""
    if isinstance(exc, SettingsError | TaskSpecError | UsageError) or (
        isinstance(exc, LookupError) and not isinstance(exc, KeyError | IndexError)  # e.g. task not found
    ):
        return EXIT_USAGE, single_line(str(exc)) or type(exc).__name__
    if isinstance(exc, BackendError):
        return EXIT_TASK_FAILED, single_line(str(exc)) or type(exc).__name__
    sql_errors = sys.modules.get("sqlalchemy.exc")
    if sql_errors is not None and isinstance(exc, sql_errors.OperationalError | sql_errors.InterfaceError):
        # the database went away mid-command (opening it is mapped where the engine is made)
        from keruta_prefect.store import database_error

        return EXIT_USAGE, str(database_error(exc))
    if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in str(exc):
        timeout = EPHEMERAL_STARTUP_TIMEOUT if startup_timeout is None else startup_timeout
        return EXIT_USAGE, (f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={timeout}: Prefect's temporary server "
                            f"did not start in time; set it higher (e.g. {max(2 * timeout, 600)}), or start a server "
                            "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        prefect_settings = sys.modules.get("prefect.settings")
        url = prefect_settings.PREFECT_API_URL.value() if prefect_settings is not None else None
        where = f"PREFECT_API_URL={url!r}" if url else "Prefect's temporary server"
        return EXIT_USAGE, (f"{where}: cannot reach the Prefect API ({type(exc).__name__}: "
                            f"{single_line(str(exc), 200)}); start the server or correct the URL")
    detail = single_line(str(exc), 300)
    return EXIT_UNEXPECTED, f"unexpected error: {type(exc).__name__}{': ' + detail if detail else ''} ({DEBUG_HINT})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("KERUTA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    startup_timeout: int | None = None
    try:
        with contextlib.ExitStack() as stack:
            if _uses_prefect(args):
                startup_timeout = stack.enter_context(_prefect_defaults())
            return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `keruta-prefect tasks list | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        code, line = error_line(exc, startup_timeout=startup_timeout)
        if debug:
            traceback.print_exc()
        print(f"keruta-prefect: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
