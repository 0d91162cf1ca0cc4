"""On-disk cache of instructions and embeddings, keyed by writer, model, prompt and samples."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union


def default_cache_dir() -> Path:
    """`$PEFT_GLIDER_CACHE`, else `~/.cache/peft_glider`."""
    return Path(os.environ.get("PEFT_GLIDER_CACHE", Path.home() / ".cache" / "peft_glider"))


def cache_key(*parts: Any) -> str:
    """A stable key for JSON-serializable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JsonCache:
    """One small JSON file per key under `folder/kind/`; corrupt files are ignored with a warning and rewritten.

    `folder=None` disables caching.
    """

    def __init__(self, folder: Optional[Union[str, Path]]) -> None:
        self.folder = Path(folder) if folder is not None else None

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key[:2]}" / f"{key}.json"

    def get(self, kind: str, key: str) -> Optional[Any]:
        if self.folder is None:
            return None
        path = self._path(kind, key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        except (ValueError, KeyError, TypeError, OSError) as error:
            warnings.warn(f"Ignoring corrupt cache file {path} ({error}); it will be rewritten.", stacklevel=3)
            return None

    def put(self, kind: str, key: str, value: Any) -> None:
        if self.folder is None:
            return
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial{os.getpid()}")
        partial.write_text(json.dumps({"value": value}, ensure_ascii=False), encoding="utf-8")
        os.replace(partial, path)
