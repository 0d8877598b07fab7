"""Issue 18: `factory.catalog.load` writes nothing outside the home and prints no bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.catalog import Catalog, load
from tests.test_catalog import make_pairs


def test_load_maps_an_arrow_copy_under_the_home_and_leaves_the_hf_cache_alone(tmp_path, monkeypatch, capfd):
    import datasets

    hf_cache = tmp_path / "hf-cache"
    hf_cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    home = tmp_path / "home"
    catalog = Catalog(home)
    info = catalog.commit("d", make_pairs(7))

    dataset = load("d", home)
    assert dataset.num_rows == 7 and dataset["pair_id"] == catalog.read_table(info)["pair_id"].to_pylist()
    assert dataset[0]["prompt"] == [{"role": "user", "content": "question 0"}]
    again = load("d@1", home)  # reuses the copy
    assert again.num_rows == 7

    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert list(hf_cache.rglob("*")) == []
    copies = list((home / "cache" / "datasets").glob("*.arrow"))
    assert len(copies) == 1 and [Path(f["filename"]) for f in dataset.cache_files] == copies


def test_load_shows_a_bar_only_when_asked(tmp_path, capfd):
    Catalog(tmp_path).commit("d", make_pairs(3))
    load("d", tmp_path, progress=True)
    assert "load d@1" in capfd.readouterr().err


@pytest.fixture(autouse=True)
def _no_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
