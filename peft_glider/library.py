"""The expert library of one Glider adapter: its experts resolved from a config and checked against the base model,
and the versions of it that calls route with.

A config whose experts are not yet resolved (a new adapter) loads them from their sources, to be pinned (commit,
tensor hash, layout: `LoadedExpert.pins`). A resolved config of a self-contained saved adapter lays out zero placeholders of the saved
layout, which the adapter's checkpoint fills; a router-only one reloads its experts from their sources at the pinned
commits and checks their hashes. Factors are read lazily, one module at a time, and not kept by the library.

Edits (add or remove an expert, new gates or instruction embeddings) are copy-on-write: the library tells each
layer to install new tensors beside the ones the current version holds, then publishes a whole new
`LibraryVersion` in one assignment. A call takes the version current when it begins and keeps it to its end, in
every layer; an old version is freed when the last call holding it ends. Edits are serialized by one lock.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from tqdm.auto import tqdm

from .config import GliderConfig
from .experts import LoadedExpert, LoraFactors, load_expert

if TYPE_CHECKING:
    from .layer import GliderLayer, LayerSnapshot


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


class ExpertLibrary:
    """The experts of one adapter in routing order, and the module-by-module factors a Glider layer is built from.

    Args:
        experts: The loaded experts (lazy factors), in routing order.
        placeholders: Whether the factors are zero placeholders that a checkpoint must fill.
    """

    def __init__(self, experts: list[LoadedExpert], placeholders: bool) -> None:
        self.experts = experts
        self.placeholders = placeholders
        self.current: Optional[LibraryVersion] = None  # what a call that begins now routes with
        self._edit_lock = threading.RLock()  # one edit at a time (re-entrant: an edit may publish more than once)

    @property
    def editing(self) -> threading.RLock:
        """Held by every edit: hold it to make several changes one after another without another edit between."""
        return self._edit_lock

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
        else:
            entries = config.experts
            experts = [load_expert(entry) for entry in tqdm(entries, desc="Loading LoRA experts", disable=len(entries) < 4)]
            for entry, expert in zip(entries, experts):
                check_pinned_hash(entry, expert)
        for expert in experts:
            for module_name, factors in expert.factors.items():
                check_fits(expert.name, module_name, factors, modules)
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

    # ------------------------------------------------------------------ versions

    def publish(self, **changes: Any) -> LibraryVersion:
        """Make a new version current: the current one with `changes` (fields of `LibraryVersion`), or the first
        one. One assignment: a call that begins after it sees all of the edit, one that began before sees none."""
        with self._edit_lock:
            if self.current is None:
                version = LibraryVersion(number=0, **changes)
            else:
                version = replace(self.current, number=self.current.number + 1, successor=[], **changes)
                self.current.successor.append(version)
            self.current = version
            return version

    def add(
        self,
        expert: LoadedExpert,
        adapter_name: str,
        layers: Mapping[str, "GliderLayer"],
        wrap: Callable[[str], "GliderLayer"],
        gates: Mapping[str, torch.Tensor],
        embedding: Optional[torch.Tensor] = None,
    ) -> LibraryVersion:
        """Append `expert`: each layer of the adapter (`layers`) inserts it (or an absent slot), `wrap(module_name)`
        makes the layer of a module only it adapts, and its `gates` ({module: (in,)}, checked) are installed with
        it. Published as one version, with `embedding` (1, e) appended to the instruction embeddings."""
        with self._edit_lock:
            current = self.current
            index = current.num_experts
            self.experts.append(expert)
            snapshots = dict(current.layers)
            for module_name, layer in layers.items():
                factors = expert.factors.get(module_name)
                gate = gates.get(module_name) if factors is not None else None
                snapshots[module_name] = layer.append_expert(adapter_name, factors, gate)
            for module_name in sorted(set(expert.factors) - set(layers)):
                layer = wrap(module_name)
                if module_name in gates:
                    snapshots[module_name] = layer.replace_gates(adapter_name, {index: gates[module_name]})
                else:
                    snapshots[module_name] = layer.installed_snapshot(adapter_name)
            embeddings = current.embeddings
            if embedding is not None:
                embeddings = torch.cat([embeddings, embedding.to(embeddings)], dim=0)
            return self.publish(
                expert_names=(*current.expert_names, expert.name), layers=snapshots, embeddings=embeddings
            )

    def remove(
        self,
        index: int,
        adapter_name: str,
        layers: Mapping[str, "GliderLayer"],
        retire: Callable[[list[str], int], None],
    ) -> LibraryVersion:
        """Drop the expert at routing index `index` from every layer and publish the result. The modules it alone
        adapted are released; `retire(module_names, version_number)` runs once no call holds an older version any
        more (at once when none does), to take their layers out of the model."""
        with self._edit_lock:
            current = self.current
            del self.experts[index]
            snapshots, released = {}, []
            for module_name, layer in layers.items():
                snapshot = layer.remove_expert(adapter_name, index)
                if snapshot is None:
                    layer.release(adapter_name, current.number + 1)
                    released.append(module_name)
                else:
                    snapshots[module_name] = snapshot
            keep = [i for i in range(current.num_experts) if i != index]
            embeddings = None if current.embeddings is None else current.embeddings[keep].clone()
            version = self.publish(
                expert_names=tuple(current.expert_names[i] for i in keep), layers=snapshots, embeddings=embeddings
            )
            if released:
                weakref.finalize(current, retire, released, version.number)
            return version

    def replace_gates(
        self, adapter_name: str, rows: Mapping["GliderLayer", Mapping[int, torch.Tensor]]
    ) -> LibraryVersion:
        """New gates at the given layers (`{layer: {expert index: (in,) vector}}`), published as one version."""
        with self._edit_lock:
            snapshots = dict(self.current.layers)
            for layer, per_expert in rows.items():
                snapshots[layer.module_name] = layer.replace_gates(adapter_name, per_expert)
            return self.publish(layers=snapshots)

    def __getstate__(self) -> dict:  # models are copied and pickled: a lock is not, a fresh one is made
        return {key: value for key, value in self.__dict__.items() if key != "_edit_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._edit_lock = threading.RLock()


def check_pinned_hash(entry: Mapping[str, Any], expert: LoadedExpert) -> None:
    """Refuse an expert whose tensors differ from the hash a saved adapter pinned."""
    if "sha256" in entry and entry["sha256"] != expert.sha256:
        raise ValueError(
            f"Expert '{expert.name}' changed since this Glider adapter was saved: its tensors hash to "
            f"{expert.sha256[:12]}..., the adapter pins {entry['sha256'][:12]}... Pin a 'revision'."
        )


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def placeholder_expert(entry: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> LoadedExpert:
    """An expert of the saved layout whose factors are zeros, made when a layer is built; a checkpoint fills them."""
    factors = {}
    for module_name, (rank, scaling) in entry["layout"].items():
        module = modules.get(module_name)
        in_features, out_features = _get_in_out_features(_base_layer(module)) if module is not None else (0, 0)
        factors[module_name] = LoraFactors(
            scaling=scaling,
            shapes=((rank, in_features), (out_features, rank)),
            loader=lambda r=rank, i=in_features, o=out_features: (torch.zeros(r, i), torch.zeros(o, r)),
        )
    return LoadedExpert(name=entry["name"], factors=factors, commit=entry.get("commit"), sha256=entry["sha256"])


def check_fits(name: str, module_name: str, factors: LoraFactors, modules: Mapping[str, nn.Module]) -> None:
    """Refuse an expert that adapts a module the base model lacks, a non-linear one, or one of other shapes."""
    module = modules.get(module_name)
    if module is None:
        raise ValueError(f"Expert '{name}' adapts module '{module_name}', which the base model does not have.")
    module = _base_layer(module)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"Expert '{name}' adapts module '{module_name}', a {type(module).__name__}; Glider adapts nn.Linear."
        )
    if factors.in_features != module.in_features or factors.out_features != module.out_features:
        raise ValueError(
            f"Expert '{name}' does not fit module '{module_name}': its LoRA maps {factors.in_features} -> "
            f"{factors.out_features} features, the module {module.in_features} -> {module.out_features}."
        )
