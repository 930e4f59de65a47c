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
from collections.abc import Callable

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from keruta_prefect.backends.kubernetes.api import (
    CONNECT_TIMEOUT,
    BadRequest,
    Forbidden,
    KubeError,
    NotFound,
    Unauthorized,
    Unreachable,
    kube_error,
    translated,
)
from keruta_prefect.backoff import SYSTEM_CLOCK, Backoff, Clock
from keruta_prefect.contract import AGENT_LOG_PREFIX

log = logging.getLogger("keruta.kubernetes")

AGENT_PREFIX = AGENT_LOG_PREFIX  # the agent's own lines: "keruta-agent LEVEL message"
_AGENT_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "WARN": "WARN", "ERROR": "ERROR",
                 "CRITICAL": "CRITICAL"}
MAX_UNEXPECTED = 5  # unexpected errors in a row before a follower gives up (with `error` set)
BACKOFF_INITIAL = 0.2  # first pause before asking for the log again (not started yet, or a failure)…
BACKOFF_CAP = 5.0  # …doubling up to this
RESUME_PAUSE = 0.05  # the stream ended cleanly but the container runs on: ask again almost at once
CHUNK_SIZE = 65536  # bytes read from the log stream at a time

_active: set[LogFollower] = set()
_active_lock = threading.Lock()


def line_level(text: str) -> str:
    """The level of a Pod log line: the agent's own lines (``keruta-agent LEVEL message``) carry theirs;
    everything else is the script's output (stdout or stderr: progress and diagnostics), INFO."""
    if text.startswith(AGENT_PREFIX):
        return _AGENT_LEVELS.get(text[len(AGENT_PREFIX):].split(" ", 1)[0], "INFO")
    return "INFO"


class ResumeCursor:
    """Where a followed log stands, so that a resume repeats and loses nothing. Pure.

    The API answers ``sinceTime`` with one-second precision (from the start of that second): after a
    resume the lines from there up to the last one passed on come again. They are known by their
    full-precision timestamps: older ones are dropped, and of those carrying exactly the last timestamp,
    as many as were passed on already."""

    def __init__(self) -> None:
        self.last_stamp: str | None = None
        self.same_stamp = 0  # lines already passed on that carry exactly last_stamp
        self.lines = 0  # lines passed on so far (the next one is number lines + 1)
        self._skip = 0  # in this response: lines at exactly last_stamp still to come again

    def since_time(self) -> str | None:
        """The ``sinceTime`` to resume from (None: from the start)."""
        return self.last_stamp[:19] + "Z" if self.last_stamp else None

    def resume(self) -> None:
        """A new response begins (from ``since_time()``)."""
        self._skip = self.same_stamp if self.last_stamp else 0

    def accept(self, stamp: str) -> int | None:
        """The line's number in the container's log (1, 2, …) if it is new; None if it was passed on already."""
        if self.last_stamp is not None:
            if stamp < self.last_stamp:
                return None
            if stamp == self.last_stamp:
                if self._skip > 0:
                    self._skip -= 1
                    return None
                self.same_stamp += 1
            else:
                self.same_stamp = 1
                self._skip = 0
        else:
            self.same_stamp = 1
        self.last_stamp = stamp
        self.lines += 1
        return self.lines


class _Following:
    """A follower's life: its thread, stop(), wake(), a deadline on an injectable clock, and pauses that
    any of them cut short."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.clock = clock  # deadline and pauses are read on it
        self.deadline: float | None = None
        self.ended = threading.Event()  # set when it has stopped following (before on_end is called)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._response: urllib3.response.BaseHTTPResponse | None = None
        self._context = contextvars.Context()
        self.thread = threading.Thread(target=lambda: self._context.run(self._main), name=name, daemon=True)

    def _main(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """End soon: also interrupts a read that is waiting for the next line."""
        self._stop.set()
        self._wake.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:
                pass  # already released or closed: the thread is not blocked on it

    def wake(self) -> None:
        """Cut a pause between attempts short (e.g. the container has ended: look now)."""
        self._wake.set()

    def expire_at(self, deadline: float) -> None:
        """End at ``deadline`` (``clock.now()``) at the latest."""
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
        if self.deadline is not None and self.clock.now() >= self.deadline:
            self.stop()
            return True
        return False

    def _pause(self, backoff: Backoff | None = None, seconds: float = 0.0) -> None:
        """The next pause of ``backoff`` (or ``seconds``), cut short by wake(), stop() and the deadline."""
        left = None if self.deadline is None else self.deadline - self.clock.now()
        if backoff is not None:
            backoff.pause(self.clock, self._wake, at_most=left)
        else:
            self.clock.wait(seconds if left is None else min(seconds, max(0.0, left)), self._wake)
        self._wake.clear()


class LogFollower(_Following):
    """Call ``start()`` once the callbacks can run (the thread does not start in ``__init__``).

    ``on_line(seq, stamp, text)``: ``seq`` is the line's place (1, 2, …) in the container's log."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, pod: str,
                 on_line: Callable[[int, str, str], None], finished: Callable[[], bool], container: str = "main",
                 read_timeout: float = 300, on_end: Callable[[LogFollower], None] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(f"keruta-log-{pod}", clock)
        self.api = api
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self.on_line = on_line
        self.finished = finished
        self.on_end = on_end
        self.read_timeout = read_timeout
        self.cursor = ResumeCursor()
        self.error: str | None = None  # why it stopped before the container's end, if it did
        self._callback_failures = 0

    def start(self) -> LogFollower:
        """Start following, in a copy of the caller's context: the callbacks log to the caller's flow run
        with its Prefect settings (the API it talks to), even after the caller has moved on."""
        self._context = contextvars.copy_context()
        with _active_lock:
            _active.add(self)
        self.thread.start()
        return self

    def _accept(self, stamp: str, text: str) -> None:
        seq = self.cursor.accept(stamp)
        if seq is None:
            return
        try:
            self.on_line(seq, stamp, text)
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
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_CAP)
        failing: str | None = None  # the current streak of server errors, said once
        unexpected = 0
        while not self._over():
            try:
                self._response = open_log(self.api, self.namespace, self.pod, self.container,
                                          self.cursor.since_time(), self.read_timeout)
            except NotFound:
                return  # the Pod is gone
            except BadRequest:  # not started yet (the normal case), or ended with nothing more to read
                if self.finished():
                    return
                self._pause(backoff)
                continue
            except (Unauthorized, Forbidden) as exc:
                self.error = (f"reading the log of Pod {self.pod} is refused: HTTP {exc.status}: {exc.detail}"
                              " — grant `get` on `pods/log` (deployments/rbac.yaml)")
                log.error("%s", self.error)
                return
            except KubeError as exc:  # server errors, a dropped connection: say so once a streak, try again
                reason = exc.kind if isinstance(exc, Unreachable) else exc.answer
                if failing is None:
                    if isinstance(exc, Unreachable):
                        log.info("reading the log of Pod %s/%s: %s; retrying", self.namespace, self.pod, reason)
                    else:
                        log.warning("reading the log of Pod %s/%s failed (%s); retrying", self.namespace, self.pod,
                                    reason)
                failing = reason
                if self.finished():
                    self.error = f"the log of Pod {self.pod} could not be read to its end ({reason})"
                    return
                self._pause(backoff)
                continue
            except Exception:
                unexpected += 1
                log.warning("reading the log of Pod %s/%s hit an unexpected error (%d in a row)",
                            self.namespace, self.pod, unexpected, exc_info=True)
                if unexpected >= MAX_UNEXPECTED:
                    raise
                self._pause(backoff)
                continue
            if failing is not None:
                log.info("reading the log of Pod %s/%s again", self.namespace, self.pod)
                failing = None
            unexpected = 0
            if self._read(self._response):
                if self.finished():
                    return
                self._pause(seconds=RESUME_PAUSE)
            else:  # dropped mid-stream: the pause reached so far, unchanged (the request itself succeeded)
                self._pause(seconds=backoff.current)

    def _read(self, response: urllib3.response.BaseHTTPResponse) -> bool:
        """Pass on the lines of one response; True when it ended cleanly (not dropped)."""
        self.cursor.resume()  # lines carrying the last timestamp seen come again: skip that many
        try:
            return read_lines(response, self._accept, self._over) and not self._stop.is_set()
        finally:  # a stop() shuts the stream: not the container's end
            self._response = None
            if self._stop.is_set():
                response.close()
            else:
                response.release_conn()


def open_log(api: kubernetes.client.ApiClient, namespace: str, pod: str, container: str, since: str | None,
             read_timeout: float) -> urllib3.response.BaseHTTPResponse:
    """``GET …/pods/{pod}/log?follow=true&timestamps=true[&sinceTime=…]``: the open stream, or a KubeError."""
    query: list[tuple[str, str]] = [("container", container), ("follow", "true"), ("timestamps", "true")]
    if since:
        query.append(("sinceTime", since))
    # read_namespaced_pod_log has no since_time parameter: the same GET through the client's own
    # serializer and auth, with the query the API documents (PodLogOptions.sinceTime).
    params = api.param_serialize(
        "GET", "/api/v1/namespaces/{namespace}/pods/{name}/log",
        path_params={"namespace": namespace, "name": pod}, query_params=query, auth_settings=["BearerToken"])
    what = f"read the log of Pod {namespace}/{pod}"
    with translated(what):
        response = api.call_api(*params, _request_timeout=(CONNECT_TIMEOUT, read_timeout))
        if not 200 <= response.status <= 299:
            response.read()
            refusal = ApiException(http_resp=response)
            raise kube_error(refusal, what) from refusal
    stream: urllib3.response.BaseHTTPResponse = response.response  # the client types it Any
    return stream


def read_lines(response: urllib3.response.BaseHTTPResponse, accept: Callable[[str, str], None],
               over: Callable[[], bool]) -> bool:
    """Hand each "<timestamp> <text>" line of a log stream to ``accept``; True when the stream ended
    cleanly, False when it was dropped (the partial last line comes again after a resume) or ``over()``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        for chunk in response.stream(CHUNK_SIZE, decode_content=True):
            pending += decoder.decode(chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                stamp, _, text = line.partition(" ")
                accept(stamp, text.rstrip("\r"))
            if over():
                return False
    except (urllib3.exceptions.HTTPError, OSError):
        return False  # dropped mid-stream
    if over():  # stopped: the stream was shut, not ended by the container
        return False
    pending += decoder.decode(b"", final=True)
    if pending:
        stamp, _, text = pending.partition(" ")
        accept(stamp, text)
    return True


def active_followers() -> list[LogFollower]:
    with _active_lock:
        return list(_active)


def stop_all() -> None:
    """Stop every follower of this process (tests: before their cluster goes)."""
    for follower in active_followers():
        follower.stop()
