"""Plain-text views of a chat prompt (a list of ``{role, content}`` messages).

Generators, filters, the audit and the trainer all read prompts as text; they share these
so that "the instruction" and "the prompt as text" mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Messages = Sequence[Mapping[str, Any]]


def last_user_at(prompt: Messages | None) -> int | None:
    """Index of the last user message that has text (None when there is none)."""
    messages = prompt or []
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user" and (messages[index].get("content") or "").strip():
            return index
    return None


def last_user_text(prompt: Messages | None) -> str:
    """What a prompt asks: its last user message with text; with none, all of its text."""
    at = last_user_at(prompt)
    if at is not None:
        return prompt[at]["content"]  # type: ignore[index]
    return "\n".join(m.get("content") or "" for m in prompt or [])


def prompt_text(prompt: Messages | str | None, *, roles: bool = True, separator: str = "\n") -> str:
    """A prompt as one text: a lone message as its content; several as ``[role] content``
    blocks joined by ``separator`` (just the contents with ``roles=False``). A string is
    already text and comes back as it is."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt or [])
    if len(messages) == 1 or not roles:
        return separator.join(m.get("content") or "" for m in messages)
    return separator.join(f"[{m.get('role')}] {m.get('content') or ''}" for m in messages)
