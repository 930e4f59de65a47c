"""What a collection of artifacts gives (files kept, notes on what was left out) and its errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from keruta_prefect.errors import PermanentError
from keruta_prefect.models import ArtifactInfo


@dataclass
class CollectResult:
    files: list[ArtifactInfo] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    lost: str | None = None  # "artifacts lost: <reason>" when nothing could be collected
    uploaded: bool = False  # the agent uploaded them through the API: they are recorded already

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def note(self) -> str | None:
        """What was lost or left out, in one bounded line (it is stored, printed and sent): the first
        ``MAX_NOTES`` notes, each at most ``MAX_NOTE_CHARS`` characters, then how many more; at most
        ``MAX_NOTE_BYTES`` bytes of UTF-8 in all."""
        parts = []
        if self.lost:
            parts.append(shortened(self.lost, MAX_LOST_CHARS))
        if self.skipped:
            shown = "; ".join(shortened(note, MAX_NOTE_CHARS) for note in self.skipped[:MAX_NOTES])
            more = len(self.skipped) - MAX_NOTES
            parts.append("not kept: " + shown + (f"; … and {more} more" if more > 0 else ""))
        text = " | ".join(parts)
        if len(text) * 4 > MAX_NOTE_BYTES and len(encoded := text.encode("utf-8", "backslashreplace")) > MAX_NOTE_BYTES:
            text = encoded[:MAX_NOTE_BYTES - 3].decode("utf-8", "ignore") + "…"  # "…" is 3 bytes
        return text or None


MAX_NOTES = 20  # notes named one by one in CollectResult.note(); the rest are counted
MAX_NOTE_CHARS = 200  # one note, shortened in the middle (its reason is at the end)
MAX_LOST_CHARS = 1000  # why the artifacts were lost
MAX_NOTE_BYTES = 8 << 10  # the whole note


def shortened(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its start and end around an ellipsis."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def shown_name(raw: str) -> str:
    """An entry's name in a rejection reason: quoted, on one line, and shortened."""
    return shortened(repr(raw), MAX_NOTE_CHARS)


def attempt_dir(root: Path, task_id: str, attempt: int) -> Path:
    """`<root>/<task id, path-safe>/attempt-<n>`: where an attempt's files live (work or storage)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)
    return root / safe / f"attempt-{attempt}"


class ArchiveRejected(PermanentError, ValueError):
    """A hostile or broken archive: nothing of it is kept."""


class PublishStranded(PermanentError, OSError):
    """Publishing failed and undoing it failed too: the staging directory named in the message is left
    in place, because it holds files of the destination that were moved aside."""
