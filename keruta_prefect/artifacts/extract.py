"""The safe streaming tar extractor: bounded headers, caps per file and in total, checksums, all or nothing."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, Self

from pydantic import TypeAdapter

from keruta_prefect.artifacts.publish import publish
from keruta_prefect.artifacts.result import (
    MAX_NOTE_CHARS,
    ArchiveRejected,
    CollectResult,
    PublishStranded,
    shortened,
    shown_name,
)
from keruta_prefect.models import ArtifactInfo

CHUNK = 1 << 20  # bytes read from the stream, and written, at a time
MAX_MEMBERS = 200_000  # a file-count bomb stops here
MAX_HEADER_BYTES = 64 << 10  # one GNU long-name/long-link or pax header; global pax headers all together
MAX_MEMBER_HEADER_BYTES = 256 << 10  # all the headers of one entry (long names, pax records, a sparse map)
MAX_NAMES_BYTES = 32 << 20  # the entries' names all together: what the extractor holds while it reads


def entry_name(raw: str) -> str:
    """The path an archive entry is kept under: its name in ``PurePosixPath``'s normal form and otherwise
    exactly as archived (``./.env`` is ``.env``, ``./..data`` is ``..data``, ``a//b/`` is ``a/b``); ``""``
    is the archive's root (``.``, ``./``).

    A name that could lead anywhere but inside rejects the archive (ArchiveRejected): absolute (a leading
    ``/`` or ``\\``), with a ``..`` component (``/`` or ``\\`` separating: a Windows reader would take
    ``a\\..\\b`` for a path), or holding a NUL. Other backslashes are kept: on POSIX they are part of a name.
    """
    if raw.startswith(("/", "\\")):  # stricter than tarfile's `data` filter, which strips the slash
        raise ArchiveRejected(f"unsafe entry {shown_name(raw)}: an absolute path")
    if "\0" in raw:
        raise ArchiveRejected(f"unsafe entry {shown_name(raw)}: a NUL in the name")
    trimmed = raw[2:] if raw.startswith("./") else raw  # tar's "./x": PurePosixPath drops a "." component
    if trimmed and "\\" not in trimmed and not {"", ".", ".."} & set(trimmed.split("/")):
        return trimmed  # the rest is in normal form already: PurePosixPath would give it back as it is
    parts = PurePosixPath(raw).parts
    if ".." in parts or ("\\" in raw and ".." in re.split(r"[/\\]", raw)):
        raise ArchiveRejected(f"unsafe entry {shown_name(raw)}: a '..' component")
    return "/".join(parts)


def _utf8(name: str) -> bool:
    """Was ``name`` valid UTF-8 in the archive? tarfile keeps other bytes as lone surrogates, which no
    database or JSON document takes."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_HEADER_KINDS = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK: "GNU long-link",
                 tarfile.XHDTYPE: "pax extended", tarfile.XGLTYPE: "pax global",
                 tarfile.SOLARIS_XHDTYPE: "Solaris extended"}


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def tell(self) -> int: ...
    def seek(self, pos: int, /) -> object: ...


class _Forward:
    """The archive's stream for tarfile's plain read mode (``r:``): ``read``, ``tell``, and ``seek`` forward
    only (by reading on). tarfile reads headers here, 512 bytes at a time; ``pieces`` hands a member's data
    over in the pieces the source delivers (a pipe read, a WebSocket frame), without the copies of tarfile's
    stream mode (``r|``), which reads through 10 KiB records and joins and slices them again for every read.

    ``read1`` of the source (one read, what is there) when it has it, else ``read``."""

    def __init__(self, source: IO[bytes]) -> None:
        self.next_piece = getattr(source, "read1", source.read)
        self.head = memoryview(b"")
        self.position = 0

    def _take(self, size: int) -> memoryview:
        """At most ``size`` bytes, from what the source delivered last (empty at its end)."""
        if not self.head:
            self.head = memoryview(self.next_piece(CHUNK))
        piece, self.head = self.head[:size], self.head[size:]
        self.position += len(piece)
        return piece

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            raise io.UnsupportedOperation("reading a tar stream to its end")
        first = self._take(size)
        if len(first) == size or not first:
            return bytes(first)
        parts = [first]
        size -= len(first)
        while size and (piece := self._take(size)):
            parts.append(piece)
            size -= len(piece)
        return b"".join(parts)

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes, piece by piece; tarfile.ReadError if the stream ends first."""
        while size:
            piece = self._take(min(size, CHUNK))
            if not piece:
                raise tarfile.ReadError("unexpected end of data")
            size -= len(piece)
            yield piece

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET, /) -> int:
        if whence != io.SEEK_SET or position < self.position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        for _ in self.pieces(position - self.position):
            pass
        return self.position

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("a tar stream being read")

    def close(self) -> None:
        """The stream is its owner's to close, as tarfile leaves a file object it was given."""


class _HeaderBudget:
    """The archive's stream while tarfile reads the headers of one entry: reading more than ``budget``
    bytes rejects the archive before it is read. tarfile reads a chain of long-name, pax and sparse-map
    headers (one inside the other) whole into memory, however long the archive says they are."""

    def __init__(self, fileobj: _Readable, budget: int, offset: int) -> None:
        self.fileobj, self.left, self.offset = fileobj, budget, offset

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise ArchiveRejected(f"the headers of the entry at byte {self.offset} take more than "
                                  f"{MAX_MEMBER_HEADER_BYTES} bytes (long names, pax records or a sparse map)")
        self.left -= size
        return self.fileobj.read(size)

    def tell(self) -> int:
        return self.fileobj.tell()

    def seek(self, pos: int) -> None:
        self.fileobj.seek(pos)


class _Member(tarfile.TarInfo):
    """tarfile's TarInfo, except that an archive must end with its end-of-archive marker, and what its
    headers make tarfile read is bounded.

    In stream mode tarfile takes a header that is missing, short or garbled (after the first) for the
    end of the archive, so a stream cut right between two entries would pass as whole and half of it
    would be kept. A GNU long-name or long-link header, or a pax header, larger than ``MAX_HEADER_BYTES``
    rejects the archive before tarfile reads it (it would read it whole, into memory); all the headers of
    one entry, sparse maps included, are read within ``MAX_MEMBER_HEADER_BYTES``."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        fileobj = tarfile_.fileobj
        if isinstance(fileobj, _HeaderBudget):  # a header after a long-name or pax header: within its budget
            return super().fromtarfile(tarfile_)
        # tarfile reads one entry's headers with read, tell and seek only: nothing writes or closes its stream here.
        tarfile_.fileobj = _HeaderBudget(fileobj, MAX_MEMBER_HEADER_BYTES, tarfile_.offset)  # type: ignore[assignment]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # tarfile's own, not in typeshed's stub
            raise  # the end-of-archive marker: the archive is whole
        except tarfile.HeaderError as exc:
            if tarfile_.offset == 0:
                raise  # the very first header: tarfile says "not a tar archive"
            raise ArchiveRejected(f"the archive is broken or cut short (no end-of-archive marker: {exc})") from None
        finally:
            tarfile_.fileobj = fileobj

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise ArchiveRejected(f"the entry at byte {self.offset} has a negative size ({self.size})")
        kind = _HEADER_KINDS.get(self.type)
        if kind is not None:
            if self.size > MAX_HEADER_BYTES:
                raise ArchiveRejected(f"a {kind} header of {self.size} bytes at byte {self.offset} "
                                      f"(the cap is {MAX_HEADER_BYTES})")
            if self.type == tarfile.XGLTYPE:  # global headers add up, for every entry after them
                held = sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items())
                if held + self.size > MAX_HEADER_BYTES:
                    raise ArchiveRejected(f"pax global headers of more than {MAX_HEADER_BYTES} bytes in all "
                                          f"(at byte {self.offset})")
        # tarfile's private hook (not in typeshed's stub): it reads the headers that follow this one.
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


def _too_long(target: str, name: str, path_max: int, name_max: int) -> bool:
    """Is a path, or one of its names, longer in bytes than the file system takes (PATH_MAX, NAME_MAX)?
    Checked before anything is made, so no half-made directory is left for a name that cannot be."""
    if len(target) * 4 < path_max and len(name) * 4 <= name_max:  # UTF-8 takes at most 4 bytes a character
        return False
    return len(os.fsencode(target)) >= path_max or any(len(part.encode()) > name_max for part in name.split("/"))


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # a new file, never through a link
_Entries = dict[str, tuple[int, str] | str]  # by path: (size, sha256) of a file kept, or why it was not


def _data(archive: tarfile.TarFile, source: _Forward, member: tarfile.TarInfo) -> Iterator[bytes | memoryview]:
    """A regular member's bytes: straight from the stream, or through tarfile for a sparse one (its holes)."""
    if member.sparse is None:
        source.seek(member.offset_data)  # where tarfile left it, after the member's headers
        return source.pieces(member.size)
    reader = archive.extractfile(member)
    assert reader is not None
    return iter(lambda: reader.read(CHUNK), b"")


def _as_directories(path: str, dirs: set[str], entries: _Entries, raw: str) -> None:
    """Record ``path`` and its parents as directories; one that is already a file rejects the archive."""
    while path not in dirs:
        if path in entries:
            raise ArchiveRejected(f"conflicting entries: {shown_name(path)} is both a file and a directory "
                                  f"(at {shown_name(raw)})")
        dirs.add(path)
        path = path.rpartition("/")[0]


def extract_tar_stream(stream: IO[bytes], dest: Path, *, max_file_size: int, max_total_size: int,
                       max_members: int = MAX_MEMBERS) -> CollectResult:
    """Extract a tar archive read as a stream (never whole in memory) into ``dest``, safely.

    Every member passes tarfile's ``data`` filter and stricter checks: an absolute path, a ``..``
    component, a NUL in a name, a link pointing outside, a device or FIFO, a name that is both a file and
    a directory, or an archive cut short rejects the whole archive (ArchiveRejected) and nothing of it is
    kept. Names are kept exactly (see ``entry_name``); an entry that comes again wins over the earlier
    one, as with ``tar x``. Regular files are hashed while they are written, capped per file and in total
    (what is left out is recorded by name and reason, as are names that are not UTF-8 or are too long for
    the file system); links and other special entries are recorded, not extracted.

    Files land in a staging directory beside ``dest`` and are moved into place only when the whole
    archive was read: in one rename when ``dest`` is empty, else one by one, replacing files of an earlier
    collection of the same name. Publishing is all or nothing: if it fails midway (a directory of an earlier
    collection where a file goes, or an OSError) what was moved is moved back, so ``dest`` is as it was,
    and no staging directory is left behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    home = dest.resolve()  # a symlinked dest: where it points (a rename does not follow the link)
    # Staging on dest's file system, beside it (then an empty dest takes the tree in one rename), or inside it
    # when dest is a mount point (its parent is another file system, which a rename cannot cross).
    beside = home.parent if os.stat(home.parent).st_dev == os.stat(home).st_dev else home
    staging = beside / f".{home.name}.incoming-{uuid.uuid4().hex[:12]}"
    staged = staging / "files"
    staged.mkdir(parents=True)
    try:
        entries = _extract(stream, str(staged), str(home), max_file_size, max_total_size, max_members)
        publish(staged, home, staging / "replaced")
    except PublishStranded:
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    result = CollectResult()
    rows = []
    for name, entry in entries.items():
        if isinstance(entry, tuple):
            rows.append({"path": name, "size": entry[0], "sha256": entry[1], "location": os.path.join(dest, name)})
        else:
            result.skipped.append(entry)
    result.files = _ROWS.validate_python(rows)  # one validation for them all, not a model built per file
    return result


_ROWS = TypeAdapter(list[ArtifactInfo])


def _extract(stream: IO[bytes], staged: str, dest: str, max_file_size: int, max_total_size: int,
             max_members: int) -> _Entries:
    """Read the archive into ``staged``: by path, the last entry's outcome, kept ((size, sha256)) or a note."""
    entries: _Entries = {}
    dirs: set[str] = {""}  # paths that are directories: named as one, or holding another entry
    made: set[str] = {""}  # directories made in the staging directory
    total = 0
    path_max, name_max = os.pathconf(staged, "PC_PATH_MAX"), os.pathconf(staged, "PC_NAME_MAX")
    try:
        source = _Forward(stream)
        try:  # read forward only, like "r|"; see _Forward
            archive = tarfile.TarFile(fileobj=source, mode="r", tarinfo=_Member)  # what open(mode="r:") makes
        except tarfile.TarError as exc:
            raise ArchiveRejected(f"not a tar archive ({exc})") from None
        with archive:
            count = names = 0
            while (member := archive.next()) is not None:
                # tarfile keeps every entry read in its (undocumented) `members`; nothing here looks back
                archive.members.clear()  # type: ignore[attr-defined]
                count += 1
                if count > max_members:
                    raise ArchiveRejected(f"more than {max_members} entries")
                names += len(member.name)
                if names > MAX_NAMES_BYTES:
                    raise ArchiveRejected(f"the entries' names take more than {MAX_NAMES_BYTES} bytes in all "
                                          f"(at entry {count})")
                name = entry_name(member.name)
                try:
                    # For a directory or a regular file, the filter's check that the name stays inside (the
                    # realpath of where it lands) is made on a neutral name ("." under "/"), not on the entry's
                    # name under the staging directory, whose realpath it would look up again for every entry
                    # (a dozen lstat calls a file) — nor under "/", where it would look up host paths the
                    # archive names (an automount, a hung network mount). The same outcome: entry_name has
                    # rejected absolute names and '..' components, and nothing under the staging directory can
                    # be a symlink (only directories made here and regular files opened with O_EXCL |
                    # O_NOFOLLOW are), so a normal name joined to it resolves to itself. Everything else of the
                    # filter (modes, owners, devices, FIFOs) is the same; a link, whose target the filter
                    # resolves, is checked with its own name against the staging directory itself.
                    plain = member.isreg() or member.isdir()
                    safe = tarfile.data_filter(member.replace(name=".", deep=False) if plain else member,
                                               "/" if plain else staged)
                except tarfile.FilterError as exc:
                    why = shortened(str(exc), MAX_NOTE_CHARS)
                    raise ArchiveRejected(f"unsafe entry {shown_name(member.name)}: {why}") from None
                if safe.isdir():
                    if name in entries:
                        raise ArchiveRejected(f"conflicting entries: {shown_name(name)} is both a file and a directory")
                    _as_directories(name, dirs, entries, member.name)
                    continue
                if not name:
                    raise ArchiveRejected(f"unsafe entry {shown_name(member.name)}: a file without a name")
                if name in dirs:
                    raise ArchiveRejected(f"conflicting entries: {shown_name(name)} is both a file and a directory")
                parent = name.rpartition("/")[0]
                _as_directories(parent, dirs, entries, member.name)
                earlier = entries.pop(name, None)  # the last entry of a name wins, as with `tar x`
                if isinstance(earlier, tuple):
                    total -= earlier[0]
                    os.unlink(os.path.join(staged, name))
                if not _utf8(name):
                    printable = name.encode("utf-8", "backslashreplace").decode("utf-8")
                    entries[name] = f"{printable}: the name is not valid UTF-8"
                    continue
                if not safe.isreg():
                    entries[name] = f"{name}: not a regular file"
                    continue
                if safe.size > max_file_size:
                    entries[name] = f"{name}: {safe.size} bytes is over the {max_file_size}-byte file cap"
                    continue
                if total + safe.size > max_total_size:
                    entries[name] = f"{name}: would pass the {max_total_size}-byte total cap"
                    continue
                target = os.path.join(staged, name)
                if _too_long(target, name, path_max, name_max):
                    entries[name] = f"{name}: the name is too long for the file system"
                    continue
                try:
                    if parent not in made:
                        os.makedirs(os.path.join(staged, parent), exist_ok=True)
                        made.add(parent)
                    out = os.open(target, _CREATE, 0o666)
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    entries[name] = f"{name}: the name is too long for the file system"
                    continue
                digest = hashlib.sha256()
                try:
                    for piece in _data(archive, source, member):
                        digest.update(piece)
                        while piece:
                            piece = piece[os.write(out, piece):]
                finally:
                    os.close(out)
                total += safe.size
                entries[name] = (safe.size, digest.hexdigest())
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveRejected(f"the archive is broken or cut short ({exc})") from None
    return entries
