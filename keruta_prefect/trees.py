"""Task trees: a task's parent chain, whether a whole tree has ended, and the volume the tree shares.

Tasks of a tree (a parent and the children that run after it) share one work volume on Kubernetes; it
goes when the tree's last unfinished task ends (keruta.kubernetes.pvc-retention=delete).
"""

from __future__ import annotations

from keruta_prefect.backends.base import Backend
from keruta_prefect.manifest import needs_volume
from keruta_prefect.models import Task
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store

MAX_DEPTH = 100  # a parent chain longer than this (or a cycle) stops the walk up


def root_of(store: Store, task: Task) -> str:
    """The id of the root of the task's tree (its own id when it has no parent)."""
    current, seen = task, {task.id}
    while current.parent_id and current.parent_id not in seen and len(seen) < MAX_DEPTH:
        seen.add(current.parent_id)
        try:
            current = store.get_task(current.parent_id)
        except LookupError:
            return current.parent_id or current.id
    return current.id


def tree_tasks(store: Store, root: str) -> list[Task]:
    """The stored tasks of the tree rooted at ``root`` (the root first, if stored)."""
    pending, seen, found = [root], set[str](), list[Task]()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            found.append(store.get_task(current))
        except LookupError:
            pass
        pending.extend(child.id for child in store.children(current))
    return found


def tree_done(store: Store, root: str) -> bool:
    """Is every task of the tree rooted at ``root`` in a final status?"""
    return all(task.status.terminal for task in tree_tasks(store, root))


def release_volume(store: Store, runner: Backend, settings: KerutaSettings, task: Task, root: str) -> str | None:
    """A task tree's volume is deleted when its last unfinished task ends (keruta.kubernetes.pvc-retention=
    delete); tasks of the tree submitted later start with a fresh volume. The volume's name when it was
    deleted now, else None."""
    if (settings.pvc_retention != "delete" or task.pvc_name
            or not needs_volume(task, has_children=bool(store.children(task.id)))):
        return None
    if not tree_done(store, root):
        return None
    return runner.release_volume(task, root)
