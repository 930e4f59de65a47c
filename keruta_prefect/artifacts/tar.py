"""Collecting a local directory with the `tar` program, streamed into the extractor."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from keruta_prefect.artifacts.extract import CHUNK, extract_tar_stream
from keruta_prefect.artifacts.result import ArchiveRejected, CollectResult

MAX_TAR_NOTES = 1000  # complaints of tar named one by one; the rest are counted
_TAR_PROGRAM = re.compile(r"^[^:\s]*tar: ")  # how tar starts its messages: `tar: `, `/usr/bin/tar: `, `bsdtar: `


def collect_with_tar(source: Path, dest: Path, *, max_file_size: int, max_total_size: int) -> CollectResult:
    """``tar cf - -C <source> .`` on this machine, extracted into ``dest`` as it streams.

    tar's stderr goes to an unlinked temporary file, never a pipe nobody reads (tar would stop for good
    at 64 KiB of warnings, and the collection with it). Files tar could not read, or left out (a socket),
    are named in ``skipped`` with tar's words; a non-zero exit status is recorded there too, or, when the
    archive was rejected, next to the reason in ``lost``."""
    with tempfile.TemporaryFile() as errors:
        tar = subprocess.Popen(["tar", "cf", "-", "-C", str(source), "."], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=errors)
        assert tar.stdout is not None
        result = CollectResult()
        rejected: ArchiveRejected | None = None
        try:
            try:
                result = extract_tar_stream(tar.stdout, dest, max_file_size=max_file_size,
                                            max_total_size=max_total_size)
            except ArchiveRejected as exc:
                rejected = exc
            else:
                while tar.stdout.read(CHUNK):  # the padding after the end-of-archive marker: tar ends by itself
                    pass
        finally:
            tar.stdout.close()
            code = tar.wait()
        errors.seek(0)
        notes, last = tar_complaints(errors)
    if rejected is not None:
        failed = f"; tar exited with status {code}: {last}" if code > 0 and last else ""
        result = CollectResult(lost=f"artifacts lost: {rejected}{failed}")
    result.skipped.extend(notes)
    if code != 0 and rejected is None:
        result.skipped.append(f"tar: exit status {code}" + (f" ({last})" if last else ""))
    return result


def tar_complaints(stderr: Iterable[bytes], limit: int = MAX_TAR_NOTES) -> tuple[list[str], str | None]:
    """tar's stderr, read: a note ``<file>: <complaint>`` for each line about a file (GNU tar's
    ``tar: ./x: Cannot open: Permission denied`` is ``x: Cannot open: Permission denied``), at most
    ``limit`` of them and then a count; and tar's last line (without ``tar: ``), which says why it failed."""
    notes: list[str] = []
    more = 0
    last: str | None = None
    for raw in stderr:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip():
            continue
        text = _TAR_PROGRAM.sub("", line, count=1)
        last = text
        if text.startswith("./"):
            if len(notes) < limit:
                notes.append(text[2:])
            else:
                more += 1
    if more:
        notes.append(f"tar: {more} more complaints about files, not listed")
    return notes, last
