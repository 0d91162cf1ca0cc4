"""Residency: which experts' factors an adapter's layers hold (hot) and where the others' gates are kept (cold),
under a resident-experts budget (`GliderConfig.max_resident_experts`); every line about slots, eviction and the
cold store is here.

With a budget of N, each layer holds the factors of at most N experts and their gates, one row per slot (the
layer receives the slots: `snapshot.Slots`, `GliderLayer.hold_experts`); the other experts' gates live in the
`GateStore` on disk. A call's experts are made resident when it begins (`Residency.make_resident`: its candidates,
known from its global scores), the least recently used others evicted, the missing ones read from their sources
and checked against their pinned hashes, and the result published as a new library version, like an edit.
Instruction embeddings stay resident for every expert. Without a budget every expert is hot, row e holding expert
e's gate, and the methods here change nothing.

Invariants:
- A call keeps its version's factors until it ends: making experts resident installs new tensors beside the ones
  older versions hold, so nothing a running call routes with is evicted under it.
- A layer's gate parameter keeps its identity through residency changes (it takes new data): an optimizer made
  before the first call keeps training the same parameter.
- An evicted expert's gate is written back to the cold store as the version held it (trained while resident,
  maybe); an expert's gate is always in exactly one place (`Residency.gate_of` reads it wherever it is).
- A checkpoint holds every expert's gates, (E, in) per module, as without a budget (`Residency.full_gates`);
  loading one splits them between the hot rows and the cold store.

A change to how experts are held (a third tier, pinned host memory) touches this module only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Optional, Sequence

import torch
from torch import nn

from .experts import LoadedExpert, tensor_sha256
from .factors import LoraFactors
from .snapshot import Slots
from .versions import LibraryVersion, Versions

if TYPE_CHECKING:
    from .layer import GliderLayer
    from .snapshot import LayerSnapshot


class BudgetExceededError(ValueError):
    """A call needs more experts' factors at once than the adapter's `max_resident_experts`."""


class Residency:
    """The hot and cold tiers of one adapter's experts.

    Args:
        budget: `max_resident_experts` (None: every expert hot, nothing to manage).
        adapter_name: The adapter whose layers hold the experts.
        versions: Where the adapter's versions are published (`make_resident` publishes one).
        experts: The library's experts in routing order (the library's own list, which its edits change).
        layers: Module name -> the Glider layer holding the adapter now.
    """

    def __init__(
        self,
        budget: Optional[int],
        adapter_name: str,
        versions: Versions,
        experts: list[LoadedExpert],
        layers: Callable[[], Mapping[str, "GliderLayer"]],
    ) -> None:
        self.budget, self.adapter_name, self.versions = budget, adapter_name, versions
        self.experts, self.layers = experts, layers
        self.hot: "OrderedDict[str, int]" = OrderedDict()  # expert name -> its slot, least recently used first
        self.cold = GateStore() if budget is not None else None

    # ------------------------------------------------------------------ building layers

    def slots(self) -> Optional[Slots]:
        """What a layer built now holds: the hot experts at their slots (None without a budget: every expert)."""
        if self.budget is None:
            return None
        of_expert = torch.tensor([self.hot.get(expert.name, -1) for expert in self.experts], dtype=torch.long)
        return Slots(of_expert, self.budget)

    def adopt(self, layer: "GliderLayer", experts: Sequence[Optional[LoraFactors]]) -> None:
        """A layer was given the adapter with `slots()`: keep the gates of the experts (`experts[e]`: e's factors
        there, None where it does not adapt) it does not hold in the cold store, and let its checkpoints hold
        every expert's gates."""
        if self.budget is None:
            return
        snapshot = layer.installed_snapshot(self.adapter_name)
        for index, factors in enumerate(experts):
            if factors is not None and snapshot.row(index) is None:
                self.keep_added(layer, index, factors)
        if not any(getattr(hook, "residency", None) is self for hook in layer._state_dict_hooks.values()):
            hooks = _CheckpointGates(self)
            layer.register_state_dict_post_hook(hooks)
            layer.register_load_state_dict_pre_hook(hooks.split)

    def keep_added(
        self, layer: "GliderLayer", index: int, factors: LoraFactors, gate: Optional[torch.Tensor] = None
    ) -> None:
        """Keep the gate of expert `index`, which `layer` does not hold (budget), in the cold store: `gate`, or its
        initial one (zeros, which need no writing: a row never written reads as zeros; an Arrow prototype)."""
        if self.budget is None:
            return
        gate = layer.initial_gate(self.adapter_name, factors) if gate is None else gate
        if gate.any():
            self.cold.write(layer.module_name, self.experts[index].name, gate)

    def forget(self, name: str) -> None:
        """Expert `name` leaves the library: free its slot and its cold gates."""
        if self.budget is not None:
            self.hot.pop(name, None)
            self.cold.drop(name)

    # ------------------------------------------------------------------ a call's experts

    def make_resident(self, needed: Optional[Collection[str]] = None) -> LibraryVersion:
        """The current version, with the experts named in `needed` (None: all of them) hot first: the least recently
        used others are evicted (their gates written back), the missing ones read from their sources (checked against
        their pinned hashes) with their gates from the cold store, and the result published as a new version. Calls
        holding an older version keep its factors until they end. Without a budget, the current version. Unknown
        names raise a KeyError listing the experts."""
        budget = self.budget
        with self.versions.editing:
            version = self.versions.current
            names = version.expert_names
            needed = None if needed is None else set(needed)
            unknown = sorted((needed or set()) - set(names))
            if unknown:
                raise KeyError(f"make_resident: unknown expert(s) {unknown}; experts are {list(names)}.")
            if budget is None:
                return version
            wanted = list(names) if needed is None else [name for name in names if name in needed]
            if len(wanted) > budget:
                raise BudgetExceededError(
                    f"This call needs {len(wanted)} experts' factors at once, more than max_resident_experts={budget}. "
                    + ("A call without global scores routes over every expert: run it inside route(...) or "
                       "global_scores(...) with GliderConfig(candidates=M)." if needed is None else
                       "Raise max_resident_experts, lower candidates, or route fewer rows per call.")
                )  # fmt: skip
            for name in wanted:
                if name in self.hot:
                    self.hot.move_to_end(name)
            missing = [name for name in wanted if name not in self.hot]
            if not missing:
                return version
            position = {name: index for index, name in enumerate(names)}
            fetched = {name: self._fetch(self.experts[position[name]]) for name in missing}
            keep = set(wanted)
            overflow = max(0, len(self.hot) + len(missing) - budget)
            evicted = [name for name in self.hot if name not in keep][:overflow]
            self._write_back(version, {name: position[name] for name in evicted})
            free = sorted(set(range(budget)) - set(self.hot.values()) | {self.hot[name] for name in evicted})
            for name in evicted:
                del self.hot[name]
            self.hot.update(zip(missing, free))
            gate_slot = self.slots().of_expert
            snapshots, layers = {}, self.layers()
            for module_name, snapshot in version.layers.items():
                bank = snapshot.bank
                factors = [
                    (fetched[name].get(module_name) if name in fetched else bank.factors_of(index))
                    if name in self.hot else None
                    for index, name in enumerate(names)
                ]  # fmt: skip
                incoming = {
                    self.hot[name]: self.cold.read(module_name, name, snapshot.in_features)
                    for name in missing if bank.adapting(position[name])
                }  # fmt: skip
                snapshots[module_name] = layers[module_name].hold_experts(self.adapter_name, factors, gate_slot, incoming)
            return self.versions.publish(layers=snapshots)

    def _write_back(self, version: LibraryVersion, evicted: Mapping[str, int]) -> None:
        """Keep the evicted experts' gates (name -> routing index), as `version` holds them, in the cold store."""
        for module_name, snapshot in version.layers.items():
            for name, index in evicted.items():
                gate = snapshot.gate_of(index) if snapshot.bank.adapting(index) else None
                if gate is not None:
                    self.cold.write(module_name, name, gate)

    @staticmethod
    def _fetch(expert: LoadedExpert) -> dict[str, LoraFactors]:
        """The expert's factors at every module it adapts, read from its source and checked against its pinned
        hash; an expert whose files vanished or changed is refused, naming it."""
        try:
            factors = {module: f.loaded() for module, f in expert.factors.items()}
        except (OSError, ValueError, KeyError) as error:
            raise RuntimeError(f"Expert '{expert.name}' could not be read from its source when fetched: {error}") from error
        sha256 = tensor_sha256(factors, expert.name)
        if sha256 != expert.sha256:
            raise RuntimeError(
                f"Expert '{expert.name}' changed since it was opened: its tensors now hash to {sha256[:12]}..., it was "
                f"pinned at {expert.sha256[:12]}...; reload the adapter (or pin a 'revision')."
            )
        return factors

    # ------------------------------------------------------------------ gates wherever they live

    def gate_of(self, snapshot: "LayerSnapshot", module_name: str, index: int) -> torch.Tensor:
        """Expert `index`'s gate (in,) at `module_name` (it adapts the module), as `snapshot` holds it or, when it is
        cold, from the store (float32)."""
        gate = snapshot.gate_of(index)
        return self.cold.read(module_name, self.experts[index].name, snapshot.in_features) if gate is None else gate

    def full_gates(self, snapshot: "LayerSnapshot", module_name: str) -> torch.Tensor:
        """Every expert's gate at `module_name`, (E, in) in the snapshot's dtype and device, zeros where an expert does
        not adapt the module: the layer's gates themselves without a budget, assembled from the hot rows and the
        cold store under one (what a checkpoint holds either way)."""
        if snapshot.gate_slot is None:
            return snapshot.values
        bank = snapshot.bank
        full = snapshot.values.new_zeros(bank.num_experts, snapshot.in_features)
        if full.device.type == "meta":  # laid out for a checkpoint to fill (low_cpu_mem_usage)
            return full
        for index in range(bank.num_experts):
            if bank.adapting(index):
                full[index] = self.gate_of(snapshot, module_name, index)
        return full

    def place_gates(
        self, snapshot: "LayerSnapshot", module_name: str, gates: Mapping[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """New gates (expert index -> (in,)) at `module_name`: the cold ones written to the store; returns the rows
        the layer holds (row -> gate: row e is expert e without a budget) for `GliderLayer.set_gate_rows`."""
        if snapshot.gate_slot is None:
            return dict(gates)
        rows = {}
        for index, vector in gates.items():
            row = snapshot.row(index)
            if row is None:
                self.cold.write(module_name, self.experts[index].name, vector)
            else:
                rows[row] = vector
        return rows


class _CheckpointGates:
    """A layer's checkpoint hooks for one budgeted adapter: its state dict holds every expert's gates, (E, in) as
    without a budget, not the hot rows (left as they are for `keep_vars=True`: the caller wants the parameters);
    loading one splits them between the hot rows, which the parameter loads, and the cold store. A callable object
    (torch marks a state-dict hook; a bound method takes no attributes) that copies and pickles with its model."""

    def __init__(self, residency: Residency) -> None:
        self.residency = residency

    def _key(self, layer: nn.Module, prefix: str) -> Optional[str]:
        adapter = self.residency.adapter_name
        return f"{prefix}glider_gates.{adapter}" if adapter in layer.glider_gate_slot else None

    def __call__(self, layer: "GliderLayer", state_dict: dict, prefix: str, *args: Any) -> None:
        """state_dict post-hook."""
        key = self._key(layer, prefix)
        if key in state_dict and not isinstance(state_dict[key], nn.Parameter):
            snapshot = layer.installed_snapshot(self.residency.adapter_name)
            state_dict[key] = self.residency.full_gates(snapshot, layer.module_name).detach().clone()

    def split(self, layer: "GliderLayer", state_dict: dict, prefix: str, *args: Any) -> None:
        """load_state_dict pre-hook."""
        key = self._key(layer, prefix)
        full = state_dict.get(key) if key is not None else None
        if full is None:
            return
        snapshot = layer.installed_snapshot(self.residency.adapter_name)
        bank = snapshot.bank
        if tuple(full.shape) != (bank.num_experts, snapshot.in_features):
            return  # torch reports the mismatch, naming the key
        values = snapshot.values
        rows = full.new_zeros(values.shape) if values.device.type == "meta" else values.clone().to(full)
        gates = {index: full[index] for index in range(bank.num_experts) if bank.adapting(index)}
        for row, gate in self.residency.place_gates(snapshot, layer.module_name, gates).items():
            rows[row] = gate
        state_dict[key] = rows


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
    """The cold store: each module's gate vectors of the experts not resident in its layer, by expert name, one file
    per module in a temporary folder, written and read a row at a time with plain file I/O. Nothing here is mapped
    into the process: the kernel's page cache holds what was read lately, the process's resident memory does not
    grow with the library. A row never written reads as zeros (an untrained Phatgoose gate).

    Written by hand: the rows of one tensor need to move between memory and disk one at a time, in both
    directions, which neither safetensors (whole files, read-only maps) nor torch's file-backed storages (mapped:
    every row read stays in the process's resident memory) do.

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
