"""The embedder is chosen per use: a validated name, its own cache folder (no vector of one
embedder is ever served for another), and a step parameter that the step identity carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factory.catalog import Catalog
from factory.embed import EMBEDDERS, UnknownEmbedderError, check_embedder, embed_texts

TEXTS = ["How do I reset my router?", "Tides follow the moon.", "Bread needs yeast to rise."]


def test_unknown_embedder_is_a_one_line_error_naming_the_choices(tmp_path):
    assert EMBEDDERS == ("minilm", "minilm-onnx", "static")
    with pytest.raises(UnknownEmbedderError) as info:
        embed_texts(TEXTS, home=tmp_path, embedder="bert")
    message = str(info.value)
    assert "\n" not in message and "'bert'" in message
    assert all(name in message for name in EMBEDDERS)
    assert check_embedder("static") == "static"


def test_unknown_embedder_setting_fails_the_step_before_any_work(cli, tmp_path):
    seeds = _seeds(tmp_path)
    assert cli("ingest", str(seeds), "--name", "pairs").code == 0
    result = cli("filter", "dedup", "--from", "pairs", "--name", "dd", "--set", "near=embedding",
                 "--set", "embedder=bert")
    assert result.code != 0
    line = result.stderr.strip()
    assert "\n" not in line and "embedder" in line and "'bert'" in line
    assert all(f"'{name}'" in line for name in EMBEDDERS)


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One distilled static model for the module (distilling takes ~15 s on an idle CPU)."""
    from factory.embed import static

    folder = static.static_model_dir(tmp_path_factory.mktemp("static-home"))
    static.static_model(folder.parent.parent)
    return folder


@pytest.fixture
def shared_static(static_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from factory.embed import static

    monkeypatch.setattr(static, "static_model_dir", lambda home=None: static_dir)
    return static_dir


def test_a_cached_vector_of_one_embedder_is_never_served_for_another(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    torch_vectors = embed_texts(TEXTS, home=tmp_path, embedder="minilm", progress=False)
    # Poison the torch cache: if the ONNX embedder read it, it would return these.
    (folder,) = [p for p in (tmp_path / "embeddings").iterdir() if p.is_dir()]
    for shard in folder.glob("*.npz"):
        with np.load(shard) as data:
            keys = data["keys"]
        np.savez(shard, keys=keys, vectors=np.full((len(keys), 384), 0.5, dtype=np.float32))
    assert np.allclose(embed_texts(TEXTS, home=tmp_path, embedder="minilm", progress=False), 0.5)
    onnx_vectors = embed_texts(TEXTS, home=tmp_path, embedder="minilm-onnx", progress=False)
    assert (onnx_vectors * torch_vectors).sum(1).min() >= 0.999


def test_static_keep_end_cuts_a_long_text_on_the_left_and_leaves_a_short_one_alone(shared_static, tmp_path):
    long = " ".join(f"opening{i}" for i in range(3000)) + " " + " ".join(f"closing{i}" for i in range(600))
    start = embed_texts([long, TEXTS[0]], home=tmp_path, embedder="static")
    end = embed_texts([long, TEXTS[0]], home=tmp_path, embedder="static", keep="end")
    assert start.shape == (2, 256)
    assert np.array_equal(start[1], end[1]) and not np.allclose(start[0], end[0])


def test_the_embedder_is_in_the_step_identity_and_the_lineage(cli, home, tmp_path, shared_static):
    seeds = _seeds(tmp_path)
    assert cli("ingest", str(seeds), "--name", "pairs").code == 0
    runs = {}
    for embedder in (None, "static"):
        chosen = ["--set", f"embedder={embedder}"] if embedder else []
        result = cli("filter", "dedup", "--from", "pairs", "--name", f"dd-{embedder or 'default'}",
                     "--set", "near=embedding", *chosen, "--json")
        assert result.code == 0, result.stderr
        runs[embedder] = result.json()
    default, static = runs[None], runs["static"]
    assert static["scores_reused"] is False  # the default run's scores are not this one's
    catalog = Catalog(home)
    lineages = [catalog.resolve(run["ref"]).lineage for run in (default, static)]
    assert [json.dumps(lin, default=str).count('"embedder": "minilm"') for lin in lineages][0] >= 1
    assert json.dumps(lineages[1], default=str).count('"embedder": "static"') >= 1
    assert lineages[0]["step_identity"]["step"] == lineages[1]["step_identity"]["step"] == "dedup"


def _seeds(tmp_path: Path) -> Path:
    topics = ["volcanoes", "tides", "honey bees", "glaciers"]
    rows = [{"prompt": f"Explain {t} to a child.", "chosen": f"{t.title()} work like this: a clear story.",
             "rejected": f"{t} are a thing."} for t in topics]
    rows.append({**rows[1], "chosen": rows[1]["chosen"] + " Thanks!"})  # a near duplicate
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
