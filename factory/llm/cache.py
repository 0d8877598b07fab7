"""Persistent request cache: DuckDB file plus a per-process append-only journal.

Layout (under the prefab home, ``$PREFAB_HOME`` or ``./.prefab``)::

    llm_cache.duckdb                      table llm_cache(key PRIMARY KEY, status, response, ...)
    llm_cache.duckdb.<pid>.<seq>.journal  JSON lines not yet folded into the table

Why a journal: a DuckDB commit costs milliseconds and the file admits one writing process
at a time. Appending a line to a journal costs microseconds and survives SIGKILL (the data
is in the OS page cache once ``write`` returns), so a result is durable the moment it
arrives and a killed run re-sends only what was truly in flight. Journals are folded into
DuckDB in the background (every couple of seconds and at the end of a batch) and, after a
crash, by the next process that opens the cache (journals whose pid is gone). Folding is
``INSERT OR REPLACE`` by key, so replaying a journal twice is harmless; a torn last line
from a kill mid-write is skipped (that one request is simply sent again).

The DuckDB file is opened only for the duration of a lookup or a fold, so several
processes can share one cache; a lock held by another process is retried with backoff up
to ``lock_timeout`` seconds, then :class:`CacheLockedError` names the file and the fix.

Only final answers are stored (status ``ok``, ``parse_error`` or ``truncated``, which
come back with that status); transient errors are not, so a rerun retries them. No credentials are ever written: a response carries no request
headers, and error strings are redacted by the backends before they reach a Response.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from factory.dbwait import connect_waiting
from factory.home import resolve_home

from .types import CACHEABLE_STATUSES, CacheLockedError, Response

CACHE_FILENAME = "llm_cache.duckdb"

# Journals that a live RequestCache object of this process is still appending to; any other
# journal of this pid (an object dropped without flush) is fair game for recover().
_ACTIVE_JOURNALS: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _release_journal(path: str, file) -> None:
    with contextlib.suppress(Exception):
        file.close()
    with _ACTIVE_LOCK:
        _ACTIVE_JOURNALS.discard(path)

_DDL = """
CREATE TABLE IF NOT EXISTS llm_cache (
    key VARCHAR PRIMARY KEY,
    model VARCHAR,
    status VARCHAR,
    response VARCHAR,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    cost DOUBLE,
    created_at TIMESTAMP
)
"""
_COLUMNS = ("key", "model", "status", "response", "prompt_tokens", "completion_tokens", "cost", "created_at")


def default_cache_path() -> Path:
    return resolve_home() / CACHE_FILENAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RequestCache:
    """Key -> final :class:`Response` store shared across processes and recipes."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lock_timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_cache_path()
        self.lock_timeout = lock_timeout
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self._pending: dict[str, tuple] = {}  # rows in the open journal
        self._folding: dict[str, tuple] = {}  # rows being folded into DuckDB right now
        self._journal = None
        self._journal_path: Path | None = None
        self._seq = 0
        self._initialized = False
        self._stale_journals: list[Path] = []  # own journals whose fold failed; retried later

    # -- DuckDB access -------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = connect_waiting(
            self.path, timeout=self.lock_timeout,
            on_timeout=lambda: CacheLockedError(
                f"request cache {self.path} is locked by another process for more than "
                f"{self.lock_timeout:.0f}s. DuckDB allows one writing process per "
                "file: wait for that process, or point PREFAB_HOME (or cache=...) at "
                "another folder."
            ),
        )
        try:
            if not self._initialized:
                con.execute(_DDL)
                self._initialized = True
            yield con
        finally:
            con.close()

    def _insert_rows(self, rows: list[tuple]) -> None:
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        batch = pa.table(
            {
                "key": pa.array(cols[0], pa.string()),
                "model": pa.array(cols[1], pa.string()),
                "status": pa.array(cols[2], pa.string()),
                "response": pa.array(cols[3], pa.string()),
                "prompt_tokens": pa.array(cols[4], pa.int64()),
                "completion_tokens": pa.array(cols[5], pa.int64()),
                "cost": pa.array(cols[6], pa.float64()),
                "created_at": pa.array(cols[7], pa.timestamp("us")),
            }
        )
        with self._connect() as con:
            con.register("prefab_batch", batch)
            con.execute(
                f"INSERT OR REPLACE INTO llm_cache SELECT {', '.join(_COLUMNS)} FROM prefab_batch"
            )
            con.unregister("prefab_batch")

    # -- journal -------------------------------------------------------------------------
    def _journal_glob(self) -> list[str]:
        return glob.glob(glob.escape(str(self.path)) + ".*.journal")

    @staticmethod
    def _read_journal(path: str) -> list[tuple]:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    d = json.loads(line)
                    rows.append(
                        (d["key"], d["model"], d["status"], d["response"], d["pt"], d["ct"],
                         d["cost"], datetime.fromisoformat(d["ts"]))
                    )
                except (ValueError, KeyError):
                    continue  # torn line from a kill mid-write: that request is re-sent
        return rows

    def recover(self) -> int:
        """Fold journals left by dead processes (a crash or SIGKILL) into DuckDB."""
        n = 0
        me = os.getpid()
        for path in self._journal_glob():
            try:
                pid = int(Path(path).name.rsplit(".", 3)[-3])
            except (ValueError, IndexError):
                continue
            if pid == me:
                with _ACTIVE_LOCK:
                    if path in _ACTIVE_JOURNALS:
                        continue
            elif _pid_alive(pid):
                continue
            rows = self._read_journal(path)
            self._insert_rows(rows)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            n += len(rows)
        return n

    def _open_journal(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        # id(self) keeps two cache objects of one process on separate journal files.
        self._journal_path = Path(f"{self.path}.{os.getpid()}.{id(self):x}-{self._seq}.journal")
        with _ACTIVE_LOCK:
            _ACTIVE_JOURNALS.add(str(self._journal_path))
        self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115
        # Dropped without flush(): close the file and let recover() in this process fold it.
        self._finalizer = weakref.finalize(
            self, _release_journal, str(self._journal_path), self._journal
        )

    # -- public API ----------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, Response]:
        """Look up many keys with one query; returns only the hits."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        out: dict[str, Response] = {}
        with self._lock:
            local = {**self._folding, **self._pending}
        for k in keys:
            row = local.get(k)
            if row is not None:
                out[k] = Response.from_json(row[3], cached=True)
        missing = [k for k in keys if k not in out]
        if missing and (self.path.exists() or self._journal_glob()):
            self.recover()
            with self._connect() as con:
                con.register("prefab_keys", pa.table({"key": pa.array(missing, pa.string())}))
                rows = con.execute(
                    "SELECT c.key, c.response FROM llm_cache c JOIN prefab_keys k USING (key)"
                ).fetchall()
                con.unregister("prefab_keys")
            for k, blob in rows:
                out[k] = Response.from_json(blob, cached=True)
        return out

    def put(self, key: str, model: str, response: Response) -> bool:
        """Make a final response durable now (journal append). Returns False if not cacheable."""
        if response.status not in CACHEABLE_STATUSES:
            return False
        ts = datetime.now(UTC).replace(tzinfo=None)
        blob = response.to_json()
        row = (key, model, response.status, blob, response.prompt_tokens,
               response.completion_tokens, response.cost, ts)
        line = json.dumps(
            {"key": key, "model": model, "status": response.status, "response": blob,
             "pt": response.prompt_tokens, "ct": response.completion_tokens,
             "cost": response.cost, "ts": ts.isoformat()},
            ensure_ascii=False,
        )
        with self._lock:
            if self._journal is None:
                self._open_journal()
            self._journal.write(line + "\n")
            self._journal.flush()
            self._pending[key] = row
        return True

    def flush(self) -> int:
        """Fold this process's journal into DuckDB (safe to call from a worker thread)."""
        with self._fold_lock:
            with self._lock:
                if not self._pending:
                    return 0
                rows = list(self._pending.values())
                self._folding, self._pending = self._pending, {}
                old_file, old_path = self._journal, self._journal_path
                self._journal, self._journal_path = None, None
            self._finalizer.detach()
            _release_journal(str(old_path), old_file)
            try:
                self._insert_rows(rows)
            except BaseException:
                # Keep the rows (and their journal) for the next fold; nothing is lost.
                with self._lock:
                    self._pending = {**self._folding, **self._pending}
                    self._folding = {}
                    self._stale_journals.append(old_path)
                raise
            with self._lock:
                self._folding = {}
                stale, self._stale_journals = self._stale_journals + [old_path], []
            # Only after the commit: a crash before this line leaves the journal for recover().
            for p in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
            return len(rows)

    def close(self) -> None:
        self.flush()

    def stats(self) -> dict[str, int]:
        """Row counts by status (after folding journals left by dead processes)."""
        if not self.path.exists() and not self._journal_glob():
            return {"rows": 0}
        self.recover()
        with self._connect() as con:
            rows = con.execute(
                "SELECT status, count(*) FROM llm_cache GROUP BY status ORDER BY status"
            ).fetchall()
        d = {s: int(c) for s, c in rows}
        d["rows"] = sum(d.values())
        return d
