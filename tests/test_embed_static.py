"""The static embedder distilled from the bundled MiniLM: cached per home, normalised,
deterministic, and close for near duplicates. One distillation (~15 s on CPU) serves the module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factory.embed import static

TEXTS = [
    "How do I reset my router to factory settings?",
    "How do I reset my router to its factory settings?",
    "The stock market fell sharply after the earnings report.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "",
]


@pytest.fixture(scope="module")
def static_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("static-home")
    static.embed_static(TEXTS[:1], home=home)  # distils once for the whole module
    return home


def test_static_embeddings_are_normalised_float32_and_deterministic(static_home):
    vectors = static.embed_static(TEXTS, home=static_home)
    assert vectors.shape == (len(TEXTS), static.PCA_DIMS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:-1], axis=1), 1.0, atol=1e-5)
    assert not vectors[-1].any()  # the empty text has no token, hence no direction
    np.testing.assert_array_equal(static.embed_static(TEXTS, home=static_home), vectors)
    # A text's vector does not depend on its batch.
    np.testing.assert_array_equal(static.embed_static(TEXTS[2:3], home=static_home)[0], vectors[2])
    assert static.embed_static([], home=static_home).shape == (0, static.PCA_DIMS)


def test_static_model_is_distilled_once_per_home_then_loaded(static_home, monkeypatch):
    folder = static.static_model_dir(static_home)
    assert folder.parent == static_home / "embeddings" and folder.name.startswith("static-")
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    before = static.embed_static(TEXTS[:3], home=static_home)

    def no_distill():
        raise AssertionError("distilled again although this home has the static model")

    monkeypatch.setattr(static, "_distill", no_distill)
    monkeypatch.setattr(static, "_models", {})  # as a new process: load from disk
    after = static.embed_static(TEXTS[:3], home=static_home)
    np.testing.assert_array_equal(after, before)
    assert weights.stat().st_mtime_ns == written
    assert not list(folder.parent.glob(".*.tmp"))  # no scratch folder left behind


def test_static_small_edit_is_nearer_than_an_unrelated_text(static_home):
    question, edited, market, plants, _ = static.embed_static(TEXTS, home=static_home)
    near = float(question @ edited)
    assert near > 0.9
    assert near > float(question @ market) + 0.3
    assert near > float(market @ plants) + 0.3


def test_static_folder_changes_with_the_source_model(tmp_path, monkeypatch):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights-v1")
    monkeypatch.setattr("factory.embed.encoder.minilm_path", lambda: str(source))
    first = static.static_model_dir(tmp_path)
    (source / "model.safetensors").write_bytes(b"new weights")
    second = static.static_model_dir(tmp_path)
    assert second != first
    monkeypatch.setattr(static, "PCA_DIMS", 128)
    assert static.static_model_dir(tmp_path) not in (first, second)
