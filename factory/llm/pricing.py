"""Token prices and cost estimates.

Prices are USD per 1M tokens (input, output). The defaults are list prices at the time of
writing and will drift: pass ``prices={...}`` to a backend (or ``price_in``/``price_out`` in a
backend spec) to override. A model with no known price costs ``None`` -- accounting then
stays in tokens, and a ``max_cost`` budget refuses to run rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .types import LLMError, Request

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}

# Rough characters-per-token ratio for English text; an estimate only needs to be
# conservative enough to refuse runs that are clearly over budget.
CHARS_PER_TOKEN = 4
PER_MESSAGE_OVERHEAD = 4
DEFAULT_COMPLETION_ESTIMATE = 512


@dataclass(frozen=True)
class Price:
    input_per_m: float
    output_per_m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1e6


class PriceTable:
    """Model -> price lookup; exact name first, then the longest matching prefix
    (so ``gpt-4o-mini-2024-07-18`` gets the ``gpt-4o-mini`` price)."""

    def __init__(self, overrides: Mapping[str, tuple[float, float] | Price] | None = None):
        table = {k: Price(*v) for k, v in DEFAULT_PRICES.items()}
        for k, v in (overrides or {}).items():
            table[k] = v if isinstance(v, Price) else Price(*v)
        self._table = table

    def get(self, model: str) -> Price | None:
        if model in self._table:
            return self._table[model]
        best = max((k for k in self._table if model.startswith(k)), key=len, default=None)
        return self._table[best] if best else None


def estimate_prompt_tokens(request: Request) -> int:
    chars = 0
    for m in request.messages:
        content = m.get("content", "")
        chars += len(content) if isinstance(content, str) else len(str(content))
    if request.json_schema:
        chars += len(str(request.json_schema))
    return chars // CHARS_PER_TOKEN + PER_MESSAGE_OVERHEAD * len(request.messages) + 1


def estimate_completion_tokens(request: Request) -> int:
    per_choice = request.params.max_tokens or DEFAULT_COMPLETION_ESTIMATE
    return per_choice * request.n


def estimate_tokens(request: Request) -> tuple[int, int]:
    return estimate_prompt_tokens(request), estimate_completion_tokens(request)


def estimate_cost(requests: Iterable[Request], price: Price | None, model: str) -> float:
    """Upper-ish estimate of a batch's cost: prompt by characters, completion by max_tokens."""
    if price is None:
        raise LLMError(
            f"no price known for model {model!r}: pass prices={{{model!r}: (usd_per_1M_in, "
            "usd_per_1M_out)}} or add price_in=...&price_out=... to the backend spec"
        )
    total = 0.0
    for r in requests:
        p, c = estimate_tokens(r)
        total += price.cost(p, c)
    return total
