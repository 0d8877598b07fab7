"""The bundled MiniLM through ONNX Runtime on CPU: the same vectors as the torch path
(cosine >= 0.999, measured ~1.0000), from a graph that runs without PyTorch's per-op overhead.

The graph is exported offline from the packaged weights, once per home: torch's exporter
traces the encoder *with* its mean pooling and L2 normalisation, so the ONNX session returns
the finished embedding. It is saved as ``<home>/embeddings/onnx-<digest>/model.onnx``, where
the digest covers the source model's files (their bytes), the export recipe (opset, wrapper
version) and the torch version that exported it, so a changed source or exporter gets a new
folder and never a stale graph. ``catalog gc`` treats the folder like any embedding cache
(a redoable unit); each load marks it used.

Tokenisation, truncation and the cache keys of texts are those of
:class:`factory.embed.encoder.MeanPoolEncoder`; only :meth:`OnnxMeanPoolEncoder.embed_ids`
differs, and its :attr:`~OnnxMeanPoolEncoder.cache_variant` names the runtime, so ONNX and
torch vectors never share a cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from factory.embed.encoder import MINILM_MAX_TOKENS, load_tokenizer, minilm_path
from factory.home import resolve_home
from schemas.errors import PrefabError

OPSET = 17
# Bump when the exported wrapper (pooling, normalisation, inputs) changes: a new folder.
RECIPE = "meanpool-l2-v1"
LAST_USED = "last-used"  # same marker name as the embedding cache (factory.embed.cache)


class OnnxRuntimeMissing(PrefabError):
    """The ONNX embedder was chosen but onnxruntime is not installed."""


def onnx_model_dir(home: str | Path | None = None, source: str | None = None) -> Path:
    """``<home>/embeddings/onnx-<digest of source files, recipe and exporter version>``."""
    import torch

    from factory.embed.static import _folder_digest, _folder_stamp

    source = source or minilm_path()
    parts = [_folder_digest(source, *_folder_stamp(source)), RECIPE, f"opset={OPSET}",
             f"torch={torch.__version__}"]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return resolve_home(home) / "embeddings" / f"onnx-{digest}"


def export_onnx(source: str, target: Path) -> None:
    """Trace ``source``'s encoder with mean pooling and L2 normalisation into ``target``.

    Written into a private temporary folder and renamed into place, so a crash leaves no
    half-written graph and two processes exporting at once both end with a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        scratch.mkdir()
        _trace(source, scratch / "model.onnx")
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "model.onnx").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trace(source: str, path: Path) -> None:
    import warnings

    import torch
    from transformers import AutoModel

    from factory.embed.encoder import quiet_hf

    class Pooled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

    with quiet_hf():
        model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    example = (torch.ones((2, 8), dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python code
        # The TorchScript exporter needs only torch (the dynamo one also needs onnxscript).
        torch.onnx.export(
            Pooled(model), example, str(path), input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], opset_version=OPSET, dynamo=False,
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}})


class OnnxMeanPoolEncoder:
    """MiniLM's mean-pooled, L2-normalised embeddings from an ONNX Runtime CPU session;
    tokenisation as :class:`factory.embed.encoder.MeanPoolEncoder`."""

    def __init__(self, source: str, model_dir: Path):
        ort = _require_runtime()
        import torch
        from transformers import AutoConfig

        self.path = source
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(source)
        config = AutoConfig.from_pretrained(source)
        self.dim = int(config.hidden_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        options = ort.SessionOptions()
        # As many threads as torch would use, so both runtimes get the same cores.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.runtime = f"onnxruntime={ort.__version__}"

    @property
    def cache_variant(self) -> str:
        # Not torch's "meanpool-l2|fp32": the vectors agree to ~1e-6, not bit for bit, and a
        # cache must give what its embedder computes.
        return f"meanpool-l2|fp32|onnx|{self.model_dir.name}|{self.runtime}"

    def embed_ids(self, sequences: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Embeddings of already tokenised sequences (special tokens included), (n, dim)."""
        out = np.zeros((len(sequences), self.dim), dtype=np.float32)
        order = np.argsort([len(s) for s in sequences], kind="stable")  # less padding
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = _pad([sequences[i] for i in idx], pad_id)
            out[idx] = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        return out

    # Tokenisation is the torch encoder's, unchanged (same ids, same cache keys of texts).
    def tokenize_plain(self, texts: Sequence[str],
                       max_tokens: int = MINILM_MAX_TOKENS) -> list[np.ndarray]:
        from factory.embed.encoder import MeanPoolEncoder

        return MeanPoolEncoder.tokenize_plain(self, texts, max_tokens)  # type: ignore[arg-type]

    def tokenize_tail(self, texts: Sequence[str],
                      max_tokens: int = MINILM_MAX_TOKENS) -> tuple[list[np.ndarray], list[bool]]:
        from factory.embed.encoder import MeanPoolEncoder

        return MeanPoolEncoder.tokenize_tail(self, texts, max_tokens)  # type: ignore[arg-type]

    def _special_tokens_around(self) -> tuple[int, int]:
        from factory.embed.encoder import MeanPoolEncoder

        return MeanPoolEncoder._special_tokens_around(self)  # type: ignore[arg-type]


def _pad(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


_ENCODERS: dict[Path, OnnxMeanPoolEncoder] = {}
_LOCK = threading.Lock()


def get_onnx_encoder(home: str | Path | None = None) -> OnnxMeanPoolEncoder:
    """The process-wide ONNX encoder of the bundled MiniLM, exported on first use in ``home``."""
    source = str(Path(minilm_path()).resolve())
    folder = onnx_model_dir(home, source)
    with _LOCK:
        encoder = _ENCODERS.get(folder)
        if encoder is None:
            if not (folder / "model.onnx").is_file():
                _require_runtime(export=True)  # before a 3 s export whose graph could not be run
                export_onnx(source, folder)
            encoder = _ENCODERS[folder] = OnnxMeanPoolEncoder(source, folder)
    (folder / LAST_USED).touch()
    return encoder


def _require_runtime(export: bool = False) -> Any:
    """onnxruntime runs the graph; torch's exporter also needs ``onnx`` to write it."""
    try:
        import onnxruntime

        if export:
            import onnx  # noqa: F401
    except ImportError as exc:
        raise OnnxRuntimeMissing(
            f"embedder 'minilm-onnx' needs onnxruntime and onnx (missing: {exc.name}): "
            "pip install onnxruntime onnx (or 'prefab[onnx]'), or choose embedder=minilm") from exc
    return onnxruntime
