"""keruta-agent's memory for unsent log lines is bounded while the keruta API is away.

The shipper runs in this process (so its memory can be read) and sends over real HTTP on loopback to the real
API, through a test-only front (tests/test_agent_shipping.py's ``Front``) that answers 503 to every log batch
until told the API is back. The lines come from a real script's stdout, read as the agent reads them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from keruta_prefect.agent.runner import MEMORY_BYTES, LogShipper
from keruta_prefect.agent.runner import pump as _pump
from keruta_prefect.client import KerutaClient
from keruta_prefect.store import Store
from tests.conftest import Api
from tests.test_agent_shipping import Front, make, script_rows
from tests.waiting import eventually

LINES = 50_000
PAD = 400


class Outage:
    """Decides the front's answers: 503 to log batches while down; records the seqs it lets through."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.down.set()
        self.sent: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> tuple[int, str] | None:
        if not path.endswith("/logs"):
            return None
        if self.down.is_set():
            return 503, "Service Unavailable"
        with self.lock:
            self.sent.extend(line["seq"] for line in json.loads(body)["lines"])
        return None


def expected(i: int) -> str:
    return f"{i:07d} " + "x" * PAD


def test_a_chatty_script_during_an_outage_is_held_in_bounded_memory_and_every_line_arrives_once_in_order(
        api: Api, store: Store, tmp_path: Path) -> None:
    make(store, "chatty", "echo never")
    spool = tmp_path / "w" / ".keruta" / "unsent-logs.jsonl"
    outage = Outage()
    script = f"import sys\nw = sys.stdout.write\nfor i in range({LINES}): w(f'{{i:07d}} ' + 'x' * {PAD} + '\\n')\n"
    with Front(api.url, refuse=outage) as front, \
            KerutaClient(front.url, api.token, retry_seconds=0) as client:
        shipper = LogShipper(client, "chatty", spool, retry_seconds=300)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        _pump(proc.stdout, shipper, False)  # every line of the script, read while the API answers 503
        assert proc.wait(30) == 0
        assert front.count(503) >= 1
        # 50,000 lines of ~460 bytes of JSON are ~23 MB: most of them wait on disk, not in memory.
        assert shipper.peak_pending_bytes <= MEMORY_BYTES, shipper.peak_pending_bytes
        assert shipper.pending_bytes <= MEMORY_BYTES
        assert shipper.waiting_in_spool >= LINES // 2, shipper.waiting_in_spool
        assert spool.stat().st_size > MEMORY_BYTES

        outage.down.clear()  # the API is back: the shipper takes the spooled lines back, in order
        eventually(lambda: len(outage.sent) >= 1000, what="batches sent after the API came back")
        for i in range(LINES, LINES + 500):  # newer lines, while older ones still wait to be sent
            shipper.emit("INFO", expected(i))
        assert shipper.close(60) == 0
        assert shipper.peak_pending_bytes <= MEMORY_BYTES, shipper.peak_pending_bytes

    assert shipper.lost == 0 and shipper.refused is None and shipper.failure is None
    assert outage.sent == list(range(LINES + 500))  # sent in order, each once
    assert [m for _, m in script_rows(store, "chatty")] == [expected(i) for i in range(LINES + 500)]
    assert not spool.exists() or spool.read_bytes() == b""  # nothing left unsent


def test_lines_spooled_during_an_outage_that_outlasts_the_budget_are_left_in_order_in_the_spool(
        api: Api, store: Store, tmp_path: Path) -> None:
    """The API never comes back: the spool ends up with every unsent line, in order, once; memory stays bounded
    (a small bound here, so the lines in memory at close come before those already on disk)."""
    make(store, "never", "echo never")
    spool = tmp_path / "w" / ".keruta" / "unsent-logs.jsonl"
    spool.parent.mkdir(parents=True)
    spool.write_text('{"seq": -1, "message": "from before"}\n')  # an earlier run's lines are kept
    outage = Outage()
    bound = 64 * 1024
    with Front(api.url, refuse=outage) as front, \
            KerutaClient(front.url, api.token, retry_seconds=0) as client:
        shipper = LogShipper(client, "never", spool, memory_bytes=bound, retry_seconds=1)
        for i in range(20_000):
            shipper.emit("INFO", expected(i))
        eventually(lambda: front.count(503) >= 1, what="a batch to be tried")
        assert shipper.close(0.5) == 20_000
    assert shipper.peak_pending_bytes <= bound
    rows = [json.loads(line) for line in spool.read_text().splitlines()]
    assert rows[0]["message"] == "from before"
    assert [r["message"] for r in rows[1:]] == [expected(i) for i in range(20_000)]
    assert [r["seq"] for r in rows[1:]] == list(range(20_000))
    assert script_rows(store, "never") == []



def test_a_spool_that_cannot_be_written_keeps_the_lines_in_memory_while_they_fit(
        api: Api, store: Store, tmp_path: Path) -> None:
    """Past --api-retry-seconds lines go to the spool; when it cannot be written (its directory is a file
    here; a full disk alike) and memory still has room, they wait in memory instead of being lost."""
    make(store, "unwritable", "echo never")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    outage = Outage()
    with Front(api.url, refuse=outage) as front, \
            KerutaClient(front.url, api.token, retry_seconds=0) as client:
        shipper = LogShipper(client, "unwritable", blocker / "unsent-logs.jsonl", retry_seconds=0)
        shipper.emit("INFO", "first")
        eventually(lambda: front.count(503) >= 1, what="a batch to be tried")
        for i in range(10):
            shipper.emit("INFO", f"line {i}")  # past the retry budget: to the spool, which cannot be written
        assert shipper.lost == 0 and shipper.pending_bytes > 0
        outage.down.clear()
        assert shipper.close(30) == 0
    assert shipper.lost == 0
    assert [m for _, m in script_rows(store, "unwritable")] == ["first"] + [f"line {i}" for i in range(10)]
