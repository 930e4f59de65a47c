"""Artifact caps, checksums and storage: one code path whatever the backend delivered the files from.

Every backend hands over a tar stream (exec in a Pod, `tar` of a local work directory); it is extracted
as it streams, in 1 MiB chunks, hashed on the way, capped per file and in total; whatever is left out
is reported by name and reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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
        parts = []
        if self.lost:
            parts.append(self.lost)
        if self.skipped:
            parts.append("not kept: " + "; ".join(self.skipped))
        return " | ".join(parts) or None


def attempt_dir(root: Path, task_id: str, attempt: int) -> Path:
    """`<root>/<task id, path-safe>/attempt-<n>`: where an attempt's files live (work or storage)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)
    return root / safe / f"attempt-{attempt}"


class ArchiveRejected(ValueError):
    """A hostile or broken archive: nothing of it is kept."""


MAX_MEMBERS = 200_000  # a file-count bomb stops here


def extract_tar_stream(stream: IO[bytes], dest: Path, *, max_file_size: int, max_total_size: int,
                       max_members: int = MAX_MEMBERS) -> CollectResult:
    """Extract a tar archive read as a stream (never whole in memory) into ``dest``, safely.

    Every member passes tarfile's ``data`` filter: an absolute path, a ``..``, a link pointing outside
    or a device file rejects the whole archive (ArchiveRejected) and nothing of it is kept. Regular
    files are hashed while they are written, capped per file and in total (what is left out is
    recorded by name and reason); links and other special entries are recorded, not extracted.
    Files land in a staging directory inside ``dest`` and are moved into place only when the whole
    archive was read, so a rejected or broken archive leaves ``dest`` as it was.
    """
    result = CollectResult()
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".incoming-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    total = 0
    try:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed by the `with` below
        except tarfile.TarError as exc:
            raise ArchiveRejected(f"not a tar archive ({exc})") from None
        with archive:
            for count, member in enumerate(archive, start=1):
                if count > max_members:
                    raise ArchiveRejected(f"more than {max_members} entries")
                if member.name.startswith(("/", "\\")):  # stricter than `data`, which strips the slash
                    raise ArchiveRejected(f"unsafe entry {member.name!r}: an absolute path")
                try:
                    safe = tarfile.data_filter(member, str(staging))
                except tarfile.FilterError as exc:
                    raise ArchiveRejected(f"unsafe entry {member.name!r}: {exc}") from None
                name = safe.name.lstrip("./") or safe.name
                if safe.isdir():
                    continue
                if not safe.isreg():
                    result.skipped.append(f"{name}: not a regular file")
                    continue
                if safe.size > max_file_size:
                    result.skipped.append(f"{name}: {safe.size} bytes is over the {max_file_size}-byte file cap")
                    continue
                if total + safe.size > max_total_size:
                    result.skipped.append(f"{name}: would pass the {max_total_size}-byte total cap")
                    continue
                source = archive.extractfile(member)
                assert source is not None
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                written = 0
                with target.open("wb") as out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        digest.update(chunk)
                        out.write(chunk)
                total += written
                result.files.append(ArtifactInfo(path=name, size=written, sha256=digest.hexdigest(),
                                                 location=str(dest / name)))
    except (tarfile.TarError, EOFError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArchiveRejected(f"the archive is broken or cut short ({exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for item in result.files:  # publish: everything was read and accepted
        final = dest / item.path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / item.path, final)
    shutil.rmtree(staging, ignore_errors=True)
    return result

