"""The gates of the experts that are not resident, under a resident-experts budget (`max_resident_experts`).

A layer of a budgeted adapter holds the gates of its resident experts only (`GliderLayer`: one row per resident
slot); the others' gates live here, one file per module in a temporary folder, written and read a row at a time
with plain file I/O. Nothing here is mapped into the process: the kernel's page cache holds what was read lately,
the process's resident memory does not grow with the library. A row never written reads as zeros (an untrained
Phatgoose gate).

Written by hand: the rows of one tensor need to move between memory and disk one at a time, in both directions,
which neither safetensors (whole files, read-only maps) nor torch's file-backed storages (mapped: every row read
stays in the process's resident memory) do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from typing import Optional

import torch

_DTYPE = torch.float32
_ITEM = 4  # bytes per float32


class _ModuleRows:
    """One module's rows: a file of fixed-size float32 rows, and which expert holds which row."""

    def __init__(self, path: str, in_features: int) -> None:
        self.file = open(path, "w+b")  # noqa: SIM115 (closed by GateStore.close)
        self.in_features = in_features
        self.row_of: dict[str, int] = {}  # expert name -> row in the file
        self.free: list[int] = []  # rows of removed experts, reused first

    def write(self, name: str, vector: torch.Tensor) -> None:
        row = self.row_of.get(name)
        if row is None:
            row = self.row_of[name] = self.free.pop() if self.free else len(self.row_of) + len(self.free)
        data = vector.detach().to("cpu", _DTYPE).contiguous().numpy().tobytes()
        self.file.seek(row * self.in_features * _ITEM)
        self.file.write(data)

    def read(self, name: str) -> Optional[torch.Tensor]:
        row = self.row_of.get(name)
        if row is None:
            return None
        size = self.in_features * _ITEM
        self.file.seek(row * size)
        return torch.frombuffer(bytearray(self.file.read(size)), dtype=_DTYPE)

    def drop(self, name: str) -> None:
        row = self.row_of.pop(name, None)
        if row is not None:
            self.free.append(row)


class GateStore:
    """Each module's gate vectors of the experts not resident in its layer, by expert name.

    Thread-safe (one lock); copied and pickled with its rows (a copy gets its own folder)."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="peft-glider-gates-")
        self._modules: dict[str, _ModuleRows] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _remove, self._modules, self._folder)

    def write(self, module_name: str, expert: str, vector: torch.Tensor) -> None:
        """Keep `expert`'s gate (in_features,) at `module_name`."""
        with self._lock:
            rows = self._modules.get(module_name)
            if rows is None:
                path = os.path.join(self._folder, f"{len(self._modules)}.f32")
                rows = self._modules[module_name] = _ModuleRows(path, vector.numel())
            if vector.numel() != rows.in_features:
                raise ValueError(
                    f"A gate at {module_name!r} has {rows.in_features} values; got {vector.numel()} for {expert!r}."
                )
            rows.write(expert, vector)

    def read(self, module_name: str, expert: str, in_features: int) -> torch.Tensor:
        """`expert`'s gate at `module_name`, (in_features,) float32: zeros when none was written."""
        with self._lock:
            rows = self._modules.get(module_name)
            vector = None if rows is None else rows.read(expert)
        return torch.zeros(in_features, dtype=_DTYPE) if vector is None else vector

    def drop(self, expert: str) -> None:
        """Forget `expert`'s gates at every module (it left the library)."""
        with self._lock:
            for rows in self._modules.values():
                rows.drop(expert)

    def __getstate__(self) -> dict:
        with self._lock:
            rows = {
                module: {name: rows.read(name) for name in rows.row_of} for module, rows in self._modules.items()
            }
        return {"rows": rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        for module_name, per_expert in state["rows"].items():
            for name, vector in per_expert.items():
                self.write(module_name, name, vector)


def _remove(modules: dict[str, _ModuleRows], folder: str) -> None:
    for rows in modules.values():
        rows.file.close()
    shutil.rmtree(folder, ignore_errors=True)
