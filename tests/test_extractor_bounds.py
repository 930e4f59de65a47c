"""Resource bounds of the safe tar extractor: what a hostile archive can make us hold in memory or store.

The archives are built here, as streams: a header that says its long name or pax record is 50 MB long is
followed by 50 MB generated on the fly, so the only copy a test could see is the one the extractor makes."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from keruta_prefect.artifacts import ArchiveRejected, CollectResult, extract_tar_stream

MiB = 1 << 20
HUGE = 50 * MiB  # the body of a hostile header
GROWTH_BOUND = 30 * MiB  # what reading such an archive may cost in memory, at most
NOTE_BOUND = 8 << 10


class _Generated(io.RawIOBase):
    """A read-only stream over byte chunks produced one at a time (never the whole archive in memory)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._left = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _hostile(kind: bytes, size: int, prefix: bytes = b"", suffix: bytes = b"") -> Iterator[bytes]:
    """A file, then a ``kind`` header whose body is ``size`` bytes (``prefix``, "a" repeated, ``suffix``),
    then a file it applies to, then the end-of-archive marker."""
    yield _header("before.txt", tarfile.REGTYPE, 2) + b"ok" + _padding(2)
    long = kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
    yield _header("././@LongLink" if long else "pax", kind, size) + prefix
    chunk = b"a" * MiB
    left = size - len(prefix) - len(suffix)
    while left > 0:
        part = chunk if left >= len(chunk) else chunk[:left]
        left -= len(part)
        yield part
    yield suffix + _padding(size)
    yield _header("after.txt", tarfile.REGTYPE, 0)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _pax_record(keyword: str, value_size: int) -> tuple[bytes, int]:
    """The start of one pax record ``<len> keyword=<value>\\n`` and the record's whole size."""
    fixed = len(f" {keyword}=\n") + value_size
    total = fixed + len(str(fixed))
    total = fixed + len(str(total))
    return f"{total} {keyword}=".encode(), total


def _measured(stream: io.RawIOBase, dest: Path) -> tuple[BaseException | CollectResult, int]:
    """Extract ``stream`` into ``dest``; the outcome and the peak of memory allocated meanwhile."""
    reader = io.BufferedReader(stream, MiB)  # as the exec collector reads
    tracemalloc.start()
    try:
        try:
            outcome: BaseException | CollectResult = extract_tar_stream(reader, dest, max_file_size=MiB,
                                                                        max_total_size=10 * MiB)
        except Exception as exc:
            outcome = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return outcome, peak


@pytest.mark.parametrize(("kind", "words"), [
    (tarfile.GNUTYPE_LONGNAME, "GNU long-name header of"),
    (tarfile.GNUTYPE_LONGLINK, "GNU long-link header of"),
])
def test_a_huge_gnu_long_name_header_rejects_the_archive_before_it_is_read(tmp_path: Path, kind: bytes,
                                                                           words: str) -> None:
    outcome, peak = _measured(_Generated(_hostile(kind, HUGE)), tmp_path / "out")
    assert isinstance(outcome, ArchiveRejected), outcome
    reason = str(outcome)
    assert words in reason and str(HUGE) in reason
    assert "\n" not in reason and len(reason) < 300
    assert peak < GROWTH_BOUND, f"{peak} bytes allocated"
    assert list((tmp_path / "out").iterdir()) == []  # nothing kept, no .incoming-* left


def test_a_huge_pax_header_rejects_the_archive_before_it_is_read(tmp_path: Path) -> None:
    start, total = _pax_record("path", HUGE)
    stream = _Generated(_hostile(tarfile.XHDTYPE, total, prefix=start, suffix=b"\n"))
    outcome, peak = _measured(stream, tmp_path / "out")
    assert isinstance(outcome, ArchiveRejected), outcome
    reason = str(outcome)
    assert "pax extended header of" in reason and str(total) in reason
    assert "\n" not in reason and len(reason) < 300
    assert peak < GROWTH_BOUND, f"{peak} bytes allocated"
    assert list((tmp_path / "out").iterdir()) == []


def test_many_pax_global_headers_cannot_pile_up(tmp_path: Path) -> None:
    """Each global header is small; together (tarfile keeps them for every later entry) they are not."""
    def chunks() -> Iterator[bytes]:
        for i in range(2000):
            record = f"k{i}=" + "v" * 40_000 + "\n"
            size = len(record) + 6
            text = f"{size} {record}".encode()
            assert len(text) == size
            yield _header("g", tarfile.XGLTYPE, size) + text + _padding(size)
        yield _header("after.txt", tarfile.REGTYPE, 0) + b"\0" * (2 * tarfile.BLOCKSIZE)

    outcome, peak = _measured(_Generated(chunks()), tmp_path / "out")
    assert isinstance(outcome, ArchiveRejected), outcome
    assert "pax global headers" in str(outcome)
    assert peak < GROWTH_BOUND, f"{peak} bytes allocated"


def test_a_chain_of_long_name_headers_is_bounded(tmp_path: Path) -> None:
    """Each long-name header is small, but tarfile reads the next header inside the one before."""
    def chunks() -> Iterator[bytes]:
        name = b"n" * 60_000
        for _ in range(1000):
            yield _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name)) + name + _padding(len(name))
        yield _header("after.txt", tarfile.REGTYPE, 0) + b"\0" * (2 * tarfile.BLOCKSIZE)

    outcome, peak = _measured(_Generated(chunks()), tmp_path / "out")
    assert isinstance(outcome, ArchiveRejected), outcome
    assert "\n" not in str(outcome)
    assert peak < GROWTH_BOUND, f"{peak} bytes allocated"


def test_a_huge_gnu_sparse_map_is_bounded(tmp_path: Path) -> None:
    """An old GNU sparse entry whose map goes on in extension blocks, one after another (20 MB of them)."""
    def chunks() -> Iterator[bytes]:
        info = tarfile.TarInfo("sparse")
        info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
        header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
        header[482] = 1  # "isextended": an extension block follows
        header[148:156] = b"        "
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        yield bytes(header)
        entry = b"00000000001\0" + b"00000000001\0"
        block = entry * 21 + b"\1" + b"\0" * 7  # 21 regions, "isextended" again
        many = block * 2048
        for _ in range(20):
            yield many
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    outcome, peak = _measured(_Generated(chunks()), tmp_path / "out")
    assert isinstance(outcome, ArchiveRejected), outcome
    assert "\n" not in str(outcome)
    assert peak < GROWTH_BOUND, f"{peak} bytes allocated"


def test_the_note_of_many_skipped_entries_is_bounded_and_counts_the_rest(tmp_path: Path) -> None:
    count = 20_000

    def chunks() -> Iterator[bytes]:
        yield _header("kept.txt", tarfile.REGTYPE, 2) + b"ok" + _padding(2)
        for i in range(count):
            info = tarfile.TarInfo(f"{i:05d}-" + "l" * 194)  # 200 characters: a GNU long-name header each
            info.type, info.linkname = tarfile.SYMTYPE, "kept.txt"
            yield info.tobuf(format=tarfile.GNU_FORMAT)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    result = extract_tar_stream(io.BufferedReader(_Generated(chunks()), MiB), tmp_path / "out",
                                max_file_size=MiB, max_total_size=MiB)
    assert [f.path for f in result.files] == ["kept.txt"]
    assert len(result.skipped) == count
    note = result.note()
    assert note is not None
    assert len(note.encode()) <= NOTE_BOUND
    assert "\n" not in note
    assert note.startswith("not kept: 00000-")  # the first ones are named, as before
    assert "not a regular file" in note
    assert note.endswith(f"… and {count - 20} more")


def test_the_note_bounds_long_names_and_a_long_reason(tmp_path: Path) -> None:
    result = CollectResult(lost="artifacts lost: " + "r" * 100_000,
                           skipped=["n" * 5000 + ": the name is too long for the file system"] * 50)
    note = result.note()
    assert note is not None and len(note.encode()) <= NOTE_BOUND
    assert note.count(": the name is too long for the file system") == 20  # each keeps its reason
    assert note.endswith("… and 30 more")


def test_a_few_notes_read_as_before() -> None:
    assert CollectResult(skipped=["a: not a regular file", "b: x"]).note() == "not kept: a: not a regular file; b: x"
    assert CollectResult(lost="artifacts lost: why").note() == "artifacts lost: why"
