"""MiniLM through ONNX Runtime: exported once per home from the bundled weights, the same
vectors as the torch path (cosine >= 0.999), and a cache folder of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")

from factory.embed import embed_texts  # noqa: E402
from factory.embed.encoder import get_encoder  # noqa: E402

TEXTS = [
    "How do I reset my router to factory settings?",
    "a",
    "The stock market fell sharply after the earnings report, and analysts expect more losses.",
    # Longer than the encoder's 256 tokens: cut on the right (start) or the left (end).
    " ".join(f"word{i} of a long conversation about tides and the moon" for i in range(80)),
]


@pytest.fixture(scope="module")
def onnx_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("onnx-home")
    embed_texts(TEXTS[:1], home=home, embedder="minilm-onnx", progress=False)  # exports once
    return home


@pytest.mark.parametrize("keep", ["start", "end"])
def test_onnx_embeddings_match_torch(onnx_home, tmp_path, keep):
    onnx = embed_texts(TEXTS, home=onnx_home, embedder="minilm-onnx", keep=keep, progress=False)
    torch = embed_texts(TEXTS, home=tmp_path, embedder="minilm", keep=keep, progress=False)
    assert onnx.shape == torch.shape == (len(TEXTS), 384) and onnx.dtype == np.float32
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert (onnx * torch).sum(1).min() >= 0.999


def test_onnx_graph_is_exported_into_the_home_and_its_cache_is_apart(onnx_home):
    from factory.embed import encoder_cache
    from factory.embed.onnx import get_onnx_encoder

    folders = sorted(p.name for p in (onnx_home / "embeddings").iterdir())
    graphs = [name for name in folders if name.startswith("onnx-")]
    assert len(graphs) == 1 and (onnx_home / "embeddings" / graphs[0] / "model.onnx").is_file()
    onnx_cache = encoder_cache(get_onnx_encoder(onnx_home), onnx_home / "embeddings").folder
    torch_cache = encoder_cache(get_encoder(), onnx_home / "embeddings").folder
    assert onnx_cache != torch_cache and onnx_cache.name in folders


def test_missing_onnxruntime_is_a_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    import sys

    from factory.embed import onnx
    from schemas.errors import PrefabError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    monkeypatch.setattr(onnx, "_ENCODERS", {})
    with pytest.raises(PrefabError, match="pip install onnxruntime onnx") as info:
        embed_texts(["x"], home=tmp_path, embedder="minilm-onnx", progress=False)
    assert "\n" not in str(info.value)
    monkeypatch.delitem(sys.modules, "onnxruntime")
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)  # the exporter's own need
    with pytest.raises(PrefabError, match=r"missing: onnx\)"):
        embed_texts(["x"], home=tmp_path, embedder="minilm-onnx", progress=False)
    assert not list((tmp_path / "embeddings").glob("onnx-*"))  # no export it could not run
