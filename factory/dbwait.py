"""Open a DuckDB file that another process may hold, waiting a bounded time for it.

DuckDB lets one process hold a database file at a time (a second gets an IOException
about the lock), so every prefab database is opened briefly and retried with jittered
backoff until ``timeout``; then ``on_timeout()`` supplies the error the user sees.

Inside one process DuckDB shares one database instance per file and refuses a second
connection with another configuration (a read-only one beside a read-write one raises
``ConnectionException``). :func:`shared_connection` therefore hands every user of a file
in this process a cursor of one shared connection: a reader joins whatever is open, a
writer waits (boundedly, like a lock) for read-only users to finish and then opens the
file read-write. Writers of one file in one process take turns, as processes do. The same
discipline serves a DuckLake catalog: its :class:`Opener` attaches the lake instead of
opening a file.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from schemas.errors import PrefabError

DEFAULT_LOCK_TIMEOUT = 60.0


def parse_lock_timeout(text: str | None, variable: str = "PREFAB_LOCK_TIMEOUT") -> float:
    """Seconds to wait for a database lock, from an environment variable's text."""
    if text is None or not text.strip():
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise PrefabError(f"{variable} must be a number of seconds >= 0, got {text!r}")
    return seconds


def _is_contention(exc: duckdb.Error) -> bool:
    """Another process holds the file's lock, or this process holds it in another mode
    outside :func:`shared_connection` (a user's own ``duckdb.connect`` in a notebook)."""
    text = str(exc).lower()
    if isinstance(exc, duckdb.IOException):
        return "lock" in text
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in text


# DuckDB 2 writes new files in a storage format that DuckDB 1.x cannot open, and the lake
# extra holds DuckDB at 1.5.x: files are created in the format every DuckDB >= 1.0 reads, so
# a home stays readable whichever of the two builds opens it next. A file keeps the format it
# was created with.
PORTABLE_STORAGE = "v1.0.0"


def _create_portable(path: Path) -> None:
    if int(duckdb.__version__.split(".")[0]) < 2:
        return  # DuckDB 1.x already writes the 1.0 format by default
    duckdb.connect(str(path), config={"storage_compatibility_version": PORTABLE_STORAGE}).close()


def _is_newer_file(exc: duckdb.Error) -> bool:
    return isinstance(exc, duckdb.IOException) and "newer version of duckdb" in str(exc).lower()


def _newer_file_error(path: Path) -> PrefabError:
    return PrefabError(
        f"{path} was written by a newer DuckDB than this Python's duckdb {duckdb.__version__} "
        f"(DuckDB 2 writes a format 1.x cannot read; prefab's lake extra needs duckdb 1.5.x): "
        f"open it with the DuckDB that wrote it and copy it to the 1.0 format, e.g. in duckdb 2 "
        f"`ATTACH '{path}' AS old; ATTACH 'converted.duckdb' AS new (STORAGE_VERSION "
        f"'{PORTABLE_STORAGE}'); COPY FROM DATABASE old TO new`, then replace the file"
    )


@dataclass(frozen=True)
class Opener:
    """How :func:`shared_connection` opens, hands out and closes its one connection."""

    open: Callable[[bool], duckdb.DuckDBPyConnection]  # read_only -> connection
    close: Callable[[duckdb.DuckDBPyConnection], None] = lambda connection: connection.close()
    cursor: Callable[[duckdb.DuckDBPyConnection], duckdb.DuckDBPyConnection] = lambda connection: connection.cursor()


def connect_waiting(
    path: Path,
    *,
    timeout: float,
    on_timeout: Callable[[], Exception],
    read_only: bool = False,
    opener: Opener | None = None,
) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            if opener is not None:
                return opener.open(read_only)
            if not read_only and not path.exists():
                _create_portable(path)
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if _is_newer_file(exc):
                raise _newer_file_error(path) from exc
            if not _is_contention(exc):
                raise
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


@dataclass
class _Shared:
    """This process's connections to one database file."""

    changed: threading.Condition = field(default_factory=threading.Condition)
    writer: threading.RLock = field(default_factory=threading.RLock)
    connection: duckdb.DuckDBPyConnection | None = None
    opener: Opener | None = None
    read_only: bool = False
    users: int = 0
    writers_waiting: int = 0
    readers: dict[int, int] = field(default_factory=dict)  # thread id -> read-only cursors it holds


_SHARED: dict[str, _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child must not use its parent's connections (nor locks held at the fork)."""
    global _SHARED_LOCK
    _SHARED.clear()
    _SHARED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _shared_for(path: Path | str) -> _Shared:
    key = str(path.resolve()) if isinstance(path, Path) else path
    with _SHARED_LOCK:
        return _SHARED.setdefault(key, _Shared())


@contextmanager
def shared_connection(
    path: Path | str,
    *,
    timeout: float,
    on_timeout: Callable[[], Exception],
    read_only: bool = False,
    opener: Opener | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on this process's one connection to ``path``, opened (waiting) if none is open.

    A read-only request joins a read-write connection already open; a read-write request
    waits until the read-only users are done (then reopens read-write), up to ``timeout``.
    ``path`` is a database file, or (with an ``opener``) any name of the database.
    """
    shared = _shared_for(path)
    shared.opener = opener
    deadline = time.monotonic() + timeout
    if not read_only and not shared.writer.acquire(timeout=max(timeout, 0)):
        raise on_timeout()
    me = threading.get_ident()
    try:
        with shared.changed:
            cursor = _join(shared, path, read_only, me, deadline, on_timeout)
        try:
            yield cursor
        finally:
            cursor.close()
            with shared.changed:
                _leave(shared, read_only, me)
    finally:
        if not read_only:
            shared.writer.release()


def _join(shared: _Shared, path: Path | str, read_only: bool, me: int, deadline: float,
          on_timeout: Callable[[], Exception]) -> duckdb.DuckDBPyConnection:
    """Take a cursor, opening the connection first if needed (caller holds ``shared.changed``)."""
    if not read_only:
        shared.writers_waiting += 1
    try:
        while True:
            if shared.connection is None and (not read_only or not shared.writers_waiting):
                shared.connection = connect_waiting(path, timeout=max(deadline - time.monotonic(), 0),
                                                    on_timeout=on_timeout, read_only=read_only,
                                                    opener=shared.opener)
                shared.read_only = read_only
            if shared.connection is not None:
                # A reader joins what is open, but lets a waiting writer go first (unless this
                # thread already reads: it would wait for itself); a writer needs read-write.
                if read_only and (not shared.read_only or not shared.writers_waiting or shared.readers.get(me)):
                    break
                if not read_only and not shared.read_only:
                    break
            if not read_only and shared.readers.get(me):
                raise PrefabError(f"{path}: this thread asked to write while it holds a read-only "
                                  "connection to it (a prefab bug: finish the read first)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise on_timeout()
            shared.changed.wait(remaining)
    finally:
        if not read_only:
            shared.writers_waiting -= 1
    shared.users += 1
    if read_only:
        shared.readers[me] = shared.readers.get(me, 0) + 1
    return shared.opener.cursor(shared.connection) if shared.opener else shared.connection.cursor()


def _leave(shared: _Shared, read_only: bool, me: int) -> None:
    shared.users -= 1
    if read_only:
        shared.readers[me] -= 1
        if not shared.readers[me]:
            del shared.readers[me]
    if shared.users == 0 and shared.connection is not None:
        # Closed when unused, so other processes can take the file between our operations.
        if shared.opener is not None:
            shared.opener.close(shared.connection)
        else:
            shared.connection.close()
        shared.connection = None
    shared.changed.notify_all()
