"""One ``prefab train`` per model name at a time, and model folders that stay in the home.

Two runs of one name would share ``models/NAME/run`` (its checkpoint, its embeddings of
the head, its files) and race for the next version number. A run holds an exclusive lock
on ``models/NAME/.train.lock`` from before it touches that folder until its version is
registered; a second run fails at once with a one-line error naming the holder. The lock
is the operating system's (``flock``): it goes away with the process that held it, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.errors import PrefabError

LOCK_FILE = ".train.lock"


class RunLocked(PrefabError):
    """Another process is training this model name."""


def model_folder(home: Path, name: str) -> Path:
    """``home/models/NAME``, after checking NAME and that the folder resolves inside the home
    (a symlinked ``models`` or ``models/NAME`` pointing elsewhere is refused too)."""
    from factory.catalog.refs import check_name  # the trainer itself needs no catalog (DuckDB)

    check_name(name, "model name")
    return inside_home(home, home / "models" / name)


def inside_home(home: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``home``; a one-line error otherwise."""
    root = home.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise PrefabError(f"model folder {path} resolves to {resolved}, outside the home {root}; "
                          "use a plain model name (letters, digits, '_', '.', '-')")
    return path


@contextmanager
def run_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold the training lock of model ``name`` (in ``folder``) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLocked(f"model {name!r} is being trained by another run (pid {holder}, lock {path}); "
                            "wait for it to finish or train under another --name")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            _unlock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


__all__ = ["LOCK_FILE", "RunLocked", "inside_home", "model_folder", "run_lock"]
