"""`keruta-prefect`: run a task, show settings, seed blocks, serve the keruta API.

Bad input of any kind (an option, a file, a setting, a stored block, the database or Prefect server
a setting points at) ends with one line on stderr naming the field and the value, and exit code 2; a
task that did not complete ends with exit code 1; anything unexpected ends with one line and exit
code 4 (``--debug`` or ``KERUTA_DEBUG=1`` shows its traceback). Never a bare traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from keruta_prefect.backends.base import BackendError, TransientBackendError
from keruta_prefect.cli.options import EXIT_TASK_FAILED, EXIT_UNEXPECTED, EXIT_USAGE, UsageError
from keruta_prefect.cli.parser import build_parser
from keruta_prefect.contract import Env
from keruta_prefect.models import TaskSpecError
from keruta_prefect.settings import SettingsError
from keruta_prefect.validation import single_line

# Prefect gives its temporary (ephemeral) server 20 s to start; a first start (database creation and
# migrations) on a 2-core machine takes longer. Ours unless the user set the setting (env or profile).
EPHEMERAL_STARTUP_TIMEOUT = 180
DEBUG_HINT = "run with --debug (or KERUTA_DEBUG=1) to see the traceback"


def _uses_prefect(args: argparse.Namespace) -> bool:
    if args.command == "doctor":
        return bool(args.settings_block and not args.properties)
    if args.command == "api":
        return not os.environ.get(Env.API_TOKEN)
    return args.command in ("run", "blocks", "dispatch", "pipeline", "reconcile")


@contextlib.contextmanager
def _prefect_defaults() -> Iterator[int]:
    """A generous startup time for Prefect's temporary server and no telemetry, as *defaults*: a value the
    user set (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_SERVER_ANALYTICS_ENABLED in the
    environment or a Prefect profile) wins."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED as ANALYTICS
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT
    from prefect.settings import temporary_settings

    # The temporary server's telemetry is off unless the user turned it on: it would report to the internet
    # from a command-line tool, and where there is none it logs an ERROR on every first start.
    with temporary_settings(set_defaults={STARTUP_TIMEOUT: EPHEMERAL_STARTUP_TIMEOUT, ANALYTICS: False}) as settings:
        yield settings.server.ephemeral.startup_timeout_seconds


def error_line(exc: BaseException, *, startup_timeout: int | None = None) -> tuple[int, str]:
    """The exit code and the one line for an error: bad input (2) names the field and the value."""
    if isinstance(exc, SettingsError | TaskSpecError | UsageError) or (
        isinstance(exc, LookupError) and not isinstance(exc, KeyError | IndexError)  # e.g. task not found
    ):
        return EXIT_USAGE, single_line(str(exc)) or type(exc).__name__
    if isinstance(exc, BackendError | TransientBackendError):  # the cluster refused, or did not answer
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
    debug = args.debug or os.environ.get(Env.DEBUG, "").strip().lower() not in ("", "0", "false", "no")
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


__all__ = ["build_parser", "error_line", "main"]
