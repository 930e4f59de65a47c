"""Follow a container's log while it runs; after a drop, resume with sinceTime, losing and
repeating nothing.

The API answers sinceTime with one-second precision (from the start of that second), so after a
resume the lines up to the last one seen are skipped by their full-precision timestamps (the request
asks for timestamps). A line cut in half by a drop is not passed on: it comes again, whole, after the
resume. Bytes are decoded as UTF-8 incrementally (a character split across chunks stays whole).

The follower never dies silently: a callback that raises is logged (with its traceback) and the
following goes on; a refusal that retrying cannot fix (401, 403) ends it with ``error`` set; server
errors are retried with a warning; anything unexpected is logged and retried a few times, then ends
it with ``error`` set. ``on_end`` is called whenever it ends, so whoever waits on it hears of it.
It always ends by itself: the container ended (``finished()``), the Pod is gone, ``stop()``, or the
``deadline`` (monotonic seconds) set with ``expire_at``.
"""

from __future__ import annotations

import codecs
import contextvars
import logging
import threading
import time
from collections.abc import Callable

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from keruta_prefect.backends.kubernetes.client import api_detail

log = logging.getLogger("keruta.kubernetes")

AGENT_PREFIX = "keruta-agent "
_AGENT_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "WARN": "WARN", "ERROR": "ERROR",
                 "CRITICAL": "CRITICAL"}
MAX_UNEXPECTED = 5  # unexpected errors in a row before a follower gives up (with `error` set)

_active: set[LogFollower] = set()
_active_lock = threading.Lock()


def line_level(text: str) -> str:
    """The level of a Pod log line: the agent's own lines (``keruta-agent LEVEL message``) carry theirs;
    everything else is the script's output (stdout or stderr: progress and diagnostics), INFO."""
    if text.startswith(AGENT_PREFIX):
        return _AGENT_LEVELS.get(text[len(AGENT_PREFIX):].split(" ", 1)[0], "INFO")
    return "INFO"


class LogFollower:
    """Call ``start()`` once the callbacks can run (the thread does not start in ``__init__``).

    ``on_line(seq, stamp, text)``: ``seq`` is the line's place (1, 2, …) in the container's log."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, pod: str,
                 on_line: Callable[[int, str, str], None], finished: Callable[[], bool], container: str = "main",
                 read_timeout: float = 300, on_end: Callable[[LogFollower], None] | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self.on_line = on_line
        self.finished = finished
        self.on_end = on_end
        self.read_timeout = read_timeout
        self.last_stamp: str | None = None
        self.same_stamp = 0  # lines already passed on that carry exactly last_stamp
        self.lines = 0
        self.error: str | None = None  # why it stopped before the container's end, if it did
        self.deadline: float | None = None
        self._skip = 0  # after a resume: lines at exactly last_stamp that come again
        self.ended = threading.Event()  # set when it has stopped following (before on_end is called)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._response: urllib3.response.BaseHTTPResponse | None = None
        self._callback_failures = 0
        self._context = contextvars.Context()
        self.thread = threading.Thread(target=lambda: self._context.run(self._main), name=f"keruta-log-{pod}",
                                       daemon=True)

    def start(self) -> LogFollower:
        """Start following, in a copy of the caller's context: the callbacks log to the caller's flow run
        with its Prefect settings (the API it talks to), even after the caller has moved on."""
        self._context = contextvars.copy_context()
        with _active_lock:
            _active.add(self)
        self.thread.start()
        return self

    def stop(self) -> None:
        """End soon: also interrupts a read that is waiting for the next line."""
        self._stop.set()
        self._wake.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # type: ignore[attr-defined]
            except Exception:
                pass  # already released or closed: the thread is not blocked on it

    def wake(self) -> None:
        """Cut a pause between attempts short (e.g. the container has ended: look now)."""
        self._wake.set()

    def expire_at(self, deadline: float) -> None:
        """End at ``deadline`` (time.monotonic()) at the latest."""
        self.deadline = deadline
        self._wake.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _over(self) -> bool:
        if self._stop.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop()
            return True
        return False

    def _pause(self, seconds: float) -> None:
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        self._wake.wait(seconds)
        self._wake.clear()

    def _request(self) -> urllib3.response.BaseHTTPResponse:
        query: list[tuple[str, str]] = [("container", self.container), ("follow", "true"), ("timestamps", "true")]
        if self.last_stamp:
            query.append(("sinceTime", self.last_stamp[:19] + "Z"))
        # read_namespaced_pod_log has no since_time parameter: the same GET through the client's own
        # serializer and auth, with the query the API documents (PodLogOptions.sinceTime).
        params = self.api.param_serialize(
            "GET", "/api/v1/namespaces/{namespace}/pods/{name}/log",
            path_params={"namespace": self.namespace, "name": self.pod},
            query_params=query, auth_settings=["BearerToken"])
        response = self.api.call_api(*params, _request_timeout=(10, self.read_timeout))
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException(http_resp=response)
        return response.response

    def _accept(self, stamp: str, text: str) -> None:
        if self.last_stamp is not None:
            if stamp < self.last_stamp:
                return
            if stamp == self.last_stamp:
                if self._skip > 0:
                    self._skip -= 1
                    return
                self.same_stamp += 1
            else:
                self.same_stamp = 1
                self._skip = 0
        else:
            self.same_stamp = 1
        self.last_stamp = stamp
        self.lines += 1
        try:
            self.on_line(self.lines, stamp, text)
        except Exception:  # e.g. the database refused the line: that line is lost, the following goes on
            self._callback_failures += 1
            if self._callback_failures == 1 or self._callback_failures % 100 == 0:
                log.warning("a log line of Pod %s/%s could not be handled (%d so far); following on",
                            self.namespace, self.pod, self._callback_failures, exc_info=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("following the log of Pod %s/%s ended unexpectedly", self.namespace, self.pod, exc_info=True)
        finally:
            with _active_lock:
                _active.discard(self)
            self.ended.set()
            if self.on_end is not None:
                try:
                    self.on_end(self)
                except Exception:
                    log.warning("the end of the log of Pod %s/%s could not be handled", self.namespace, self.pod,
                                exc_info=True)

    def _run(self) -> None:
        backoff = 0.2
        failing: str | None = None  # the current streak of server errors, said once
        unexpected = 0
        while not self._over():
            try:
                self._response = self._request()
            except ApiException as exc:
                if exc.status == 404:
                    return  # the Pod is gone
                if exc.status == 400 and self.finished():
                    return  # it will not start (or has ended with nothing more to read)
                if exc.status in (401, 403):
                    self.error = (f"reading the log of Pod {self.pod} is refused: HTTP {exc.status}: {api_detail(exc)}"
                                  " — grant `get` on `pods/log` (deployments/rbac.yaml)")
                    log.error("%s", self.error)
                    return
                if exc.status != 400:  # 400: not started yet, the normal case; others: say so once a streak
                    reason = f"HTTP {exc.status}: {api_detail(exc)}"
                    if failing is None:
                        log.warning("reading the log of Pod %s/%s failed (%s); retrying", self.namespace, self.pod,
                                    reason)
                    failing = reason
                    if self.finished():
                        self.error = f"the log of Pod {self.pod} could not be read to its end ({reason})"
                        return
                self._pause(backoff)
                backoff = min(backoff * 2, 5)
                continue
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if failing is None:
                    log.info("reading the log of Pod %s/%s: %s; retrying", self.namespace, self.pod,
                             type(exc).__name__)
                failing = type(exc).__name__
                if self.finished():
                    self.error = f"the log of Pod {self.pod} could not be read to its end ({failing})"
                    return
                self._pause(backoff)
                backoff = min(backoff * 2, 5)
                continue
            except Exception:
                unexpected += 1
                log.warning("reading the log of Pod %s/%s hit an unexpected error (%d in a row)",
                            self.namespace, self.pod, unexpected, exc_info=True)
                if unexpected >= MAX_UNEXPECTED:
                    raise
                self._pause(backoff)
                backoff = min(backoff * 2, 5)
                continue
            if failing is not None:
                log.info("reading the log of Pod %s/%s again", self.namespace, self.pod)
                failing = None
            unexpected = 0
            if self._read(self._response):
                if self.finished():
                    return
                self._pause(0.05)
            else:
                self._pause(backoff)

    def _read(self, response: urllib3.response.BaseHTTPResponse) -> bool:
        """Pass on the lines of one response; True when it ended cleanly (not dropped)."""
        # Lines carrying the last timestamp seen come again after a resume: skip that many.
        self._skip = self.same_stamp if self.last_stamp else 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        clean = False
        try:
            for chunk in response.stream(65536, decode_content=True):
                pending += decoder.decode(chunk)
                *complete, pending = pending.split("\n")
                for line in complete:
                    stamp, _, text = line.partition(" ")
                    self._accept(stamp, text.rstrip("\r"))
                if self._over():
                    return False
            clean = not self._stop.is_set()  # a stop() shuts the stream: not the container's end
        except (urllib3.exceptions.HTTPError, OSError):
            pass  # dropped mid-stream: the partial line in `pending` comes again after the resume
        finally:
            self._response = None
            if self._stop.is_set():
                response.close()
            else:
                response.release_conn()
        if clean:
            pending += decoder.decode(b"", final=True)
            if pending:
                stamp, _, text = pending.partition(" ")
                self._accept(stamp, text)
        return clean


def active_followers() -> list[LogFollower]:
    with _active_lock:
        return list(_active)


def stop_all() -> None:
    """Stop every follower of this process (tests: before their cluster goes)."""
    for follower in active_followers():
        follower.stop()
