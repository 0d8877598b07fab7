"""Open a DuckDB file that another process may hold, waiting a bounded time for it.

DuckDB lets one process hold a database file at a time (a second gets an IOException
about the lock), so every prefab database is opened briefly and retried with jittered
backoff until ``timeout``; then ``on_timeout()`` supplies the error the user sees.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
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


def connect_waiting(
    path: Path,
    *,
    timeout: float,
    on_timeout: Callable[[], Exception],
    read_only: bool = False,
) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
