"""The local routers, one strategy each: what a token is compared with at a module, and how.

- **Phatgoose**: one learned gate vector per expert and module (trained with the expert frozen, shipped beside it
  as `glider_gates.safetensors`); token and gates standardized, `LN(u) . LN(gate) / sqrt(d)`.
- **Arrow**: training-free prototypes, the top right singular vector of each expert's `B A`; `|u . v| / T`.

A third router is one more subclass registered in `LOCAL_ROUTERS`; `GliderConfig.local_router` names it. Nothing
else in the package compares router names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from . import routing
from .factors import LoraFactors


class LocalRouter(ABC):
    """One kind of local router. Its vectors live in each layer's trainable `glider_gates` (learned gates, or
    prototypes computed from the factors), one row per expert."""

    name: ClassVar[str]
    #: Whether its vectors are learned (trained per expert, shipped with it, installed on load) rather than computed.
    learned: ClassVar[bool]
    #: Whether tokens are standardized before the dot products (the kernels' flag).
    standardized: ClassVar[bool]

    @abstractmethod
    def initial_vector(self, factors: LoraFactors, in_features: int) -> torch.Tensor:
        """A new expert's vector at a module it adapts, (in_features,)."""

    @abstractmethod
    def rows(self, vectors: torch.Tensor, temperature: float) -> torch.Tensor:
        """What tokens are multiplied with, (E, in) from the vectors (E, in); computed once per vector update."""

    @abstractmethod
    def summary(self, temperature: float) -> str:
        """One line for the model card."""

    @abstractmethod
    def how_vectors_are_made(self) -> str:
        """A sentence for the model card."""


class Phatgoose(LocalRouter):
    name = "phatgoose"
    learned = True
    standardized = True

    def initial_vector(self, factors: LoraFactors, in_features: int) -> torch.Tensor:
        return torch.zeros(in_features)  # uninformed until trained or set

    def rows(self, vectors: torch.Tensor, temperature: float) -> torch.Tensor:
        return routing.phatgoose_rows(vectors)

    def summary(self, temperature: float) -> str:
        return "phatgoose (learned gates)"

    def how_vectors_are_made(self) -> str:
        return (
            "Phatgoose gate vectors, one per expert and adapted module, trained with the expert frozen "
            "(`peft_glider.train_gates`) or shipped with the expert (`glider_gates.safetensors`); per expert above."
        )


class Arrow(LocalRouter):
    name = "arrow"
    learned = False
    standardized = False

    def initial_vector(self, factors: LoraFactors, in_features: int) -> torch.Tensor:
        return routing.top_right_singular_vector(factors.A.float(), factors.B.float())

    def rows(self, vectors: torch.Tensor, temperature: float) -> torch.Tensor:
        return routing.arrow_rows(vectors, temperature)

    def summary(self, temperature: float) -> str:
        return f"arrow (prototypes, temperature {temperature:g})"

    def how_vectors_are_made(self) -> str:
        return "none: Arrow prototypes (top right singular vector of each expert's `B A`), computed on load."


#: The local routers by the name `GliderConfig.local_router` takes.
LOCAL_ROUTERS: dict[str, LocalRouter] = {router.name: router for router in (Phatgoose(), Arrow())}


def local_router(name: str) -> LocalRouter:
    """The local router named `name`; a ValueError lists the known ones."""
    try:
        return LOCAL_ROUTERS[name]
    except KeyError:
        raise ValueError(f"local_router must be one of {tuple(LOCAL_ROUTERS)}, got {name!r}.") from None
