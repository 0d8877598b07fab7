"""The noise filter wholly on the static embedder: the reward heads' frozen encoder
(``base=static``) reads prompt+response through MiniLM's tokenizer and cut, pooled by the
model2vec table; the response-alone view (``embedder=static``) too. One distillation
(~15 s on an idle CPU) serves the module. Also: one neighbour search serves every labelling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from factory.catalog import Catalog
from factory.trainer import backbones
from factory.trainer.model import HeadFeaturizer
from filters._noise_signals import Neighbourhood, neighbour_agreement
from filters.noise import NoiseParams
from schemas.errors import PrefabError
from tests.test_filter_noise import FLIPPED, flipped_table

PROMPTS = [[{"role": "user", "content": "How do I reset my router?"}]] * 3
RESPONSES = ["Hold the reset button for ten seconds.", "I will not help you with that.", ""]


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from factory.embed import static

    folder = static.static_model_dir(tmp_path_factory.mktemp("static-home"))
    static.static_model_at(folder)
    return folder


@pytest.fixture
def shared_static(static_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every home and embedding folder reads the module's one distilled model."""
    from factory.embed import static

    monkeypatch.setattr(static, "static_model_dir", lambda home=None: static_dir)
    monkeypatch.setattr(static, "static_model_folder", lambda root: static_dir)
    return static_dir


def test_static_head_features_are_the_static_vectors_of_the_rendered_pair(shared_static, tmp_path):
    from factory.embed.static import embed_static

    featurizer = HeadFeaturizer("static", 256, tmp_path / "embeddings")
    features, truncated = featurizer.featurize(PROMPTS, RESPONSES)
    assert features.shape == (3, 256) and features.dtype == np.float32 and not truncated.any()
    rendered = ["".join(backbones.render(featurizer.encoder.tokenizer, p, r))
                for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    expected = embed_static(rendered, home=tmp_path)
    np.testing.assert_allclose((features * expected).sum(1), 1.0, atol=1e-5)
    assert not (tmp_path / "embeddings").exists() or not any(
        p.suffix == ".npz" for p in (tmp_path / "embeddings").rglob("*"))  # a lookup is never cached
    # Batches of the pooling are independent: one row alone gives the same vector.
    alone = featurizer.featurize(PROMPTS[:1], RESPONSES[1:2])[0]
    np.testing.assert_allclose(alone[0], features[1], atol=1e-6)
    assert featurizer.encoder.embed_ids([np.array([101, 102])]).tolist() == [[0.0] * 256]  # specials only


def test_unknown_and_static_bases_fail_with_the_choices(tmp_path):
    with pytest.raises(PrefabError, match="none of 'minilm', 'static'"):
        HeadFeaturizer("no-such-encoder", 256, tmp_path)
    with pytest.raises(PrefabError, match="head features only"):
        backbones.resolve_base("static")  # full, tokens and top-k modes need a transformer


def test_noise_filter_runs_wholly_on_static_vectors(shared_static, home, monkeypatch):
    import factory
    import factory.embed.encoder as encoder_module

    def no_transformer(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("base=static embedder=static loaded a transformer")

    monkeypatch.setattr(encoder_module, "MeanPoolEncoder", no_transformer)
    catalog = Catalog(home)
    catalog.commit("toy", flipped_table(ties=4), message="toy")
    settings = {"base": "static", "embedder": "static", "synthetic_copies": "2", "folds": "3", "seeds": "1",
                "share": str(len(FLIPPED) / 120), "wide_neighbours": "30"}
    report = factory.filter("noise", "toy", "clean", settings=settings, home=home)
    assert report["rows_in"] == 124 and report["rows_dropped"] == len(FLIPPED)
    suspicion = catalog.read_attachment(catalog.resolve("clean"), "scores").column("noise_suspicion")
    ranked = np.argsort(-np.nan_to_num(suspicion.to_numpy(zero_copy_only=False), nan=-1.0))
    assert len(set(ranked[:len(FLIPPED)].tolist()) & set(FLIPPED)) >= len(FLIPPED) - 2
    lineage = catalog.resolve("clean").lineage
    assert lineage["params"]["base"] == lineage["params"]["embedder"] == "static"
    # Both key the stored scores and the run (decision parameters are the only ones left out).
    scoring = {f.name for f in dataclasses.fields(NoiseParams) if not f.metadata.get("decision")}
    assert {"base", "embedder"} <= scoring


def test_one_neighbour_search_serves_every_labelling():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(300, 12)).astype(np.float32)
    directions[5] = 0.0  # identical responses: no direction, agreement 0
    flips = rng.random(300) < 0.2
    searched = Neighbourhood.search(directions, 25)
    mirrored = np.where(flips[:, None], -directions, directions)
    for k in (5, 25):
        np.testing.assert_allclose(searched.agreement(k, flips), neighbour_agreement(mirrored, k), atol=1e-9)
        np.testing.assert_allclose(searched.agreement(k), neighbour_agreement(directions, k), atol=1e-9)
    assert searched.agreement(5, flips)[5] == 0.0
