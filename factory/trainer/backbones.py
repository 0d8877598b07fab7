"""Backbones: the embedded MiniLM encoder and any Hugging Face sequence-classification model.

Both modes see the same text: a chat prompt rendered with the tokenizer's chat template
when it has one, else the plain format below, followed by the response. Truncation keeps
what decides a pair -- the last question and the end of the answer (see
:func:`budget_truncate`): a reward model that never sees the response (right truncation
of a long dialogue) scores chosen and rejected alike, and one that sees only the opening
of two long answers never sees the final answer where they differ.

Plain format (tokenizers without a chat template, e.g. BERT-style encoders)::

    System: …\\n\\nUser: …\\n\\nAssistant: …\\n\\nUser: …\\n\\nAssistant: <response>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The encoder helpers live in the shared embedding service; re-exported for callers here.
from factory.embed.encoder import (  # noqa: F401
    MeanPoolEncoder,
    bf16_ok,
    load_tokenizer,
    minilm_path,
    pad_batch,
    pick_device,
    quiet_hf,
)
from schemas.errors import PrefabError
from schemas.prompts import last_user_at

MINILM = "minilm"
# model2vec vectors distilled from MiniLM (factory.embed.static): a frozen encoder for head
# features only, hundreds of times faster on CPU; nothing to fine-tune or read layers from.
STATIC = "static"
_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
# A cut response keeps its opening (a quarter of its share, at most this many tokens)
# and its end (the rest).
RESPONSE_HEAD_TOKENS = 64
# Pairs per batched tokenizer call (and per step of the tokenising bar).
ENCODE_CHUNK = 2048


def resolve_base(base: str | None) -> str:
    """``minilm`` (or nothing) -> the bundled folder; anything else is a local HF model path.

    ``static`` is no transformer: :class:`factory.trainer.model.HeadFeaturizer` takes it
    before asking here; anywhere else it is an error that says so."""
    if base is None or base == MINILM:
        return minilm_path()
    if base == STATIC:
        raise PrefabError("base 'static' (model2vec vectors) has no transformer layers: it serves head "
                          "features only (train --mode head, filter noise); choose base 'minilm' or a "
                          "model folder for this mode")
    if not Path(base).exists():
        raise PrefabError(f"base model {base!r} is none of 'minilm', 'static' (head features) or an "
                          "existing model folder")
    return str(base)


def check_max_length(max_length: int, positions: int, base: str) -> None:
    if positions and max_length > positions:
        raise PrefabError(f"--max-length {max_length} exceeds what {base} can read ({positions} tokens)")


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


def budget_truncate(
    prompt_ids: Sequence[int], response_ids: Sequence[int], budget: int, prompt_floor: int | None = None
) -> list[int]:
    """Fit a prompt and a response into ``budget`` tokens, keeping what decides a pair.

    The policy (also in the README):

    1. Nothing is cut while both fit.
    2. The prompt is cut from the left: the oldest turns go first, and the end of the
       prompt -- the last user turn and the assistant cue -- stays. The prompt keeps at
       least ``prompt_floor`` tokens (the length of its last user turn, so that the
       question survives) but never more than half the budget by that right alone.
    3. The response gets the rest. If it must be cut, it keeps its opening (a quarter of
       its share, at most 64 tokens) and its end, dropping the middle: a final answer,
       a verdict or a closing refusal is at the end, and the opening says how it starts.
    """
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if len(prompt_ids) + len(response_ids) <= budget:
        return prompt_ids + response_ids
    floor = budget // 2 if prompt_floor is None else min(prompt_floor, budget // 2)
    floor = min(floor, len(prompt_ids))
    keep_response = min(len(response_ids), budget - floor)
    keep_prompt = min(len(prompt_ids), budget - keep_response)
    prompt = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
    if keep_response < len(response_ids):
        head = min(RESPONSE_HEAD_TOKENS, keep_response // 4)
        tail = keep_response - head
        response = response_ids[:head] + (response_ids[-tail:] if tail else [])
    else:
        response = response_ids
    return prompt + response


@dataclass
class Encoded:
    """Token ids of each (prompt, response), and whether it had to be truncated."""

    ids: list[np.ndarray]
    truncated: np.ndarray  # bool, one per sequence


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_plain_prompt(messages)


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    responses: Sequence[str],
    max_length: int,
    *,
    progress: bool | None = False,
    desc: str = "tokenize",
) -> Encoded:
    """Token ids of each (prompt, response): rendered, truncated by :func:`budget_truncate`
    within ``max_length`` (special tokens included) and wrapped in the special tokens.

    Encoded in chunks of :data:`ENCODE_CHUNK` pairs (each pair is encoded on its own, so
    the result does not depend on the chunking), with a bar when ``progress`` shows one."""
    from factory.trainer.progress import bar

    if len(responses) != len(prompts):
        raise ValueError("prompts and responses differ in length")
    ids: list[np.ndarray] = []
    truncated: list[np.ndarray] = []
    shown = bar(len(responses), desc, progress)
    try:
        for start in range(0, len(responses), ENCODE_CHUNK):
            part = encode_chunk(tokenizer, prompts[start : start + ENCODE_CHUNK],
                                 responses[start : start + ENCODE_CHUNK], max_length)
            ids += part.ids
            truncated.append(part.truncated)
            shown.update(len(part.ids))
    finally:
        shown.close()
    return Encoded(ids, np.concatenate(truncated) if truncated else np.zeros(0, dtype=bool))


def encode_chunk(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    responses: Sequence[str],
    max_length: int,
) -> Encoded:
    """:func:`encode_pairs` of one chunk (also what the token cache writes chunk by chunk)."""
    rendered = [render(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    specials = special_tokens(tokenizer)
    budget = max(2, max_length - len(specials.prefix) - len(specials.suffix))
    # One batched call per side: the fast tokenizer parallelises in Rust.
    unique_prompts = list(dict.fromkeys(p for p, _ in rendered))
    with quiet_hf():  # untruncated on purpose: no "longer than the model maximum" warning
        prompt_tok = _input_ids(tokenizer, unique_prompts)
        response_tok = _input_ids(tokenizer, [r for _, r in rendered])
    prompt_of = dict(zip(unique_prompts, prompt_tok, strict=True))
    too_long = [len(prompt_of[p]) + len(r) > budget
                for (p, _), r in zip(rendered, response_tok, strict=True)]
    # The question's length, for the prompts that will be cut: one more batched call.
    messages_of = {p: m for (p, _), m, cut in zip(rendered, prompts, too_long, strict=True) if cut}
    floor_of: dict[str, int] = {}
    if messages_of:
        tails = [render_prompt(tokenizer, list(m[last_user_at(m) or 0:])) for m in messages_of.values()]
        with quiet_hf():
            tail_tok = _input_ids(tokenizer, tails)
        floor_of = {p: len(t) for p, t in zip(messages_of, tail_tok, strict=True)}
    out = []
    for (prompt_text, _), response_ids in zip(rendered, response_tok, strict=True):
        body = budget_truncate(prompt_of[prompt_text], response_ids, budget, floor_of.get(prompt_text))
        out.append(np.asarray([*specials.prefix, *body, *specials.suffix], dtype=np.int64))
    return Encoded(out, np.asarray(too_long, dtype=bool))


def _input_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # Only the ids: an attention mask and token types would triple a chunk's Python ints.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


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
