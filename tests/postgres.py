"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, start it on a
unix socket there, create a database, hand out its libpq DSN, stop it afterwards.

PostgreSQL refuses to run as root, so under root the server runs as ``nobody``. The
binaries come from ``$PREFAB_TEST_PG_BIN``, the PATH, or Debian's
``/usr/lib/postgresql/*/bin``; without them :func:`postgres_dsn` skips the test, naming why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

UNPRIVILEGED_USER = "nobody"


def _bin_dir() -> Path | None:
    candidates = [os.environ.get("PREFAB_TEST_PG_BIN")]
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else None)
    candidates += sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin"))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL cannot run as root and `runuser` is missing to drop to an unprivileged user")
    return [runuser, "-u", UNPRIVILEGED_USER, "--", *command]


@contextmanager
def postgres_dsn(database: str = "prefab") -> Iterator[str]:
    """A running PostgreSQL with an empty ``database``; yields a libpq DSN (unix socket)."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, createdb) not found: install postgresql or set "
                    "PREFAB_TEST_PG_BIN to their folder")
    root = Path(tempfile.mkdtemp(prefix="prefab-pg-"))
    data, sockets = root / "data", root / "socket"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, UNPRIVILEGED_USER)
        shutil.chown(sockets, UNPRIVILEGED_USER)
    port = _free_port()
    log = root / "server.log"
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefab", "--no-sync"], "initdb")
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
              f"-p {port} -k {sockets} -c listen_addresses='' -c fsync=off -c max_connections=100",
              "start"], "pg_ctl start", log)
        try:
            _run([str(bin_dir / "createdb"), "-h", str(sockets), "-p", str(port), "-U", "prefab", database],
                 "createdb")
            yield f"dbname={database} host={sockets} port={port} user=prefab"
        finally:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], "pg_ctl stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        detail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        pytest.skip(f"PostgreSQL {what} failed ({done.returncode}): {done.stderr.strip()[-500:]} {detail}")
