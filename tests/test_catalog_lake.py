"""The catalog on DuckLake: the same guarantees as the home catalog, on a local metadata file
and on PostgreSQL, plus migration from a home and plain DuckDB reads of any version."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog, RefError, diff, gc, verify
from factory.catalog.lake import lake_opener, parse_catalog_url
from tests.test_catalog import COMMITTER, _python, make_pairs

pytest.importorskip("duckdb_extension_ducklake", reason="the DuckLake extension wheel is not installed "
                                                        "(pip install 'prefab[lake]')")


@pytest.fixture
def lake_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PREFAB_CATALOG", "")
    return f"ducklake:{tmp_path / 'team' / 'catalog.ducklake'}"


@pytest.fixture
def lake(tmp_path: Path, lake_url: str) -> Catalog:
    return Catalog(tmp_path / "home", catalog=lake_url)


def _ids(catalog: Catalog, ref: str) -> list[str]:
    return catalog.read_table(ref, columns=["pair_id"]).column("pair_id").to_pylist()


def test_url_names_the_metadata_and_the_data_path(tmp_path):
    local = parse_catalog_url(f"ducklake:{tmp_path}/c.ducklake")
    assert local.data_path == f"{tmp_path}/c.ducklake.files/"
    team = parse_catalog_url("ducklake:postgres:dbname=prefab host=db DATA_PATH /mnt/shared/prefab")
    assert (team.metadata, team.data_path) == ("postgres:dbname=prefab host=db", "/mnt/shared/prefab/")
    assert parse_catalog_url("ducklake:postgres:dbname=prefab").data_path is None
    with pytest.raises(Exception, match="PREFAB_CATALOG or --catalog"):
        parse_catalog_url("postgres://db/prefab")


def test_commit_resolve_tag_merge_and_time_travel_on_a_local_lake(lake, tmp_path):
    first = lake.commit("d", make_pairs(30), message="one")
    wider = make_pairs(10, start=100).append_column("source", pa.array(["web"] * 10))
    second = lake.commit("d", wider, message="two", parents=["d@1"],
                         failures=pa.table({"step": ["f"], "pair_id": [None], "reason": ["bad"], "raw": ["{}"]}))
    assert (first.version, second.version) == (1, 2)
    assert lake.commit("d", wider).unchanged
    assert lake.read_table("d@1").num_rows == 30 and lake.read_table("d").num_rows == 10
    assert lake.schema("d").names[-1] == "source" and "source" not in lake.schema("d@1").names
    assert lake.resolve("d@2").lineage["parents"] == ["d@1"]
    assert lake.failures("d@2").column("reason").to_pylist() == ["bad"]
    lake.tag("d@1", "gold")
    with pytest.raises(RefError, match="immutable"):
        lake.tag("d@2", "gold")
    lake.tag("d@2", "gold", force=True)
    assert lake.resolve("d@gold").version == 2
    assert [(e["from_version"], e["to_version"]) for e in lake.tag_history("d")] == [(None, 1), (1, 2)]
    merged = lake.merge(["d@1", "d@2"], "m")
    assert merged.rows == 40 and merged.lineage["parents"] == ["d@1", "d@2"]
    assert diff(lake, "d@1", "d@2")["added"] == 10
    assert verify(lake)["ok"]
    assert gc(lake, dry_run=True, grace_seconds=0)["areas"]["objects"]["removed"] == []
    # The home holds no catalog: everything is in the lake.
    assert not (tmp_path / "home" / "catalog.duckdb").exists()
    assert all(p.is_relative_to(tmp_path / "team") for p in lake.checked_paths("d@1"))


def test_reads_verify_ids_of_files_under_the_data_path(lake):
    info = lake.commit("d", make_pairs(5))
    (path,) = lake.paths(info)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="corrupted"):
        Catalog(lake.home, catalog=lake.location).read_table(info.ref)


def test_a_plain_duckdb_client_queries_any_version(lake):
    lake.commit("d", make_pairs(30))
    lake.commit("d", make_pairs(12, start=50))
    spec = lake.lake
    opener = lake_opener(spec)  # only to find the extension; the queries are plain SQL
    connection = opener.open(True)
    try:
        alias = spec.alias
        connection.execute(f"SET VARIABLE v = (SELECT snapshot_id FROM {alias}.snapshots() "
                           "WHERE commit_message = 'prefab: d@1')")
        old = connection.sql(f"SELECT pair_id FROM {alias}.pairs_d AT (VERSION => getvariable('v')) "
                             "ORDER BY pair_id").fetchall()
        latest = connection.sql(f"SELECT count(*) FROM {alias}.pairs_d").fetchone()[0]
        versions = connection.sql(f"SELECT version, rows FROM {alias}.prefab.versions ORDER BY version").fetchall()
    finally:
        opener.close(connection)
    assert [r[0] for r in old] == sorted(_ids(lake, "d@1"))
    assert latest == 12 and versions == [(1, 30), (2, 12)]


def test_migrate_keeps_every_version_tag_lineage_and_id(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("PREFAB_CATALOG", "")
    home = Catalog(tmp_path / "prefab-home")
    home.commit("a", make_pairs(20), message="first")
    home.commit("a", make_pairs(8, start=40), parents=["a@1"],
                quarantine=None, failures=pa.table({"reason": ["timeout"], "pair_id": ["x"]}))
    home.commit("b", make_pairs(6, start=7))
    home.merge(["a@1", "b@1"], "m")
    home.commit("a", make_pairs(8, start=40), lineage={"run_id": "again"})  # a run of a@2
    home.tag("a@1", "gold")
    home.tag("a@2", "gold", force=True)
    trained = _model_folder(home.home / "models" / "rm" / "v1")
    (trained / "checkpoint").mkdir()  # a run killed after registering, before dropping its resume state
    (trained / "checkpoint" / "state.pt").write_bytes(b"optimiser")
    home.register_model("rm", trained, "a@1", {"accuracy": 0.75}, {"lr": 0.001})
    home.register_model("gone", _model_folder(home.home / "models" / "gone" / "v1"), "b@1", {}, {})
    shutil.rmtree(home.home / "models" / "gone")
    url = f"ducklake:{tmp_path / 'lake' / 'catalog.ducklake'}"
    moved = cli("catalog", "migrate", "--to", url, "--json")
    assert moved.code == 0, moved.stderr
    assert moved.json()["versions"] == 4 and moved.json()["models"] == 1
    assert moved.json()["models_left_behind"] == [{"model": "gone@1",
                                                   "path": str(home.home / "models" / "gone" / "v1")}]
    assert cli("catalog", "verify").code == 0
    assert cli("catalog", "verify", "--catalog", url).code == 0
    monkeypatch.setenv("PREFAB_CATALOG", "")  # the CLI set it for its command
    lake = Catalog(tmp_path / "other-home", catalog=url)
    # The registered model is on the data path with its manifest, as if registered on the lake.
    folder = lake.checked_model_path("rm@1")
    assert folder == lake.data_root / "models" / "rm" / "v1"
    assert _files(folder) == {"config.json": b"{}", "weights/model.bin": b"\x00" * 4096}
    moved_entry, home_entry = lake.get_model("rm@1"), home.get_model("rm@1")
    assert {**moved_entry, "path": None} == {**home_entry, "path": None}
    assert not list((lake.data_root / "models" / "rm").glob(".incoming-*"))
    checked = verify(lake)
    assert checked["ok"] and checked["model_files_checked"] == 2 and checked["broken_models"] == []
    assert [m["name"] for m in lake.models()] == ["gone", "rm"]  # its row kept, its home path unchanged
    assert lake.get_model("gone@1")["path"] == str(lake.home / "models" / "gone" / "v1")
    assert lake.datasets() == home.datasets()
    for name in ("a", "b", "m"):
        assert [v.as_dict() for v in lake.log(name)] == [v.as_dict() for v in home.log(name)]
        assert lake.tag_history(name) == home.tag_history(name)
        for info in home.log(name):
            assert _ids(lake, info.ref) == _ids(home, info.ref)
            assert [r.lineage for r in lake.runs(info)] == [r.lineage for r in home.runs(info)]
    assert lake.failures("a@2").equals(home.failures("a@2"))
    again = cli("catalog", "migrate", "--to", url)
    assert again.code == 1 and "already holds versions" in again.stderr


def _model_folder(folder: Path) -> Path:
    (folder / "weights").mkdir(parents=True)
    (folder / "config.json").write_bytes(b"{}")
    (folder / "weights" / "model.bin").write_bytes(b"\x00" * 4096)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_sigkill_inside_a_lake_commit_leaves_the_lake_valid(lake):
    lake.commit("d", make_pairs(5))
    before = lake.resolve("d").as_dict()
    process = _python(COMMITTER.replace('"shared"', '"d"'), str(lake.home), "1", "1",
                      env={"PREFAB_TEST_CRASH_AT": "in_transaction", "PREFAB_CATALOG": lake.location})
    _, err = process.communicate(timeout=120)
    assert process.returncode == -9, err
    after = Catalog(lake.home, catalog=lake.location)
    assert after.resolve("d").as_dict() == before
    assert verify(after)["ok"]
    assert after.commit("d", make_pairs(2)).version == 2


SECOND_HOST = """
import json, sys
from factory.catalog import Catalog
catalog = Catalog(sys.argv[1])
info = catalog.resolve("d@gold")
ids = catalog.read_table(info, columns=["pair_id"]).column("pair_id").to_pylist()
print(json.dumps({"ref": info.ref, "ids": ids}))
"""


def test_a_second_host_with_its_own_home_reads_what_the_first_committed(lake, tmp_path):
    info = lake.commit("d", make_pairs(9))
    lake.tag(info.ref, "gold")
    process = _python(SECOND_HOST, str(tmp_path / "second-host-home"), env={"PREFAB_CATALOG": lake.location})
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert json.loads(out) == {"ref": "d@1", "ids": _ids(lake, "d@1")}


def _writers(url: str, home: Path, workers: int, commits: int) -> None:
    processes = [_python(COMMITTER, str(home), str(w), str(commits), env={"PREFAB_CATALOG": url})
                 for w in range(workers)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err


def test_two_processes_commit_to_one_local_lake(lake):
    _writers(lake.location, lake.home, 2, 3)
    assert sorted(v.version for v in lake.log("shared")) == list(range(1, 7))


@pytest.mark.slow
def test_eight_writer_processes_on_postgres_lose_nothing(tmp_path, monkeypatch, postgres_database):
    monkeypatch.setenv("PREFAB_CATALOG", "")
    dsn = postgres_database
    url = f"ducklake:postgres:{dsn} DATA_PATH {tmp_path / 'shared-data'}"
    Catalog(tmp_path / "home", catalog=url)  # made once, so the writers race on commits only
    _writers(url, tmp_path / "home", 8, 3)
    catalog = Catalog(tmp_path / "reader-home", catalog=f"ducklake:postgres:{dsn}")
    versions = catalog.log("shared")
    assert sorted(v.version for v in versions) == list(range(1, 25))
    assert sorted(v.message for v in versions) == sorted(f"w{w} c{i}" for w in range(8) for i in range(3))
    assert all(catalog.read_table(v).num_rows == 20 for v in versions)
    assert verify(catalog)["ok"]


def test_two_processes_on_postgres_and_a_reader_elsewhere(tmp_path, monkeypatch, postgres_database):
    monkeypatch.setenv("PREFAB_CATALOG", "")
    dsn = postgres_database
    url = f"ducklake:postgres:{dsn} DATA_PATH {tmp_path / 'shared-data'}"
    _writers(url, tmp_path / "home", 2, 2)
    reader = Catalog(tmp_path / "reader-home", catalog=f"ducklake:postgres:{dsn}")
    assert sorted(v.version for v in reader.log("shared")) == [1, 2, 3, 4]
    assert reader.data_root == tmp_path / "shared-data"
    assert os.listdir(tmp_path / "shared-data" / "objects")


def test_gc_and_duckdb_maintenance_keep_every_object_a_version_needs(lake):
    lake.commit("d", make_pairs(30))
    lake.commit("e", make_pairs(30), failures=pa.table({"reason": ["x"] * 500}))  # same objects as d@1
    orphan = lake.stage(make_pairs(4, start=900))
    opener = lake_opener(lake.lake)
    connection = opener.open(False)
    try:  # DuckLake's own cleanup of files it does not know, and CHECKPOINT (which runs it)
        assert connection.sql(f"CALL ducklake_delete_orphaned_files('{lake.lake.alias}', dry_run => true, "
                              "cleanup_all => true)").fetchall() == []
        connection.execute(f"USE {lake.lake.alias}")
        connection.execute("CHECKPOINT")
        connection.execute("USE memory")
    finally:
        opener.close(connection)
    report = gc(lake, dry_run=False, grace_seconds=0)
    assert sorted(report["areas"]["objects"]["removed"]) == sorted(
        str(obj.path.relative_to(lake.data_root)) for obj in (orphan.data, orphan.index))
    reopened = Catalog(lake.home, catalog=lake.location)
    assert verify(reopened)["ok"]
    assert _ids(reopened, "e@1") == _ids(reopened, "d@1") and reopened.failures("e@1").num_rows == 500
    assert reopened.commit("d", make_pairs(3)).version == 2  # writes still conflict-checked after CHECKPOINT


@pytest.mark.parametrize("on", ["lake", "home"])
def test_gc_removes_half_made_copies_of_killed_writes_after_the_grace_period(on, lake, tmp_path):
    catalog = lake if on == "lake" else Catalog(tmp_path / "own-home", catalog="")
    info = catalog.commit("d", make_pairs(5))
    trained = _model_folder(tmp_path / "trained")
    # What a register_model killed between its copy and its commit leaves, and one mid-copy now.
    stale, _ = catalog._share_model("rm", trained, ())
    fresh, _ = catalog._share_model("rm", trained, ())
    (object_path,) = catalog.paths(info)
    placement = object_path.with_name(f".{object_path.name}.4242.tmp")  # a killed `catalog migrate`
    placement.write_bytes(b"half")
    registered = catalog.data_root / "models" / "rm" / "v1"  # a model's folder is never gc's
    shutil.copytree(trained, registered)
    hours_ago = time.time() - 7200
    for path in [placement, *_walk(stale), *_walk(registered)]:
        os.utime(path, (hours_ago, hours_ago))
    expected = sorted(str(p.relative_to(catalog.data_root)) for p in (stale, placement))

    report = gc(catalog, dry_run=True)["areas"]["incoming"]  # the default grace: an hour
    assert (sorted(report["removed"]), report["kept"]) == (expected, 1)
    assert gc(catalog, dry_run=True, grace_seconds=3 * 3600)["areas"]["incoming"]["removed"] == []
    done = gc(catalog, dry_run=False)
    assert sorted(done["areas"]["incoming"]["removed"]) == expected and set(expected) <= set(done["files"])
    assert not stale.exists() and not placement.exists()
    assert _files(fresh) == _files(trained) == _files(registered)
    assert verify(catalog)["ok"] and _ids(catalog, "d@1") == make_pairs(5).column("pair_id").to_pylist()


def _walk(folder: Path) -> list[Path]:
    return [folder, *folder.rglob("*")]


def test_gc_puts_back_a_registered_models_copy_that_a_kill_left_unrenamed(lake, cli, monkeypatch):
    lake.commit("d", make_pairs(5))
    trained = _model_folder(lake.home / "trained")
    lake.register_model("rm", trained, "d@1", {}, {})
    place = lake.data_root / "models" / "rm" / "v1"
    # Killed after the commit that numbered it, before the rename: the version's folder is missing.
    unrenamed = place.with_name(".incoming-0123")
    place.rename(unrenamed)
    other, _ = lake._share_model("rm", trained, ())  # a copy of the same files no version records
    (other / "config.json").write_bytes(b'{"changed": 1}')
    hours_ago = time.time() - 7200
    for path in [*_walk(unrenamed), *_walk(other)]:
        os.utime(path, (hours_ago, hours_ago))
    assert not verify(lake)["ok"]

    monkeypatch.setenv("PREFAB_CATALOG", lake.location)
    dry = cli("catalog", "gc")
    assert dry.code == 0, dry.stderr
    assert "would restore 1 registered model folder(s)" in dry.stdout and "(and restore those)" in dry.stdout
    report = gc(lake, dry_run=False)["areas"]["incoming"]
    assert report["restored"] == ["models/rm/.incoming-0123 -> models/rm/v1"]
    assert report["removed"] == [str(other.relative_to(lake.data_root))]
    assert not unrenamed.exists() and not other.exists()
    assert _files(lake.checked_model_path("rm@1")) == _files(trained) and verify(lake)["ok"]


def test_a_write_that_loses_a_conflict_runs_again_until_the_lock_timeout(lake, monkeypatch):
    import duckdb

    from factory.catalog import CatalogBusy

    attempts = []

    def conflicting_once(connection):
        attempts.append(connection.execute("SELECT count FROM writes").fetchone()[0])
        if len(attempts) == 1:
            raise duckdb.TransactionException("Transaction conflict - another transaction committed first")
        return "done"

    assert lake._write(conflicting_once) == "done" and len(attempts) == 2

    def always_conflicting(connection):
        raise duckdb.TransactionException("Failed to commit DuckLake transaction: Transaction conflict")

    monkeypatch.setenv("PREFAB_LOCK_TIMEOUT", "0.3")
    with pytest.raises(CatalogBusy, match="PREFAB_LOCK_TIMEOUT"):
        lake._write(always_conflicting)
    with pytest.raises(duckdb.TransactionException, match="disk full"):  # other errors are not retried
        lake._write(lambda connection: (_ for _ in ()).throw(duckdb.TransactionException("disk full")))


def test_the_readme_team_setup_runs_on_postgres(tmp_path, cli, monkeypatch, postgres_database):
    """The README's team commands, line by line as written (migrate an existing home into an
    empty lake, verify both sides, ingest on the lake), and its plain-SQL time travel, against
    a real PostgreSQL catalog."""
    import re
    import shlex

    import duckdb

    from factory.lake_extensions import load_lake_extensions

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### A catalog a team can share"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    sql = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    assert "prefab: hh@3" in sql and "pairs_hh" in sql
    demo = Path(__file__).resolve().parents[1] / "examples" / "seeds" / "demo_pairs.jsonl"
    monkeypatch.setenv("PREFAB_CATALOG", "")
    assert cli("ingest", demo, "--name", "seeds").code == 0  # the home a team already has

    url = f"ducklake:postgres:{postgres_database} DATA_PATH {tmp_path / 'shared'}"
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    export = next(c for c in commands if c.startswith("export PREFAB_CATALOG="))
    assert "DATA_PATH" in export
    monkeypatch.setenv("PREFAB_CATALOG", url)
    ran = []
    for command in commands:
        for part in (p.strip() for p in command.split("&&")):
            words = shlex.split(part.replace('"$PREFAB_CATALOG"', shlex.quote(url)))
            if not words or words[0] in ("pip", "export"):
                continue
            environment = url
            if words[0] == "PREFAB_CATALOG=":
                environment, words = "", words[1:]
            assert words[0] == "prefab", part
            monkeypatch.setenv("PREFAB_CATALOG", environment)
            args = [str(demo) if w == "pairs.jsonl" else w for w in words[1:]]
            result = cli(*args)
            assert result.code == 0, (part, result.stdout, result.stderr)
            ran.append(words[1:3])
    assert ran == [["catalog", "migrate"], ["catalog", "verify"], ["catalog", "verify"], ["ingest", "pairs.jsonl"]]

    monkeypatch.setenv("PREFAB_CATALOG", "")
    team = Catalog(tmp_path / "another-home", catalog=f"ducklake:postgres:{postgres_database}")
    assert team.resolve("seeds").version == 1 and team.resolve("hh").version == 1
    for rows in (20, 7, 3):
        team.commit("hh", make_pairs(rows))

    client = duckdb.connect()  # a plain DuckDB client: no prefab code past loading the extensions
    load_lake_extensions(client, postgres=True)
    statements = [s for s in sql.replace("dbname=prefab host=db", postgres_database).split(";") if s.strip()]
    for statement in statements[:-1]:
        client.execute(statement)
    assert client.execute(statements[-1]).fetchone()[0] == 7  # hh@3: the second team commit
    client.close()


# ---- Ray workers stage their batches on the shared data path --------------------------------


def _small_batches(monkeypatch: pytest.MonkeyPatch, rows: int = 40) -> None:
    """master_keys in batches of ``rows``, so a run has several batches to keep and resume."""
    import dataclasses

    from factory.steps import registry

    spec = registry.get_step("master_keys", "generator")
    monkeypatch.setitem(registry._STEPS, ("generator", "master_keys"), dataclasses.replace(spec, batch_rows=rows))


def _labels(catalog: Catalog, ref: str) -> list[tuple[str, str, str, bool]]:
    table = catalog.read_table(ref, columns=["pair_id", "chosen", "rejected", "tie"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_ray_batches_are_staged_under_the_lakes_data_path_and_resumed(lake, lake_url, tmp_path, monkeypatch):
    """The driver's side of ``--engine ray`` on a lake, with the workers' job (``_RayBatch``)
    run in process: batches go to ``<data path>/staging/<key>/`` (never the home), an
    interrupted run's batches are found there by the rerun, which commits once and removes
    the folder; gc reports a left-over folder as the area ``staging``."""
    from factory.steps import api, runner

    _small_batches(monkeypatch)
    monkeypatch.setenv("PREFAB_CATALOG", lake_url)
    lake.commit("seeds", make_pairs(150))
    local = api.generate("master_keys", "seeds", "keys_local", home=lake.home)
    folders: list[Path] = []
    computed: list[int] = []
    interrupt = [True]

    def workers(prepared, rows, ctx, folder, address=None):  # noqa: ANN001, ANN202 - fill_on_ray's
        folders.append(folder)
        source = runner.StepInput.of(rows)
        size = prepared.spec.batch_rows
        for start, batch in zip(range(0, source.num_rows, size), source.batches(size), strict=True):
            if runner._batch_folder(folder, start).is_dir():
                continue
            row = pa.array(range(start, start + batch.num_rows), pa.int64())
            runner._RayBatch(prepared.spec, ctx, folder)(batch.append_column("__prefab_row", row))
            computed.append(start)
            if interrupt[0] and len(computed) == 2:
                raise KeyboardInterrupt
        return len(computed)

    monkeypatch.setattr(runner, "fill_on_ray", workers)
    commits = []
    real_commit = Catalog.commit
    monkeypatch.setattr(Catalog, "commit", lambda self, *a, **k: commits.append(a[0]) or real_commit(self, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        api.generate("master_keys", "seeds", "keys", home=lake.home, engine="ray")
    staging = lake.data_root / "staging"
    (folder,) = folders
    assert folder.parent == staging and sorted(p.name for p in folder.iterdir()) == [
        "rows-000000000000", "rows-000000000040"]
    assert not any((lake.home / "steps").glob("*")) and commits == []
    report = gc(lake, dry_run=True, grace_seconds=0, cache_grace_seconds=0)["areas"]["staging"]
    assert report["removed"] == [f"staging/{folder.name}"] and report["bytes"] > 0
    assert gc(lake, dry_run=True, grace_seconds=0)["areas"]["staging"]["kept"] == 1  # a week's grace

    interrupt[0] = False
    on_ray = api.generate("master_keys", "seeds", "keys", home=lake.home, engine="ray")
    assert folders == [folder, folder] and computed == [0, 40, 80, 120]  # the kept two not redone
    assert commits == ["keys"] and not folder.exists()
    assert _labels(lake, on_ray["ref"]) == _labels(lake, local["ref"])
    assert lake.resolve("keys").lineage["engine"] == "ray" and verify(lake)["ok"]


def test_the_local_engine_and_the_home_catalog_keep_batches_in_the_home(tmp_path, lake):
    from factory.steps.runner import run_work_dir

    home_catalog = Catalog(tmp_path / "own")
    assert run_work_dir(home_catalog, "k", "ray") == tmp_path / "own" / "steps" / "k"
    assert run_work_dir(lake, "k", "local") == lake.home / "steps" / "k"
    assert run_work_dir(lake, "k", "ray") == lake.data_root / "staging" / "k"
    assert "staging" not in gc(home_catalog, dry_run=True)["areas"]


@pytest.mark.slow
def test_a_row_local_step_on_ray_writes_its_batches_to_the_lake_and_commits_once(lake, lake_url, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'prefab[ray]')")
    from factory.steps import api, runner

    _small_batches(monkeypatch, rows=100)
    monkeypatch.setenv("PREFAB_CATALOG", lake_url)
    lake.commit("seeds", make_pairs(250))
    local = api.generate("master_keys", "seeds", "keys_local", home=lake.home)
    seen: dict[Path, list[str]] = {}
    real_fill = runner.fill_on_ray

    def fill(prepared, rows, ctx, folder, address=None):  # noqa: ANN001, ANN202 - fill_on_ray's
        done = real_fill(prepared, rows, ctx, folder, address)
        seen[folder] = sorted(p.name for p in folder.iterdir())
        return done

    monkeypatch.setattr(runner, "fill_on_ray", fill)
    commits = []
    real_commit = Catalog.commit
    monkeypatch.setattr(Catalog, "commit", lambda self, *a, **k: commits.append(a[0]) or real_commit(self, *a, **k))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = api.generate("master_keys", "seeds", "keys", home=lake.home, engine="ray")
    finally:
        ray.shutdown()
    ((folder, names),) = seen.items()
    assert folder.parent == lake.data_root / "staging"
    assert names == ["rows-000000000000", "rows-000000000100", "rows-000000000200"]
    assert not any((lake.home / "steps").glob("*")) and not folder.exists()
    assert commits == ["keys"] and lake.resolve("keys").version == 1
    assert _labels(lake, on_ray["ref"]) == _labels(lake, local["ref"])


# ---- verify checks each dataset's plain-SQL table ------------------------------------------


def _behind_prefabs_back(lake: Catalog, *statements: str) -> None:
    opener = lake_opener(lake.lake)
    connection = opener.open(False)
    try:
        for statement in statements:
            connection.execute(statement.format(alias=lake.lake.alias))
    finally:
        opener.close(connection)


def test_verify_finds_a_pairs_table_changed_behind_prefabs_back_and_repairs_it(lake, cli, monkeypatch):
    lake.commit("d", make_pairs(30))
    lake.commit("d", make_pairs(12, start=50))
    lake.commit("e", make_pairs(5, start=200))
    lake.commit("f", make_pairs(7, start=300))
    report = verify(lake)
    assert report["ok"] and report["tables_checked"] == 3 and report["tables"] == []
    (v1,) = lake.paths("d@1")
    _behind_prefabs_back(
        lake,
        'DROP TABLE {alias}.main."pairs_e"',
        # d's table made over version 1's file: the same columns, the wrong rows
        'DROP TABLE {alias}.main."pairs_d"',
        f"CREATE TABLE {{alias}}.main.\"pairs_d\" AS SELECT * FROM read_parquet('{v1}') LIMIT 0",
        f"CALL ducklake_add_data_files('{{alias}}', 'pairs_d', '{v1}', schema => 'main')",
        'DELETE FROM {alias}.main."pairs_f" WHERE rowid = 0',
    )
    report = verify(lake)
    assert not report["ok"] and report["problems"] == []  # every object is fine: only the tables
    problems = {p["dataset"]: p for p in report["tables"]}
    assert sorted(problems) == ["d", "e", "f"]
    assert problems["e"]["problem"] == "the table is missing"
    assert "not the version's" in problems["d"]["problem"] and str(v1) in problems["d"]["problem"]
    assert problems["d"]["version"] == 2 and problems["d"]["table"] == 'main."pairs_d"'
    assert problems["f"]["problem"] == "it holds 6 rows, the version has 7"  # the delete is inlined
    assert all("prefab catalog verify --repair" in p["repair"] for p in problems.values())

    monkeypatch.setenv("PREFAB_CATALOG", lake.location)
    monkeypatch.setenv("PREFAB_HOME", str(lake.home))
    failed = cli("catalog", "verify")
    assert failed.code != 0 and "3 wrong table(s)" in failed.stderr and 'pairs_e"' in failed.stderr
    assert "--repair" in failed.stderr
    repaired = cli("catalog", "verify", "--repair", "--json").json()
    assert repaired["ok"] and sorted(repaired["repaired"]) == ['main."pairs_d"', 'main."pairs_e"', 'main."pairs_f"']
    assert verify(lake)["ok"]
    _behind_prefabs_back(lake, 'INSERT INTO {alias}.main."pairs_e" SELECT * FROM {alias}.main."pairs_e" LIMIT 1')
    (extra,) = verify(lake)["tables"]
    assert extra["dataset"] == "e" and "6 rows" in extra["problem"]


# ---- models on the shared data path --------------------------------------------------------


def test_a_model_registered_on_a_lake_is_shared_checked_and_loads_on_another_host(lake, lake_url, tmp_path,
                                                                                   monkeypatch):
    import shutil

    import factory
    import factory.trainer.api as trainer
    from factory.catalog.catalog import DataFileError
    from tests.toy import toy_pairs

    monkeypatch.setenv("PREFAB_CATALOG", lake_url)
    table = toy_pairs(40, seed=0, ties=2)
    lake.commit("toy", table)
    factory.train("toy", "rm", home=lake.home, epochs=2, max_length=96, progress=False)
    entry = lake.get_model("rm")
    folder = Path(entry["path"])
    assert folder == lake.data_root / "models" / "rm" / "v1" and entry["version"] == 1
    trained_here = lake.home / "models" / "rm" / "v1"
    files = sorted(p.relative_to(trained_here).as_posix() for p in trained_here.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert not list((lake.data_root / "models" / "rm").glob(".incoming-*"))
    here = factory.score("rm", table, home=lake.home).column("reward_chosen").to_pylist()
    report = verify(lake)
    assert report["ok"] and report["model_files_checked"] == len(files)

    shutil.rmtree(lake.home)  # the first host's home is gone: only the catalog URL is shared
    other = tmp_path / "other-home"
    trainer._MODELS.clear()
    assert Path(Catalog(other).get_model("rm@1")["path"]) == folder
    there = factory.score("rm", table, home=other).column("reward_chosen").to_pylist()
    assert there == pytest.approx(here)

    victim = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-8] + b"01234567")
    trainer._MODELS.clear()
    with pytest.raises(DataFileError, match=r"model rm@1: its file .* is corrupted"):
        factory.load_model("rm", home=other)
    report = verify(Catalog(other))
    assert not report["ok"] and report["broken_models"] == ["rm@1"] and report["broken_versions"] == []
