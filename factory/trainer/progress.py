"""Progress of the trainer's long phases on stderr: bars for loops, lines for the rest.

Reading a large version, tokenising, looking embeddings up in the cache, loading a
backbone and saving a fine-tuned one can each take minutes before the first training
step; a phase line says what runs and, when it ends, how long it took with its count and
rate. Loops (tokenising, embedding, training, scoring) get a tqdm bar. Everything goes
to stderr, shown when ``progress`` is True, or None and stderr is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def shown(progress: bool | None) -> bool:
    """Whether to show progress: as asked, or (None) when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def note(text: str, progress: bool | None) -> None:
    """One line about the run (e.g. that it resumes), shown like the bars."""
    if shown(progress):
        print(f"prefab: {text}", file=sys.stderr, flush=True)


@contextmanager
def phase(what: str, progress: bool | None, *, count: int | None = None,
          unit: str = "pair") -> Iterator[dict[str, Any]]:
    """A line when ``what`` starts and one when it ends: seconds, count and rate.

    The block may add ``detail`` (text for the closing line) to the dict it is given."""
    info: dict[str, Any] = {}
    if not shown(progress):
        yield info
        return
    counted = f" ({count:,} {unit}s)" if count is not None else ""
    print(f"prefab: {what}{counted} …", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield info
    seconds = time.perf_counter() - started
    parts = [f"done in {seconds:.1f}s"]
    if count and seconds > 0:
        parts.append(f"{count / seconds:,.0f} {unit}s/s")
    if info.get("detail"):
        parts.append(str(info["detail"]))
    print(f"prefab: {what}: {', '.join(parts)}", file=sys.stderr, flush=True)


def bar(total: int, desc: str, progress: bool | None, *, unit: str = "pair", initial: int = 0) -> Any:
    """A tqdm bar on stderr (disabled unless :func:`shown`); close it when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not shown(progress),
                dynamic_ncols=True, file=sys.stderr)


__all__ = ["bar", "note", "phase", "shown"]
