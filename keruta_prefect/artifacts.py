"""Artifact caps, checksums and storage: one code path whatever the backend delivered the files from.

Files are copied in 1 MiB chunks (never a whole file in memory), hashed on the way, and capped per
file and in total; whatever is left out is reported by name and reason, never silently dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from keruta_prefect.models import ArtifactInfo

CHUNK = 1 << 20


@dataclass
class CollectResult:
    files: list[ArtifactInfo] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    lost: str | None = None  # "artifacts lost: <reason>" when nothing could be collected

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


def storage_dir(root: Path, task_id: str, attempt: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)
    return root / safe / f"attempt-{attempt}"


def _walk(source: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def collect_directory(source: Path, dest: Path, *, max_file_size: int, max_total_size: int) -> CollectResult:
    """Copy the regular files under ``source`` into ``dest`` with caps and sha256 checksums.

    Symbolic links, devices and other special files are not followed or copied (reported instead).
    """
    result = CollectResult()
    if not source.is_dir():
        return result
    total = 0
    for path in _walk(source):
        relative = path.relative_to(source).as_posix()
        if path.is_symlink() or not path.is_file():
            result.skipped.append(f"{relative}: not a regular file")
            continue
        size = path.stat().st_size
        if size > max_file_size:
            result.skipped.append(f"{relative}: {size} bytes is over the {max_file_size}-byte file cap")
            continue
        if total + size > max_total_size:
            result.skipped.append(f"{relative}: would pass the {max_total_size}-byte total cap")
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        copied = 0
        with path.open("rb") as src, target.open("wb") as out:
            while chunk := src.read(CHUNK):
                copied += len(chunk)
                digest.update(chunk)
                out.write(chunk)
        total += copied
        result.files.append(ArtifactInfo(path=relative, size=copied, sha256=digest.hexdigest(), location=str(target)))
    return result
