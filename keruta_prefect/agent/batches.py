"""Log lines and the batches they are sent in (pure: sizes, counts and messages, no I/O).

A batch is one ``POST /api/v1/tasks/{id}/logs`` body: ``{"source": …, "lines": [...]}``. Its size is counted
in bytes of that JSON body exactly as :func:`keruta_prefect.client.encode_json` sends it, so a batch never
exceeds what the API (16 MiB) and common proxies (ingress-nginx: 1 MiB) take.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keruta_prefect.client import ApiRejected, encode_json

MAX_LINE_BYTES = 16 * 1024  # longer lines are sent in pieces of this size
BATCH_LINES = 2000  # the API takes up to 5,000 lines per batch
# Bytes of JSON body per batch: the API takes 16 MiB, a default ingress-nginx 1 MiB (proxy-body-size).
BATCH_BYTES = 512 * 1024
MIN_BATCH_BYTES = 4 * 1024  # a 413 never shrinks batches below this (a single line is always sent alone)
REFUSED_IN_A_ROW = 32  # this many single lines refused in a row: a refusal of every line, not of some
REFUSALS_SHOWN = 5  # seqs named per reason in the report of refused lines

# The source of the agent's lines: one per agent session, so the API stores each (source, seq) once.
SOURCE_PREFIX = "agent-"
_SOURCE_ID_CHARS = 16
ENVELOPE_BYTES = len(encode_json({"source": SOURCE_PREFIX + "0" * _SOURCE_ID_CHARS, "lines": []}))


def new_source() -> str:
    """A fresh source name for one agent session's lines."""
    return SOURCE_PREFIX + os.urandom(_SOURCE_ID_CHARS // 2).hex()  # (not uuid: it loads platform)


@dataclass
class Line:
    """One numbered log line, and the bytes it adds to a batch's JSON body."""

    item: dict[str, Any]
    size: int
    report: bool = False  # the agent's own report of refused lines (never reported again if refused)

    @classmethod
    def of(cls, item: dict[str, Any], report: bool = False) -> Line:
        return cls(item, len(encode_json(item)) + 1, report)  # + the comma between items


def split_message(message: str, limit: int = MAX_LINE_BYTES) -> list[str]:
    """A message in pieces of at most ``limit`` UTF-8 bytes, never cutting a character (as the agent sends
    a script's long lines)."""
    pieces: list[str] = []
    data = message.encode("utf-8", "surrogateescape")
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # not inside a multi-byte character
            cut -= 1
        pieces.append(data[:cut].decode("utf-8", "replace"))
        data = data[cut:]
    pieces.append(data.decode("utf-8", "replace"))
    return pieces


def batch_length(lines: Sequence[Line], max_lines: int, max_bytes: int) -> int:
    """How many leading lines make one batch: at most ``max_lines``, a JSON body of at most ``max_bytes``
    (envelope included), and always at least one line (a line alone is never held back)."""
    total = ENVELOPE_BYTES
    for count, line in enumerate(lines[:max_lines]):
        total += line.size
        if total > max_bytes and count > 0:
            return count
    return min(len(lines), max_lines)


def bytes_after_too_large(batch: Sequence[Line], max_bytes: int) -> int:
    """The batch size bound after ``batch`` was refused as too large (413): half its body, never more than
    the bound before, never under MIN_BATCH_BYTES."""
    size = ENVELOPE_BYTES + sum(line.size for line in batch)
    return max(MIN_BATCH_BYTES, min(max_bytes, size // 2))


def refusal_report(refused: Sequence[tuple[Line, ApiRejected]]) -> list[str]:
    """One message per distinct reason: how many lines were refused, which, and why."""
    by_reason: dict[str, list[int]] = {}
    for line, exc in refused:
        reason = f"HTTP {exc.status}: {exc.detail}"
        by_reason.setdefault(reason, []).append(int(line.item["seq"]))
    messages = []
    for reason, seqs in by_reason.items():
        shown = ", ".join(str(s) for s in seqs[:REFUSALS_SHOWN]) + (", …" if len(seqs) > REFUSALS_SHOWN else "")
        noun = "line" if len(seqs) == 1 else "lines"
        messages.append(f"keruta API refused {len(seqs)} log {noun} (seq {shown}); dropped: {reason}")
    return messages
