"""The expert library of one Glider adapter: its experts resolved from a config and checked against the base model,
and its edits, published as the versions calls route with (`versions`).

A config whose experts are not yet resolved (a new adapter) loads them from their sources, to be pinned (commit,
tensor hash, layout: `LoadedExpert.pins`). A resolved config of a self-contained saved adapter lays out zero
placeholders of the saved layout, which the adapter's checkpoint fills; a router-only one reloads its experts from
their sources at the pinned commits and checks their hashes. Factors are read lazily, one module at a time, and not kept by the library.

With a resident-experts budget (`GliderConfig.max_resident_experts`) the library asks its `Residency` which experts
a layer holds and where the others' gates are; nothing here knows slots or the cold store.

Edits (add or remove an expert, new gates or instruction embeddings) are copy-on-write: the library tells each
layer to install new tensors beside the ones the current version holds, then publishes a whole new
`LibraryVersion` in one assignment (`versions.Versions`).
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ExpertEntry, GliderConfig, normalize_expert_entry
from .expert_checks import (
    check_base_weights,
    check_fits,
    check_gate,
    check_pinned_hash,
    placeholder_expert,
    warn_ungated,
)
from .experts import LoadedExpert, load_expert
from .factors import LoraFactors
from .layer import GliderLayer
from .local_routers import local_router
from .residency import Residency
from .versions import LibraryVersion, Versions

if TYPE_CHECKING:
    from .global_router import ExpertDescriptions
    from .snapshot import LayerSnapshot
    from .state import RoutingState


class LibraryHost(Protocol):
    """What a library needs of the model it lives in, for its adapter (`GliderModel` provides it)."""

    def layers(self) -> dict[str, GliderLayer]:
        """Module name -> the Glider layer holding the adapter now."""

    def wrap(self, module_name: str) -> GliderLayer:
        """Make the Glider layer of a module the adapter did not adapt yet (the library's experts say what)."""

    def retire(self, module_names: list[str], version_number: int) -> None:
        """Take the layers released in that version out of the model (no call routes through them any more)."""

    def base_modules(self) -> dict[str, nn.Module]:
        """The base model's modules by name (what experts must fit)."""

    def store_embeddings(self, embeddings: Optional[torch.Tensor]) -> None:
        """Keep the instruction embeddings (E, e) where the adapter's state dict saves them."""


class ExpertLibrary:
    """The experts of one adapter in routing order, and the module-by-module factors a Glider layer is built from.

    Args:
        experts: The loaded experts (lazy factors), in routing order.
        placeholders: Whether the factors are zero placeholders that a checkpoint must fill.
    """

    def __init__(self, experts: list[LoadedExpert], placeholders: bool) -> None:
        self.experts = experts
        self.placeholders = placeholders
        self.versions = Versions()  # what calls route with; its lock serializes the edits
        self.adapter_name: Optional[str] = None  # the adapter, its config, its model and its residency, once attached
        self.config: Optional[GliderConfig] = None
        self.host: Optional[LibraryHost] = None
        self.residency: Optional[Residency] = None

    def attach(self, adapter_name: str, config: GliderConfig, host: LibraryHost) -> None:
        """Bind the library to its adapter: its name, its config (whose expert entries follow every edit), the model
        it lives in, and the residency of its experts."""
        self.adapter_name, self.config, self.host = adapter_name, config, host
        self.residency = Residency(config.max_resident_experts, adapter_name, self.versions, self.experts, host.layers)

    @classmethod
    def resolve(cls, config: GliderConfig, model: nn.Module, placeholders: Optional[bool] = None) -> "ExpertLibrary":
        """The config's experts (the config is not modified), checked to fit `model`.

        `placeholders`: lay out zeros for a checkpoint to fill (default: for a resolved, self-contained config) or
        load the experts from their sources (pinned commits and hashes checked, when the config has them).
        """
        modules = dict(model.named_modules())
        if placeholders is None:
            placeholders = config.is_resolved and config.save_expert_weights
        if placeholders:
            experts = [placeholder_expert(entry, modules) for entry in config.experts]
        else:  # under a budget a pinned expert is checked when first made resident, not read now
            experts = open_experts(config.experts, hash_tensors=config.max_resident_experts is None)
            for entry, expert in zip(config.experts, experts):
                check_pinned_hash(entry, expert)
        for expert in experts:
            for module_name, factors in expert.factors.items():
                check_fits(expert.name, module_name, factors, modules)
            check_base_weights(expert, modules)
        return cls(experts, placeholders)

    @property
    def modules(self) -> list[str]:
        """Names of the modules at least one expert adapts, sorted."""
        return sorted({module for expert in self.experts for module in expert.factors})

    def module_factors(self, module_name: str) -> list[Optional[LoraFactors]]:
        """Each expert's factors at `module_name` (None where it does not adapt it), read when first accessed and
        not kept here: the layer built from them holds the only copy."""
        if not any(module_name in expert.factors for expert in self.experts):
            raise KeyError(f"No expert of this Glider adapter adapts module {module_name!r}.")
        return [
            expert.factors[module_name].unloaded() if module_name in expert.factors else None
            for expert in self.experts
        ]

    # ------------------------------------------------------------------ edits (GliderModel's API)

    def add_expert(self, expert: ExpertEntry, instruction_embedding: Optional[torch.Tensor] = None) -> str:
        """See `GliderModel.add_expert`: checked, loaded and pinned, then inserted in every layer as one version."""
        config = self.config
        entry = normalize_expert_entry(expert, len(config.experts))
        if entry["name"] in config.expert_names:
            raise ValueError(f"add_expert: an expert named {entry['name']!r} exists already; give another 'name'.")
        embeddings = self.versions.current.embeddings
        if (embeddings is None) != (instruction_embedding is None):
            raise ValueError(
                "add_expert: pass an instruction_embedding exactly when the adapter has instruction embeddings."
            )
        if embeddings is not None:
            instruction_embedding = torch.as_tensor(instruction_embedding).reshape(1, -1)
            if instruction_embedding.shape[1] != embeddings.shape[1] or not torch.isfinite(instruction_embedding).all():
                raise ValueError(f"add_expert: the instruction embedding must be {embeddings.shape[1]} finite values.")
        loaded = load_expert(entry)
        modules = self.host.base_modules()
        for module_name, factors in loaded.factors.items():
            check_fits(loaded.name, module_name, factors, modules)
        check_base_weights(loaded, modules)
        learned = local_router(config.local_router).learned
        shipped = learned and loaded.gates_reader is not None
        gates = loaded.gates if shipped else {}
        for module_name, vector in gates.items():
            factors = loaded.factors.get(module_name)
            check_gate(loaded.name, module_name, vector, factors.in_features if factors else None, "add_expert")
        entry.update(loaded.pins)
        if shipped:
            entry["gates"] = "shipped with the expert"
        with self.versions.editing:
            gates = {name: torch.as_tensor(vector) for name, vector in gates.items()}
            self._add(loaded, gates, instruction_embedding)
            config.experts.append(entry)
            config.target_modules = sorted(self.host.layers())
            if embeddings is not None:
                self.host.store_embeddings(self.versions.current.embeddings)
        if learned and not shipped:
            warn_ungated([loaded.name])
        return loaded.name

    def remove_expert(self, name: str) -> None:
        """See `GliderModel.remove_expert`."""
        config = self.config
        names = config.expert_names
        if name not in names:
            raise KeyError(f"remove_expert: unknown expert {name!r}; experts are {names}.")
        if len(names) == 1:
            raise ValueError("remove_expert: a Glider adapter needs at least one expert.")
        if config.top_k > len(names) - 1:
            raise ValueError(f"remove_expert: top_k={config.top_k} would exceed the {len(names) - 1} experts left.")
        index = names.index(name)
        with self.versions.editing:
            self._remove(index)
            del config.experts[index]
            config.target_modules = sorted(self.host.layers())
            if self.versions.current.embeddings is not None:
                self.host.store_embeddings(self.versions.current.embeddings)

    def set_gates(self, gates: Mapping[str, Mapping[str, torch.Tensor]], how: str = "set") -> None:
        """See `GliderModel.set_gates`: every gate checked before anything changes, then one new version."""
        names = self.config.expert_names
        with self.versions.editing:
            layers = self.host.layers()
            rows: dict[GliderLayer, dict[int, torch.Tensor]] = {}
            for expert, per_module in gates.items():
                if expert not in names:
                    raise KeyError(f"set_gates: unknown expert {expert!r}; experts are {names}.")
                index = names.index(expert)
                for module_name, vector in per_module.items():
                    layer = layers.get(module_name)
                    if layer is None:
                        raise KeyError(f"set_gates: expert {expert!r}: no Glider layer at module {module_name!r}.")
                    adapts = self.versions.current.layers[module_name].bank.adapting(index)
                    in_features = layer.in_features if adapts else None
                    rows.setdefault(layer, {})[index] = check_gate(expert, module_name, vector, in_features, "set_gates")
            self.replace_gates(rows)
            for expert in gates:
                self.record_gates(expert, how)

    def record_gates(self, expert: str, how: str) -> None:
        """Record how an expert's gates were made (its config entry's `"gates"`, shown on the model card)."""
        names = self.config.expert_names
        if expert not in names:
            raise KeyError(f"unknown expert {expert!r}; experts are {names}.")
        self.config.experts[names.index(expert)]["gates"] = how

    def install_shipped_gates(self, warn: bool = True, modules: Optional[Collection[str]] = None) -> None:
        """Set the gates the experts carry (glider_gates.safetensors) at `modules` (default: all); warn, naming them,
        about experts without. Nothing for a local router whose vectors are computed, not learned. Under a budget
        the gates are read and set `SHIPPED_GATES_AT_ONCE` experts at a time: most go to the residency's cold store,
        and the whole library's gates are never in memory together."""
        if not local_router(self.config.local_router).learned:
            return
        shipping = [expert for expert in self.experts if expert.gates_reader is not None]
        at_once = max(1, len(shipping) if self.config.max_resident_experts is None else SHIPPED_GATES_AT_ONCE)
        for start in range(0, len(shipping), at_once):
            shipped = {
                expert.name: {
                    module: gate for module, gate in expert.gates.items() if modules is None or module in modules
                }
                for expert in shipping[start : start + at_once]
            }
            self.set_gates(shipped, how="shipped with the expert")
        if warn:
            warn_ungated([e.name for e in self.experts if e.gates_reader is None])

    def gates(self) -> dict[str, dict[str, torch.Tensor]]:
        """The current version's gate vectors, in the form `set_gates` takes (only modules each expert adapts)."""
        version = self.versions.current
        gates: dict[str, dict[str, torch.Tensor]] = {name: {} for name in version.expert_names}
        for module_name, snapshot in sorted(version.layers.items()):
            for index in range(snapshot.bank.num_experts):
                if snapshot.bank.adapting(index):
                    gate = self.residency.gate_of(snapshot, module_name, index)
                    gates[version.expert_names[index]][module_name] = gate.clone()
        return gates

    def set_embeddings(self, embeddings: torch.Tensor) -> None:
        """See `GliderModel.set_instruction_embeddings`."""
        self._publish_embeddings(self._checked_embeddings(embeddings))

    def _publish_embeddings(self, embeddings: torch.Tensor) -> None:
        with self.versions.editing:
            self.host.store_embeddings(embeddings)
            self.config.instruction_embedding_dim = embeddings.shape[1]
            self.versions.publish(embeddings=embeddings)

    def set_descriptions(self, descriptions: "ExpertDescriptions") -> None:
        """See `GliderModel.set_expert_descriptions`: all checked before anything changes."""
        config = self.config
        if list(descriptions.names) != config.expert_names:
            raise ValueError(
                f"The descriptions are for experts {list(descriptions.names)}, the adapter has {config.expert_names}."
            )
        embeddings = self._checked_embeddings(descriptions.embeddings)  # checked before anything changes
        with self.versions.editing:
            self._publish_embeddings(embeddings)
            for entry, text in zip(config.experts, descriptions.instructions):
                entry["instruction"] = text
            config.embedder = descriptions.embedder
            config.instruction_writer = descriptions.writer
            if descriptions.auto_alpha_threshold is not None:
                config.auto_alpha_threshold = descriptions.auto_alpha_threshold

    def begin(self, embeddings: Optional[torch.Tensor], fresh: bool) -> None:
        """Publish the first version once PEFT has injected the adapter's layers (their experts as installed, the
        instruction embeddings (E, e) or None). Placeholders then await their checkpoint; otherwise the gates the
        experts ship are installed, with a warning naming ungated ones when `fresh` (built from sources now)."""
        layers = self.host.layers()
        snapshots = {name: layer.installed_snapshot(self.adapter_name) for name, layer in layers.items()}
        self.versions.publish(expert_names=tuple(self.config.expert_names), layers=snapshots, embeddings=embeddings)
        if self.placeholders:
            for layer in layers.values():
                layer.await_checkpoint(self.adapter_name)
        else:
            self.install_shipped_gates(warn=fresh)

    def fill_placeholders(self, state: "RoutingState", model: nn.Module) -> None:
        """Load, from their sources at the pinned commits, the experts of layers still holding zero placeholders
        (a saved adapter's config whose checkpoint was never loaded), as one version; nothing when none waits.
        One loader at a time; after it (or a checkpoint that filled them all) the library holds no placeholders."""
        with _PLACEHOLDER_LOCK:
            if self.placeholders:
                self._fill_placeholders(state, model)
            self.placeholders = False

    def _fill_placeholders(self, state: "RoutingState", model: nn.Module) -> None:
        adapter = self.adapter_name
        waiting = {name: layer for name, layer in self.host.layers().items() if adapter in layer.glider_awaiting_checkpoint}
        if not waiting:  # its checkpoint filled every placeholder
            return
        try:
            sources = ExpertLibrary.resolve(self.config, model, placeholders=False)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"Glider adapter {adapter!r} comes from a saved adapter's config, but its checkpoint was never loaded "
                "and its experts could not be loaded from their sources either. Load it with "
                f"PeftModel.from_pretrained(base_model, path) (or peft_glider.load_glider). Cause: {error}"
            ) from error
        with self.versions.editing:
            snapshots = dict(self.versions.current.layers)
            for name, layer in waiting.items():
                snapshots[name] = layer.update_layer(adapter, sources.module_factors(name), state, self.versions)
                del layer.glider_awaiting_checkpoint[adapter]
            self.versions.publish(layers=snapshots)
            self.experts[:] = sources.experts  # the same list: the residency holds it
        # the gates of the filled modules are what a fresh build gives (no checkpoint brought trained ones)
        self.install_shipped_gates(warn=False, modules=waiting)

    def _checked_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        num_experts = len(self.config.experts)
        embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2 or embeddings.shape[0] != num_experts:
            raise ValueError(
                f"Instruction embeddings must have shape (num_experts={num_experts}, dim), "
                f"got {tuple(embeddings.shape)}."
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError("Instruction embeddings contain non-finite values.")
        return embeddings.detach().float().clone()

    # ------------------------------------------------------------------ edits, each one version

    def _add(
        self, expert: LoadedExpert, gates: Mapping[str, torch.Tensor], embedding: Optional[torch.Tensor] = None
    ) -> LibraryVersion:
        """Append `expert`: each layer of the adapter inserts it (or an absent slot), the host wraps a module only it
        adapts, and its `gates` ({module: (in,)}, checked) are installed with it. Published as one version, with
        `embedding` (1, e) appended to the instruction embeddings."""
        with self.versions.editing:
            layers = self.host.layers()
            current = self.versions.current
            index = current.num_experts
            self.experts.append(expert)
            snapshots = dict(current.layers)
            for module_name, layer in layers.items():
                factors = expert.factors.get(module_name)
                gate = gates.get(module_name) if factors is not None else None
                snapshots[module_name] = layer.append_expert(self.adapter_name, factors, gate)
                if factors is not None:  # a layer that holds only some experts does not hold the new one
                    self.residency.keep_added(layer, index, factors, gate)
            for module_name in sorted(set(expert.factors) - set(layers)):
                layer = self.host.wrap(module_name)
                if module_name in gates:
                    snapshots[module_name] = self._set_gates_at(layer, {index: gates[module_name]})
                else:
                    snapshots[module_name] = layer.installed_snapshot(self.adapter_name)
            embeddings = current.embeddings
            if embedding is not None:
                embeddings = torch.cat([embeddings, embedding.to(embeddings)], dim=0)
            return self.versions.publish(
                expert_names=(*current.expert_names, expert.name), layers=snapshots, embeddings=embeddings
            )

    def _remove(self, index: int) -> LibraryVersion:
        """Drop the expert at routing index `index` from every layer and publish the result. The modules it alone
        adapted are released; the host's `retire(module_names, version_number)` runs once no call holds an older
        version any more (at once when none does), to take their layers out of the model."""
        with self.versions.editing:
            current = self.versions.current
            self.residency.forget(self.experts[index].name)
            del self.experts[index]
            snapshots, released = {}, []
            for module_name, layer in self.host.layers().items():
                snapshot = layer.remove_expert(self.adapter_name, index)
                if snapshot is None:
                    layer.release(self.adapter_name, current.number + 1)
                    released.append(module_name)
                else:
                    snapshots[module_name] = snapshot
            keep = [i for i in range(current.num_experts) if i != index]
            embeddings = None if current.embeddings is None else current.embeddings[keep].clone()
            version = self.versions.publish(
                expert_names=tuple(current.expert_names[i] for i in keep), layers=snapshots, embeddings=embeddings
            )
            if released:
                weakref.finalize(current, self.host.retire, released, version.number)
            return version

    def replace_gates(self, rows: Mapping[GliderLayer, Mapping[int, torch.Tensor]]) -> LibraryVersion:
        """New gates at the given layers (`{layer: {expert index: (in,) vector}}`), published as one version."""
        with self.versions.editing:
            snapshots = dict(self.versions.current.layers)
            for layer, per_expert in rows.items():
                snapshots[layer.module_name] = self._set_gates_at(layer, per_expert)
            return self.versions.publish(layers=snapshots)

    def _set_gates_at(self, layer: GliderLayer, gates: Mapping[int, torch.Tensor]) -> "LayerSnapshot":
        """New gates (expert index -> (in,)) at one layer: the rows it holds, the others where the residency keeps
        them."""
        snapshot = layer.installed_snapshot(self.adapter_name)
        rows = self.residency.place_gates(snapshot, layer.module_name, gates)
        return layer.set_gate_rows(self.adapter_name, rows)

_PLACEHOLDER_LOCK = threading.Lock()  # one loader of placeholders at a time (module level: libraries stay copyable)

#: Under a budget, how many experts' shipped gates are read and set at once (`install_shipped_gates`).
SHIPPED_GATES_AT_ONCE = 32

#: How many Hub experts are opened at once (downloads of their adapter files, then reads and hashes).
OPEN_WORKERS = 8


def open_experts(
    entries: list[dict[str, Any]], workers: int = OPEN_WORKERS, hash_tensors: bool = True
) -> list[LoadedExpert]:
    """`load_expert(entry, hash_tensors)` of every entry, in the entries' order with one progress bar; the first
    failure, in that order, is raised. Hub experts are opened up to `workers` at a time in threads (their downloads
    overlap; huggingface_hub resumes partial ones); local folders one after another in this thread (reading and
    hashing them in threads was twice as slow on 2 cores, and every thread's allocator arena kept memory: +25 MB at
    1,024 experts)."""
    hub = [index for index, entry in enumerate(entries) if not os.path.isdir(entry["source"])]
    with ThreadPoolExecutor(max(1, min(workers, len(hub)))) as pool:
        pending = {index: pool.submit(load_expert, entries[index], hash_tensors) for index in hub}
        progress = tqdm(range(len(entries)), desc="Loading LoRA experts", disable=len(entries) < 4)
        return [pending[index].result() if index in pending else load_expert(entries[index], hash_tensors)
                for index in progress]
