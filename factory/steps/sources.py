"""Where a step's data comes from: a catalog ref or a local file, decided in one place.

A parameter such as ``against=eval`` may name a dataset in the catalog or a file or folder
beside the command. When both exist the text is ambiguous, and picking either silently
gives a wrong result with rc 0; so the rules are:

* text that looks like a path (``./eval``, ``../x``, ``/abs``, ``~/x``) is a path;
* text with ``@`` (``eval@3``, ``eval@tag``) is a catalog ref (a file of that name only when
  the catalog has no such version);
* otherwise the one that exists wins, and when both exist it is an error naming both and
  how to choose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import PrefabError


class AmbiguousSourceError(PrefabError):
    """A name that is both a local path and a catalog dataset."""


@dataclass(frozen=True)
class Source:
    """A resolved source: ``path`` for a local file or folder, else ``ref`` (exact, ``name@N``)."""

    text: str
    path: Path | None = None
    ref: str | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None


def _looks_like_path(text: str) -> bool:
    return text.startswith(("./", "../", "/", "~")) or text in (".", "..")


def _resolve(text: str, what: str, exact: Callable[[str], str], hint: str) -> Source:
    if _looks_like_path(text):
        return Source(text, path=Path(text).expanduser())
    if "@" in text:  # the catalog's syntax: a file named like it must be written ./NAME
        try:
            return Source(text, ref=exact(text))
        except PrefabError:
            if Path(text).exists():
                return Source(text, path=Path(text))
            raise
    if not Path(text).exists():
        return Source(text, ref=exact(text))
    try:
        ref = exact(text)
    except PrefabError:
        return Source(text, path=Path(text))
    raise AmbiguousSourceError(
        f"{text!r} is both a local path ({Path(text).resolve()}) and a catalog {what} ({ref}): write "
        f"./{text} for the path or {text}@N for a catalog version ({hint})")


def resolve_source(text: str, catalog: Any) -> Source:
    """``text`` as a local path or an exact catalog dataset ref; refuses a name that is both."""
    return _resolve(text, "dataset", lambda t: catalog.resolve(t).ref, f"see `prefab catalog log {text}`")


def resolve_model(text: str, catalog: Any) -> Source:
    """``text`` as a model folder or an exact registered model ``name@N``; refuses a name that is both."""

    def exact(t: str) -> str:
        entry = catalog.get_model(t)
        return f"{entry['name']}@{entry['version']}"

    return _resolve(text, "model", exact, "see `prefab models`")


def file_pin(path: str | Path) -> str:
    """A file or folder pinned by its resolved path, total size and newest mtime."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrefabError(f"{path}: no such file or folder")
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime_ns for s in stats), default=0)
    return f"{path.resolve()}:{size}:{mtime}"
