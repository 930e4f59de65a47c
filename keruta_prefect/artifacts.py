"""Artifact caps, checksums and storage: one code path whatever the backend delivered the files from.

Every backend hands over a tar stream (exec in a Pod, `tar` of a local work directory); it is extracted
as it streams, in 1 MiB chunks, hashed on the way, capped per file and in total; whatever is left out
is reported by name and reason, never silently dropped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, Self

from keruta_prefect.models import ArtifactInfo

CHUNK = 1 << 20


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
            parts.append(_shortened(self.lost, MAX_LOST_CHARS))
        if self.skipped:
            shown = "; ".join(_shortened(note, MAX_NOTE_CHARS) for note in self.skipped[:MAX_NOTES])
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


def _shortened(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its start and end around an ellipsis."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _shown(raw: str) -> str:
    """An entry's name in a rejection reason: quoted, on one line, and shortened."""
    return _shortened(repr(raw), MAX_NOTE_CHARS)


def attempt_dir(root: Path, task_id: str, attempt: int) -> Path:
    """`<root>/<task id, path-safe>/attempt-<n>`: where an attempt's files live (work or storage)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)
    return root / safe / f"attempt-{attempt}"


class ArchiveRejected(ValueError):
    """A hostile or broken archive: nothing of it is kept."""


class PublishStranded(OSError):
    """Publishing failed and undoing it failed too: the staging directory named in the message is left
    in place, because it holds files of the destination that were moved aside."""


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
        raise ArchiveRejected(f"unsafe entry {_shown(raw)}: an absolute path")
    if "\0" in raw:
        raise ArchiveRejected(f"unsafe entry {_shown(raw)}: a NUL in the name")
    parts = PurePosixPath(raw).parts
    if ".." in parts or ("\\" in raw and ".." in re.split(r"[/\\]", raw)):
        raise ArchiveRejected(f"unsafe entry {_shown(raw)}: a '..' component")
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


def _as_directories(path: str, dirs: set[str], entries: dict[str, ArtifactInfo | str], raw: str) -> None:
    """Record ``path`` and its parents as directories; one that is already a file rejects the archive."""
    while path not in dirs:
        if path in entries:
            raise ArchiveRejected(f"conflicting entries: {_shown(path)} is both a file and a directory "
                                  f"(at {_shown(raw)})")
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

    Files land in a staging directory inside ``dest`` and are moved into place only when the whole
    archive was read; they replace files of an earlier collection of the same name. Publishing is all or
    nothing: if it fails midway (a directory of an earlier collection where a file goes, or an OSError)
    what was moved is moved back, so ``dest`` is as it was, and no staging directory is left behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".incoming-{uuid.uuid4().hex[:12]}"
    staged = staging / "files"
    staged.mkdir(parents=True)
    try:
        entries = _extract(stream, str(staged), str(dest), max_file_size, max_total_size, max_members)
        _publish(staged, dest, staging / "replaced")
    except PublishStranded:
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    result = CollectResult()
    for entry in entries.values():
        if isinstance(entry, ArtifactInfo):
            result.files.append(entry)
        else:
            result.skipped.append(entry)
    return result


def _extract(stream: IO[bytes], staged: str, dest: str, max_file_size: int, max_total_size: int,
             max_members: int) -> dict[str, ArtifactInfo | str]:
    """Read the archive into ``staged``: by path, the last entry's outcome, kept (ArtifactInfo) or a note."""
    entries: dict[str, ArtifactInfo | str] = {}
    dirs: set[str] = {""}  # paths that are directories: named as one, or holding another entry
    made: set[str] = {""}  # directories made in the staging directory
    total = 0
    path_max, name_max = os.pathconf(staged, "PC_PATH_MAX"), os.pathconf(staged, "PC_NAME_MAX")
    try:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Member)  # noqa: SIM115 - closed below
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
                    safe = tarfile.data_filter(member, staged)
                except tarfile.FilterError as exc:
                    why = _shortened(str(exc), MAX_NOTE_CHARS)
                    raise ArchiveRejected(f"unsafe entry {_shown(member.name)}: {why}") from None
                if safe.isdir():
                    if name in entries:
                        raise ArchiveRejected(f"conflicting entries: {_shown(name)} is both a file and a directory")
                    _as_directories(name, dirs, entries, member.name)
                    continue
                if not name:
                    raise ArchiveRejected(f"unsafe entry {_shown(member.name)}: a file without a name")
                if name in dirs:
                    raise ArchiveRejected(f"conflicting entries: {_shown(name)} is both a file and a directory")
                parent = name.rpartition("/")[0]
                _as_directories(parent, dirs, entries, member.name)
                earlier = entries.pop(name, None)  # the last entry of a name wins, as with `tar x`
                if isinstance(earlier, ArtifactInfo):
                    total -= earlier.size
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
                    out = open(target, "wb")  # noqa: SIM115 - closed by the `with` below
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    entries[name] = f"{name}: the name is too long for the file system"
                    continue
                source = archive.extractfile(member)
                assert source is not None
                digest = hashlib.sha256()
                written = 0
                with out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        digest.update(chunk)
                        out.write(chunk)
                total += written
                entries[name] = ArtifactInfo(path=name, size=written, sha256=digest.hexdigest(),
                                             location=os.path.join(dest, name))
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveRejected(f"the archive is broken or cut short ({exc})") from None
    return entries


def _publish(staged: Path, dest: Path, aside: Path) -> None:
    """Move the staged tree into ``dest``, all or nothing.

    A path ``dest`` does not hold moves whole (a directory in one rename); a directory it holds is
    merged into; a file it holds (an earlier collection of the same attempt) is replaced, the old one
    moved ``aside`` until everything is in place. A file where a directory goes, or the other way round,
    rejects the archive. On any failure every move is undone, newest first."""
    aside.mkdir()
    moves: list[tuple[str, str]] = []  # (where it is now, where it came from)
    try:
        _merge(str(staged), str(dest), "", str(aside), moves)
    except BaseException as exc:
        try:
            for now, came_from in reversed(moves):
                os.rename(now, came_from)
        except OSError as undo:
            raise PublishStranded(f"publishing into {dest} failed ({exc}) and undoing it failed ({undo}): "
                                  f"files moved aside are in {aside.parent}") from exc
        raise


def _merge(source: str, target: str, prefix: str, aside: str, moves: list[tuple[str, str]]) -> None:
    with os.scandir(source) as listing:
        items = list(listing)
    for item in items:
        final = os.path.join(target, item.name)
        name = prefix + item.name
        try:
            there = os.lstat(final)
        except FileNotFoundError:
            os.rename(item.path, final)
            moves.append((final, item.path))
            continue
        if item.is_dir(follow_symlinks=False):
            if not stat.S_ISDIR(there.st_mode):
                raise ArchiveRejected(f"cannot keep {_shown(name)}: a file of that name is in {target} already "
                                      "(from an earlier collection); nothing of this archive was kept")
            _merge(item.path, final, name + "/", aside, moves)
        elif stat.S_ISDIR(there.st_mode):
            raise ArchiveRejected(f"cannot keep {_shown(name)}: a directory of that name is in {target} already (from "
                                  "an earlier collection); nothing of this archive was kept")
        else:
            kept = os.path.join(aside, str(len(moves)))
            os.rename(final, kept)
            moves.append((kept, final))
            os.rename(item.path, final)
            moves.append((final, item.path))


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
