"""Follow a container's log while it runs; after a drop, resume with sinceTime, losing and
repeating nothing.

The API answers sinceTime with one-second precision (from the start of that second), so after a
resume the lines up to the last one seen are skipped by their full-precision timestamps (the request
asks for timestamps). A line cut in half by a drop is not passed on: it comes again, whole, after the
resume. Bytes are decoded as UTF-8 incrementally (a character split across chunks stays whole).
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections.abc import Callable

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("keruta.kubernetes")


class LogFollower:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, pod: str, on_line: Callable[[str, str], None],
                 finished: Callable[[], bool], container: str = "main", read_timeout: float = 300) -> None:
        self.api = api
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self.on_line = on_line
        self.finished = finished
        self.read_timeout = read_timeout
        self.last_stamp: str | None = None
        self.same_stamp = 0  # lines already passed on that carry exactly last_stamp
        self.lines = 0
        self._skip = 0  # after a resume: lines at exactly last_stamp that come again
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"keruta-log-{pod}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

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
        self.on_line(stamp, text)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                response = self._request()
            except ApiException as exc:
                if exc.status == 404:
                    return  # the Pod is gone
                if exc.status == 400 and self.finished():
                    return
                time.sleep(backoff)  # 400: not started yet; 5xx: the API is busy
                backoff = min(backoff * 2, 5)
                continue
            except (urllib3.exceptions.HTTPError, OSError):
                time.sleep(backoff)
                backoff = min(backoff * 2, 5)
                continue
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
                    backoff = 0.2
                    if self._stop.is_set():
                        return
                clean = True
            except (urllib3.exceptions.HTTPError, OSError):
                pass  # dropped mid-stream: the partial line in `pending` comes again after the resume
            finally:
                response.release_conn()
            if clean:
                pending += decoder.decode(b"", final=True)
                if pending:
                    stamp, _, text = pending.partition(" ")
                    self._accept(stamp, text)
                if self.finished():
                    return
            time.sleep(backoff if not clean else 0.05)

