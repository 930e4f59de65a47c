"""The command line of `keruta-prefect`: commands, options and their defaults."""

from __future__ import annotations

import argparse
from typing import NoReturn

from keruta_prefect.backends import BACKENDS
from keruta_prefect.cli import operate, tasks
from keruta_prefect.cli.options import EXIT_USAGE


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
    run.add_argument("--backend", default="local", choices=list(BACKENDS))
    run.add_argument("--settings-block", default="default")
    run.add_argument("--properties", help="application.properties used if the settings block does not exist yet")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(func=tasks.cmd_run)

    settings = sub.add_parser("settings", help="inspect settings")
    ssub = settings.add_subparsers(dest="settings_command", required=True)
    show = ssub.add_parser("show", help="the effective settings of a properties file (or the defaults)")
    show.add_argument("--properties")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=operate.cmd_settings_show)
    keys = ssub.add_parser("keys", help="every key with its default (a markdown table, or a properties file)")
    keys.add_argument("--format", choices=["markdown", "properties"], default="markdown")
    keys.set_defaults(func=operate.cmd_settings_keys)

    blocks = sub.add_parser("blocks", help="Prefect blocks")
    bsub = blocks.add_subparsers(dest="blocks_command", required=True)
    seed = bsub.add_parser("seed", help="register block types; create the documents only if absent")
    seed.add_argument("--properties")
    seed.add_argument("--name", default="default")
    seed.add_argument("--force", action="store_true", help="overwrite existing documents")
    seed.add_argument("--json", action="store_true")
    seed.set_defaults(func=operate.cmd_blocks_seed)

    api = sub.add_parser("api", help="serve the keruta API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int)
    api.add_argument("--properties")
    api.add_argument("--block", default="default", help="keruta-api block holding the token")
    api.set_defaults(func=operate.cmd_api)

    render = sub.add_parser("render", help="the agent Job (and volume) of a task as YAML, offline")
    render.add_argument("--task-file", required=True)
    render.add_argument("--properties", help="settings (default: the built-in defaults)")
    render.add_argument("--attempt", type=int, default=1)
    render.add_argument("--server-dry-run", action="store_true", help="also ask the cluster to validate them")
    render.set_defaults(func=operate.cmd_render)

    doctor = sub.add_parser("doctor", help="check the cluster connection, namespace, permissions and token Secret")
    doctor.add_argument("--properties", help="settings file (default: the built-in defaults)")
    doctor.add_argument("--settings-block", help="or: the stored settings block of this name")
    doctor.add_argument("--namespace", help="default: keruta.kubernetes.default-namespace")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=operate.cmd_doctor)

    stored = sub.add_parser("tasks", help="stored tasks")
    tsub = stored.add_subparsers(dest="tasks_command", required=True)
    tlist = tsub.add_parser("list")
    tlist.add_argument("--status")
    tlist.add_argument("--limit", type=int, default=100)
    tlist.add_argument("--json", action="store_true")
    tlist.set_defaults(func=tasks.cmd_tasks_list)
    tlogs = tsub.add_parser("logs")
    tlogs.add_argument("task_id")
    tlogs.add_argument("--json", action="store_true")
    tlogs.set_defaults(func=tasks.cmd_tasks_logs)
    tadd = tsub.add_parser("add", help="store a task as PENDING for keruta-dispatch")
    tadd.add_argument("--task-file", required=True)
    tadd.add_argument("--json", action="store_true")
    tadd.set_defaults(func=tasks.cmd_tasks_add)
    low, high = f"{tasks.LOW_SHARE:.0%}", f"{tasks.HIGH_SHARE:.0%}"
    tusage = tsub.add_parser(
        "usage", help="what each task's last run used against its requests and limits",
        description="Each task's last finished run: CPU seconds, wall seconds, peak memory, and the memory "
                    f"request and limit it ran with. FLAG: LOW when the peak is under {low} of the memory "
                    f"request (of the limit if it has no request): it asks for more than it uses; HIGH when the "
                    f"peak is over {high} of the memory limit (of the request if it has no limit): it is close to "
                    "being OOMKilled.")
    tusage.add_argument("--since", help="only runs that ended since: a duration back from now (90s, 30m, 12h, 7d, "
                                        "2w) or an ISO date or date-time (2026-01-31T12:00:00Z)")
    tusage.add_argument("--limit", type=int, default=100, help="at most this many tasks, most recent first")
    tusage.add_argument("--json", action="store_true")
    tusage.set_defaults(func=tasks.cmd_tasks_usage)

    sweep = sub.add_parser("reconcile", help="delete what keruta started that no live flow run owns any more, "
                           "mark lost tasks, release dead claims (one keruta-reconcile pass here)")
    sweep.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    sweep.add_argument("--settings-block", default="default")
    sweep.add_argument("--properties", help="application.properties used if the settings block does not exist yet")
    sweep.add_argument("--json", action="store_true", help="print the report as JSON")
    sweep.set_defaults(func=operate.cmd_reconcile)

    for name, func, text in (
            ("dispatch", tasks.cmd_dispatch, "one keruta-dispatch pass here: claim PENDING tasks, run them"),
            ("pipeline", tasks.cmd_pipeline, "a parent and children (a JSON file) through keruta-pipeline")):
        cmd = sub.add_parser(name, help=text)
        if name == "dispatch":
            cmd.add_argument("--max-tasks", type=int, default=10)
        else:
            cmd.add_argument("--file", required=True, help='{"parent": {...}, "children": [{...}, ...]}')
        cmd.add_argument("--concurrency", type=int, default=4)
        cmd.add_argument("--backend", default="local", choices=list(BACKENDS))
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
