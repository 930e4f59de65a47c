"""Artifact caps, checksums and storage: one code path whatever the backend delivered the files from.

Every backend hands over a tar stream (exec in a Pod, `tar` of a local work directory); it is extracted
as it streams, in 1 MiB chunks, hashed on the way, capped per file and in total; whatever is left out
is reported by name and reason, never silently dropped.

- ``result``: :class:`CollectResult` (files kept, notes on what was left out), the errors, ``attempt_dir``;
- ``extract``: the safe streaming extractor, :func:`extract_tar_stream`;
- ``publish``: moving the extracted tree into place, all or nothing;
- ``tar``: :func:`collect_with_tar`, a local directory through the ``tar`` program.
"""

from keruta_prefect.artifacts.extract import (
    CHUNK,
    MAX_HEADER_BYTES,
    MAX_MEMBER_HEADER_BYTES,
    MAX_MEMBERS,
    MAX_NAMES_BYTES,
    entry_name,
    extract_tar_stream,
)
from keruta_prefect.artifacts.result import (
    MAX_LOST_CHARS,
    MAX_NOTE_BYTES,
    MAX_NOTE_CHARS,
    MAX_NOTES,
    ArchiveRejected,
    CollectResult,
    PublishStranded,
    attempt_dir,
)
from keruta_prefect.artifacts.tar import MAX_TAR_NOTES, collect_with_tar, tar_complaints

__all__ = [
    "CHUNK",
    "MAX_HEADER_BYTES",
    "MAX_LOST_CHARS",
    "MAX_MEMBERS",
    "MAX_MEMBER_HEADER_BYTES",
    "MAX_NAMES_BYTES",
    "MAX_NOTES",
    "MAX_NOTE_BYTES",
    "MAX_NOTE_CHARS",
    "MAX_TAR_NOTES",
    "ArchiveRejected",
    "CollectResult",
    "PublishStranded",
    "attempt_dir",
    "collect_with_tar",
    "entry_name",
    "extract_tar_stream",
    "tar_complaints",
]
