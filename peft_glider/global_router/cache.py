"""Caches of the global router: on disk for what is worth keeping (expert instructions and embeddings for ever,
queries' LLM-written instructions up to a cap), in memory for recent queries; keyed by writer, model, prompt and
samples."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .._warnings import warn_user


def default_cache_dir() -> Path:
    """`$PEFT_GLIDER_CACHE`, else `~/.cache/peft_glider`."""
    return Path(os.environ.get("PEFT_GLIDER_CACHE", Path.home() / ".cache" / "peft_glider"))


def cache_key(*parts: Any) -> str:
    """A stable key for JSON-serializable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def source_identity(name_or_path: str) -> str:
    """What identifies a model for caching: a Hub id as given; a local folder by its real path and a fingerprint of
    its files (names, sizes, modification times), so two folders of the same base name, or a folder whose model
    was replaced, never share cache entries."""
    if not os.path.isdir(name_or_path):
        return name_or_path
    root = os.path.realpath(name_or_path)
    digest = hashlib.sha256()
    for folder, subfolders, files in sorted(os.walk(root)):
        subfolders.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{root}#{digest.hexdigest()[:16]}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid cached value")


class JsonCache:
    """One small JSON file per key under `folder/kind/`; `folder=None` disables caching.

    A cache is a convenience, never a reason to fail: a file that is corrupt, holds NaN or a value of the wrong
    shape is ignored with a warning naming it (and rewritten); a folder that cannot be written is warned about once
    per process and the values are used uncached. Writes are atomic (a unique temporary file, then a rename), so concurrent
    writers of one key in threads or processes never see a partial file.
    """

    #: Folders found unwritable in this process: warned about once, whichever cache of them found it.
    _unwritable: set = set()

    def __init__(self, folder: Optional[Union[str, Path]]) -> None:
        self.folder = Path(folder) if folder is not None else None

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key[:2]}" / f"{key}.json"

    def get(self, kind: str, key: str, valid: Optional[Callable[[Any], bool]] = None) -> Optional[Any]:
        """The cached value, or None when absent or unusable (`valid(value)` false: warned, naming the file)."""
        if self.folder is None:
            return None
        path = self._path(kind, key)
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # never written, or evicted by another process meanwhile
            return None
        except OSError as error:
            warn_user(f"Ignoring unreadable cache file {path} ({error}); it will be rewritten.")
            return None
        try:
            value = json.loads(text, parse_constant=_reject_constant)["value"]
        except (ValueError, KeyError, TypeError) as error:
            warn_user(f"Ignoring corrupt cache file {path} ({error}); it will be rewritten.")
            return None
        if valid is not None and not valid(value):
            warn_user(
                f"Ignoring cache file {path}: it holds a {type(value).__name__} that is not a valid {kind} entry; "
                "it will be rewritten."
            )
            return None
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        """Store a value atomically; a folder that cannot be written is warned about once, not raised."""
        if self.folder is None:
            return
        path = self._path(kind, key)
        partial = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial")
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"value": value}, file, ensure_ascii=False, allow_nan=False)
            os.replace(partial, path)
        except OSError as error:
            if partial is not None and os.path.exists(partial):
                os.unlink(partial)
            if self.folder not in JsonCache._unwritable:
                JsonCache._unwritable.add(self.folder)
                warn_user(
                    f"Cannot write the global router's cache in {self.folder} ({error}); going on without caching. "
                    "Set PEFT_GLIDER_CACHE or cache_dir to a writable folder."
                )


class BoundedJsonCache(JsonCache):
    """A `JsonCache` holding at most `max_entries` files per kind, least recently used evicted.

    One flat folder per kind (`folder/kind/key.json`); a read marks its file used (its modification time), a write
    evicts the oldest files beyond the cap. Several processes may share the folder: writes stay atomic, an entry
    another process evicted is a miss, and each write's eviction brings the folder back under the cap.
    """

    def __init__(self, folder: Optional[Union[str, Path]], max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}.")
        super().__init__(folder)
        self.max_entries = max_entries

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.json"

    def get(self, kind: str, key: str, valid: Optional[Callable[[Any], bool]] = None) -> Optional[Any]:
        value = super().get(kind, key, valid)
        if value is not None:
            try:
                os.utime(self._path(kind, key))
            except OSError:  # evicted meanwhile: the value read is still whole
                pass
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        super().put(kind, key, value)
        if self.folder is not None:
            self._evict(self.folder / kind)

    def _evict(self, folder: Path) -> None:
        entries = []
        try:
            with os.scandir(folder) as scan:
                for entry in scan:
                    if entry.name.endswith(".json"):
                        try:
                            entries.append((entry.stat().st_mtime_ns, entry.path))
                        except FileNotFoundError:
                            continue
        except OSError:
            return
        entries.sort()
        for _, path in entries[: max(0, len(entries) - self.max_entries)]:
            try:
                os.unlink(path)
            except FileNotFoundError:  # another process evicted it first
                pass
