"""Load DuckDB's ``ducklake`` (and ``postgres``) extensions offline, from their wheels.

DuckDB normally downloads extensions at ``INSTALL`` time; prefab's machines reach only package
registries, so the extensions come as wheels (``duckdb-extension-ducklake``,
``duckdb-extension-postgres``, the ``lake`` extra) that hold one binary built for one DuckDB
release under ``extensions/v<version>/``. A binary loads only into that exact DuckDB version,
so a mismatch is reported with both versions rather than as DuckDB's generic load failure.

DuckDB finds a loaded file's entry point from the file's name, and the postgres wheel names
its binary ``postgres.duckdb_extension`` while the extension is ``postgres_scanner``: it is
loaded through a link of the right name in a per-user cache folder.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import duckdb

from schemas.errors import PrefabError

INSTALL_HINT = "pip install 'prefab[lake]'"
# The DuckDB release the lake extra's wheels are built for (their own requirement pins it;
# constraints-cpu.txt pins the same), named in errors when no wheel is installed to ask.
LAKE_DUCKDB_VERSION = "1.5.5"
# The wheel's name of an extension -> the name DuckDB knows it by (and derives its entry
# point ``<name>_duckdb_cpp_init`` from).
_DUCKDB_NAMES = {"postgres": "postgres_scanner"}


def _loaded(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = connection.execute(
        "SELECT loaded FROM duckdb_extensions() WHERE extension_name = ?", [name]
    ).fetchone()
    return bool(row and row[0])


def extension_path(name: str) -> Path:
    """The binary of extension ``name`` that the installed wheel ships for this DuckDB."""
    module = f"duckdb_extension_{name}"
    wanted = duckdb.__version__
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise PrefabError(
            f"the DuckDB extension {name!r} is not installed (package {module}); "
            f"install it with {INSTALL_HINT}, which needs duckdb=={LAKE_DUCKDB_VERSION}"
        ) from None
    root = Path(package.__file__).resolve().parent
    found = sorted(root.rglob(f"{name}.duckdb_extension"))
    for path in found:
        if path.parent.name == f"v{wanted}":
            return path
    shipped = ", ".join(path.parent.name.removeprefix("v") for path in found) or "none"
    raise PrefabError(
        f"the installed {module} ships the {name!r} extension for DuckDB {shipped}, but this "
        f"Python has duckdb {wanted}: a DuckDB extension loads only into the DuckDB release it "
        f"was built for; install matching versions, e.g. pip install duckdb=={shipped} "
        f"(or reinstall with {INSTALL_HINT})"
    )


def load_lake_extensions(connection: duckdb.DuckDBPyConnection, postgres: bool = False) -> None:
    """Load ``ducklake`` (and ``postgres`` for a PostgreSQL catalog) into ``connection``.

    Extensions load per database instance; one already loaded is left as it is. Without a
    matching wheel, an extension that DuckDB itself installed (``INSTALL ducklake`` on a
    machine with network access) is used; failing both, the wheel's problem is reported.
    """
    for name in ("ducklake", "postgres") if postgres else ("ducklake",):
        duckdb_name = _DUCKDB_NAMES.get(name, name)
        if _loaded(connection, duckdb_name):
            continue
        try:
            path = _named_for_duckdb(extension_path(name), duckdb_name)
        except PrefabError:
            if _load_installed(connection, name):
                continue
            raise
        try:
            connection.execute(f"LOAD '{_sql_string(str(path))}'")
        except duckdb.Error as exc:
            raise PrefabError(
                f"DuckDB {duckdb.__version__} could not load the {name!r} extension from "
                f"{path}: {exc}; reinstall with {INSTALL_HINT}"
            ) from exc


def _named_for_duckdb(path: Path, duckdb_name: str) -> Path:
    """``path`` itself, or a link to it named after the extension as DuckDB knows it."""
    wanted = f"{duckdb_name}.duckdb_extension"
    if path.name == wanted:
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for base in (cache / "prefab", Path(tempfile.gettempdir()) / f"prefab-{os.getuid()}"):
        link = base / "duckdb-extensions" / path.parent.name / wanted
        try:
            if link.is_symlink() and link.resolve() == path.resolve():
                return link
            link.parent.mkdir(parents=True, exist_ok=True)
            # Made beside and renamed over: concurrent loaders never see a half-made link.
            staging = link.with_name(f".{wanted}.{os.getpid()}")
            staging.unlink(missing_ok=True)
            staging.symlink_to(path.resolve())
            staging.replace(link)
            return link
        except OSError:
            continue
    raise PrefabError(
        f"cannot link {path} as {wanted} for DuckDB to load: neither {cache / 'prefab'} nor "
        f"the temp folder is writable (set XDG_CACHE_HOME to a writable folder)"
    )


def _load_installed(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    try:
        connection.execute(f"LOAD {name}")
    except duckdb.Error:
        return False
    return True


def _sql_string(text: str) -> str:
    return text.replace("'", "''")
