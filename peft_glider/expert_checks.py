"""What an expert library refuses before it changes anything: an expert that does not fit the base model (a module
it lacks, a non-linear one, other shapes, another base's weights), one whose tensors changed since they were pinned,
a gate vector of the wrong shape or not finite; the warning for experts without trained gates; and the zero
placeholders a self-contained adapter's checkpoint fills."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from ._warnings import warn_user
from .base_layer import is_linear
from .experts import LoadedExpert
from .factors import LoraFactors
from .hub import GATES_FILE


def check_gate(
    expert: str, module_name: str, vector: torch.Tensor, in_features: Optional[int], caller: str
) -> torch.Tensor:
    """A gate vector for `expert` at `module_name`, checked: the expert adapts the module (`in_features` is its
    input size, None where it does not), the shape fits and the values are finite."""
    if in_features is None:
        raise ValueError(f"{caller}: expert {expert!r} does not adapt module {module_name!r}.")
    vector = torch.as_tensor(vector)
    if vector.shape != (in_features,):
        raise ValueError(
            f"{caller}: gate of expert {expert!r} at {module_name!r} has shape {tuple(vector.shape)}, "
            f"expected ({in_features},)."
        )
    if not torch.isfinite(vector).all():
        raise ValueError(f"{caller}: gate of expert {expert!r} at {module_name!r} is not finite.")
    return vector


class UngatedExpertsWarning(UserWarning):
    """Experts carry no trained gates: their local routing is uninformed until gates are trained or set."""


def warn_ungated(names: list[str]) -> None:
    """Warn, naming them, about experts whose local routing is uninformed (no trained gates)."""
    if names:
        warn_user(
            f"Experts {names} carry no trained gates ({GATES_FILE}): their local routing is uninformed "
            "until gates are trained (peft_glider.train_missing_gates) or set (GliderModel.set_gates).",
            UngatedExpertsWarning,
        )


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
    for module_name, (rank, scaling, *extras) in entry["layout"].items():
        module = modules.get(module_name)
        in_features, out_features = _get_in_out_features(_base_layer(module)) if module is not None else (0, 0)
        factors[module_name] = LoraFactors(
            scaling=scaling,
            shapes=((rank, in_features), (out_features, rank)),
            loader=lambda r=rank, i=in_features, o=out_features, n=len(extras): (
                torch.zeros(r, i), torch.zeros(o, r), *(torch.zeros(o) for _ in range(n))
            ),
            extras=tuple(extras),
        )
    return LoadedExpert(name=entry["name"], factors=factors, commit=entry.get("commit"), sha256=entry["sha256"])


def check_fits(name: str, module_name: str, factors: LoraFactors, modules: Mapping[str, nn.Module]) -> None:
    """Refuse an expert that adapts a module the base model lacks, a non-linear one, or one of other shapes."""
    module = modules.get(module_name)
    if module is None:
        raise ValueError(f"Expert '{name}' adapts module '{module_name}', which the base model does not have.")
    module = _base_layer(module)
    if not is_linear(module):
        raise ValueError(
            f"Expert '{name}' adapts module '{module_name}', a {type(module).__name__}; Glider adapts linear layers "
            "(nn.Linear, transformers' Conv1D)."
        )
    in_features, out_features = _get_in_out_features(module)
    if factors.in_features != in_features or factors.out_features != out_features:
        raise ValueError(
            f"Expert '{name}' does not fit module '{module_name}': its LoRA maps {factors.in_features} -> "
            f"{factors.out_features} features, the module {in_features} -> {out_features}."
        )


def check_base_weights(expert: LoadedExpert, modules: Mapping[str, nn.Module]) -> None:
    """Refuse an expert whose saved base-layer weight (PEFT saves it beside a LoRA on a layer tied to the
    embeddings, e.g. lm_head) differs from the base model's: it was trained on another base (resized or retrained
    embeddings), while every expert of a library shares one base model."""
    for module_name, read in expert.base_weights.items():
        weight = _base_layer(modules[module_name]).weight
        saved = read()
        if saved.shape != weight.shape or not torch.equal(saved.to(weight.device, weight.dtype), weight.detach()):
            raise ValueError(
                f"Expert '{expert.name}' was saved with its own base weight at module '{module_name}' (shape "
                f"{tuple(saved.shape)}), which differs from this base model's ({tuple(weight.shape)}): it was trained "
                "on another base (e.g. resized or retrained embeddings). All experts of a Glider adapter share one "
                "base model: load this expert on the base it was trained with."
            )
