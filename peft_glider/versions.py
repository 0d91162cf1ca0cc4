"""The versions of an adapter's library that calls route with, and where the current one is published.

An edit (add or remove an expert, new gates or instruction embeddings, experts made resident under a budget) is
copy-on-write: the layers install new tensors beside the ones the current version holds, then a whole new
`LibraryVersion` is published in one assignment. A call takes the version current when it begins and keeps it to
its end, in every layer; an old version is freed when the last call holding it ends. Edits are serialized by one
lock (`Versions.editing`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

if TYPE_CHECKING:
    from .snapshot import LayerSnapshot


@dataclass(frozen=True, eq=False)
class LibraryVersion:
    """One whole state of an adapter's library, as calls route with it; never changed once published (but for the
    link to its successor).

    Holds no reference back to the library or the model. Each version keeps its successors alive, so a version
    is freed once no call holds it or any version before it: the modules an edit released leave the model only
    when no call can route through them any more.
    """

    number: int  # 0 for the first version of an adapter, one more for each edit
    expert_names: tuple[str, ...]  # routing order
    layers: Mapping[str, "LayerSnapshot"]  # module name -> its experts, for the modules the adapter adapts
    embeddings: Optional[torch.Tensor] = None  # (E, e) instruction embeddings, when set
    successor: list["LibraryVersion"] = field(default_factory=list, repr=False)  # the next version, once published

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)


class Versions:
    """Where an adapter's versions are published: `current` is what a call that begins now routes with (the
    adapter's layers read it for a call outside any routing context)."""

    def __init__(self) -> None:
        self.current: Optional[LibraryVersion] = None
        self._lock = threading.RLock()  # one edit at a time (re-entrant: an edit may publish more than once)

    @property
    def editing(self) -> threading.RLock:
        """Held by every edit: hold it to make several changes one after another without another edit between."""
        return self._lock

    def publish(self, **changes: Any) -> LibraryVersion:
        """Make a new version current: the current one with `changes` (fields of `LibraryVersion`), or the first
        one. One assignment: a call that begins after it sees all of the edit, one that began before sees none."""
        with self._lock:
            if self.current is None:
                version = LibraryVersion(number=0, **changes)
            else:
                version = replace(self.current, number=self.current.number + 1, successor=[], **changes)
                self.current.successor.append(version)
            self.current = version
            return version

    def __getstate__(self) -> dict:  # models are copied and pickled: a lock is not, a fresh one is made
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
