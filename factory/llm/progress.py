"""Progress bar for batch runs: done/total, rate, errors, truncated replies, cache hits and
spend so far."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .types import OK, TRUNCATED, Response


class BatchProgress:
    """Thin tqdm wrapper; ``enabled=None`` shows the bar only on an interactive stderr."""

    def __init__(self, total: int, *, desc: str = "llm", enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self.errors = 0
        self.truncated = 0  # a reply cut at max_tokens: an answer, but not a complete one
        self.cached = 0
        self.cost = 0.0
        self._last_postfix = 0.0
        self._bar = (
            tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, smoothing=0.1)
            if enabled
            else None
        )

    def update(self, response: Response) -> None:
        if response.status == TRUNCATED:
            self.truncated += 1
        elif response.status != OK:
            self.errors += 1
        if response.cached:
            self.cached += 1
        else:
            self.cost += response.cost or 0.0
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        # set_postfix formats a string; do it at most a few times per second.
        if now - self._last_postfix > 0.25:
            self._last_postfix = now
            self._bar.set_postfix(**self._postfix(), refresh=False)

    def _postfix(self) -> dict[str, object]:
        return {"err": self.errors, "truncated": self.truncated, "cached": self.cached,
                "spent": f"${self.cost:.4f}"}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**self._postfix())
            self._bar.close()
