"""The expert library of one Glider adapter: its experts resolved from a config and checked against the base model.

A config whose experts are not yet resolved (a new adapter) loads them from their sources, to be pinned (commit,
tensor hash, layout: `LoadedExpert.pins`). A resolved config of a self-contained saved adapter lays out zero placeholders of the saved
layout, which the adapter's checkpoint fills; a router-only one reloads its experts from their sources at the pinned
commits and checks their hashes. Factors are read lazily, one module at a time, and not kept by the library.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from tqdm.auto import tqdm

from .config import GliderConfig
from .experts import LoadedExpert, LoraFactors, load_expert


class ExpertLibrary:
    """The experts of one adapter in routing order, and the module-by-module factors a Glider layer is built from.

    Args:
        experts: The loaded experts (lazy factors), in routing order.
        placeholders: Whether the factors are zero placeholders that a checkpoint must fill.
    """

    def __init__(self, experts: list[LoadedExpert], placeholders: bool) -> None:
        self.experts = experts
        self.placeholders = placeholders

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

    def append(self, expert: LoadedExpert) -> None:
        """Add an expert after the others (its entry goes into the adapter's config)."""
        self.experts.append(expert)

    def remove(self, index: int) -> None:
        """Drop the expert at routing index `index`."""
        del self.experts[index]


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
