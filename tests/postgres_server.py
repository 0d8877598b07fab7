"""A throwaway PostgreSQL server for tests and benchmarks of the team (PostgreSQL) catalog.

``start_postgres(tmpdir)`` initdb's a cluster in a fresh folder, starts it on a free TCP port
of 127.0.0.1 (and a unix socket in the cluster's folder), creates database ``prefab`` and
returns its libpq connection string with a ``stop`` function that shuts the server down and
deletes the cluster. PostgreSQL refuses to run as root, so under root (CI, containers) the
server runs as an unprivileged user (``nobody``, else a ``prefab-pg`` system user created with
useradd). The binaries come from ``PREFAB_PG_BIN`` (a folder), else ``PATH``, else Debian's
``/usr/lib/postgresql/<version>/bin``.

As a pytest plugin (``pytest_plugins`` in conftest.py) it gives the session-scoped fixture
``postgres_dsn``, the function-scoped ``postgres_database`` (a fresh database per test) and
marks every test that uses them ``postgres``. Without a usable PostgreSQL those tests skip
with the reason, unless ``PREFAB_REQUIRE_POSTGRES=1`` (set by .ci/run once it has installed
PostgreSQL), where they fail instead: CI must not pass by skipping them.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

SUPERUSER = "prefab"
DATABASE = "prefab"
_UNPRIVILEGED_USERS = ("nobody", "prefab-pg")
_NEEDED = ("initdb", "pg_ctl", "createdb")
_database_numbers = itertools.count(1)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why."""


def find_postgres_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and createdb, or None."""
    candidates: list[Path] = []
    if os.environ.get("PREFAB_PG_BIN"):
        candidates.append(Path(os.environ["PREFAB_PG_BIN"]))
    on_path = shutil.which("initdb")
    if on_path:
        # Debian links a few binaries into /usr/local/bin or /usr/bin; the rest (createdb
        # included) sit beside the real one.
        candidates += [Path(on_path).resolve().parent, Path(on_path).parent]
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += debian
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in _NEEDED):
            return folder
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account that runs the server under root; None when not root."""
    if os.geteuid() != 0:
        return None
    for name in _UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresUnavailable("running as root, with no unprivileged user and no useradd")
    command = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    subprocess.run([*command, "prefab-pg"], check=True, capture_output=True)
    return pwd.getpwnam("prefab-pg")


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` can enter every folder down to ``path`` (pytest's are 0700 root's)."""
    for folder in [path, *path.parents]:
        mode = folder.stat()
        if mode.st_uid != user.pw_uid and not mode.st_mode & stat.S_IXOTH:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_postgres(tmpdir: Path | str | None = None) -> tuple[str, Callable[[], None]]:
    """Start a throwaway server; return (libpq DSN of database ``prefab``, stop function).

    The cluster lives in a new folder under ``tmpdir`` (under the system temp folder when the
    server's unprivileged user cannot reach ``tmpdir``). Raises PostgresUnavailable with the
    reason when there are no binaries or the server does not start.
    """
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise PostgresUnavailable(
            "PostgreSQL's initdb/pg_ctl/createdb not found on PATH, in PREFAB_PG_BIN or in "
            "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)"
        )
    user = _server_user()
    parent = Path(tmpdir) if tmpdir is not None else None
    if parent is not None and user is not None and not _reachable_by(parent, user):
        parent = None
    root = Path(tempfile.mkdtemp(prefix="prefab-pg-", dir=parent))
    root.chmod(0o755)
    data, log = root / "data", root / "server.log"
    data.mkdir(mode=0o700)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(LC_ALL="C", HOME=str(root))
    as_user: dict = {}
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def server(*command: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(part) for part in command], env=env, capture_output=True, text=True, **as_user
        )

    def stop() -> None:
        server(bin_dir / "pg_ctl", "stop", "-D", data, "-m", "immediate", "-w")
        shutil.rmtree(root, ignore_errors=True)

    made = server(bin_dir / "initdb", "-D", data, "-U", SUPERUSER, "-A", "trust",
                  "--locale=C", "-E", "UTF8", "--no-sync")
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed: {made.stderr.strip() or made.stdout.strip()}")
    with (data / "postgresql.conf").open("a") as conf:
        # A throwaway cluster: durability against an OS crash buys nothing here; a killed
        # client (the SIGKILL tests) is unaffected by these.
        conf.write(
            f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
            "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
        )
    reason = "pg_ctl start failed"
    for _ in range(3):  # another process may take the probed port before the server binds it
        port = _free_port()
        started = server(bin_dir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", "60",
                         "-o", f"-p {port}")
        if started.returncode == 0:
            break
        reason = f"pg_ctl start failed: {started.stderr.strip()}\n{_tail(log)}"
    else:
        stop()
        raise PostgresUnavailable(reason)
    dsn = f"host=127.0.0.1 port={port} user={SUPERUSER}"
    try:
        new_database(dsn, DATABASE, bin_dir=bin_dir)
    except PostgresUnavailable:
        stop()
        raise
    return f"dbname={DATABASE} {dsn}", stop


def _dsn_fields(dsn: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in dsn.split())


def new_database(dsn: str, name: str, *, bin_dir: Path | None = None) -> str:
    """Create database ``name`` on the server of ``dsn``; return the DSN that names it."""
    bin_dir = bin_dir or find_postgres_bin()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL's createdb not found")
    fields = _dsn_fields(dsn)
    made = subprocess.run(
        [str(bin_dir / "createdb"), "-h", fields["host"], "-p", fields["port"],
         "-U", fields["user"], name],
        capture_output=True, text=True,
    )
    if made.returncode != 0:
        raise PostgresUnavailable(f"createdb {name} failed: {made.stderr.strip()}")
    fields["dbname"] = name
    return " ".join(f"{key}={value}" for key, value in fields.items())


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("PREFAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PREFAB_REQUIRE_POSTGRES=1 but PostgreSQL is unusable: {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """libpq DSN of database ``prefab`` on a server shared by the whole session."""
    try:
        dsn, stop = start_postgres(tmp_path_factory.mktemp("postgres"))
    except PostgresUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield dsn
    finally:
        stop()


@pytest.fixture
def postgres_database(postgres_dsn: str) -> str:
    """DSN of a database of its own for one test, on the session's server."""
    try:
        return new_database(postgres_dsn, f"prefab_test_{next(_database_numbers)}")
    except PostgresUnavailable as exc:
        _unavailable(str(exc))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"postgres_dsn", "postgres_database"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
