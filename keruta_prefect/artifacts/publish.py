"""Moving an extracted tree into place, all or nothing."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from keruta_prefect.artifacts.result import ArchiveRejected, PublishStranded, shown_name


def publish(staged: Path, dest: Path, aside: Path) -> None:
    """Move the staged tree into ``dest``, all or nothing.

    A path ``dest`` does not hold moves whole (a directory in one rename); a directory it holds is
    merged into; a file it holds (an earlier collection of the same attempt) is replaced, the old one
    moved ``aside`` until everything is in place. A file where a directory goes, or the other way round,
    rejects the archive. On any failure every move is undone, newest first.

    An empty ``dest`` (a first collection) is replaced by the staged tree in one rename."""
    if _empty(dest):
        try:
            os.rename(staged, dest)  # atomic: it fails, and changes nothing, if dest holds anything by now
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
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


def _empty(directory: Path) -> bool:
    with os.scandir(directory) as listing:
        return next(listing, None) is None


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
                raise ArchiveRejected(f"cannot keep {shown_name(name)}: a file of that name is in {target} already "
                                      "(from an earlier collection); nothing of this archive was kept")
            _merge(item.path, final, name + "/", aside, moves)
        elif stat.S_ISDIR(there.st_mode):
            raise ArchiveRejected(f"cannot keep {shown_name(name)}: a directory of that name is in {target} already "
                                  "(from an earlier collection); nothing of this archive was kept")
        else:
            kept = os.path.join(aside, str(len(moves)))
            os.rename(final, kept)
            moves.append((kept, final))
            os.rename(item.path, final)
            moves.append((final, item.path))
