"""`LoraFactors`: one expert's LoRA at one module, as the routing, the packing and the local routers read it; its
tensors in memory or read lazily from the expert's files (`experts` makes them)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class LoraFactors:
    """One expert's LoRA at one module: `delta(u) = scaling * (B @ A @ u + bias)`, and for a DoRA expert the
    magnitude vector `m` (out,) that rescales the adapted layer's outputs: `m / ||W + scaling B A||` per output
    row, against the base weight W (see `prepared_for_kernels`).

    The factors are given as tensors, or as shapes plus a `loader` that reads them on first access: a Glider model
    is built one module at a time, so only that module's factors need to be in memory at once. The loader returns
    `(A, B)` followed by the `extras` it names (`"magnitude"`, `"bias"`), in that order.
    """

    __slots__ = ("extras", "_tensors", "_loader", "scaling", "_origin", "rank", "in_features", "out_features")

    #: What an expert may carry beside A and B: DoRA's magnitude vector as saved, B's bias, and, once prepared
    #: against a base weight (`prepared_for_kernels`), DoRA's shift `g - 1` (B then holds `g * B`).
    EXTRAS = ("magnitude", "bias", "shift")

    def __init__(
        self,
        A: Optional[torch.Tensor] = None,  # (r, in_features)
        B: Optional[torch.Tensor] = None,  # (out_features, r)
        scaling: float = 1.0,
        *,
        magnitude: Optional[torch.Tensor] = None,  # (out_features,) DoRA's magnitude vector
        bias: Optional[torch.Tensor] = None,  # (out_features,) the B factor's bias (PEFT's lora_bias)
        shift: Optional[torch.Tensor] = None,  # (out_features,) a prepared DoRA expert's g - 1
        shapes: Optional[tuple[tuple[int, int], tuple[int, int]]] = None,  # (A shape, B shape) when lazy
        loader: Optional[Callable[[], tuple[torch.Tensor, ...]]] = None,
        extras: tuple[str, ...] = (),  # what the loader returns after A and B
        origin: Optional[tuple[str, tuple[str, ...]]] = None,  # (file, each tensor's key), for error messages
    ) -> None:
        if (A is None) != (B is None) or (A is None) == (loader is None):
            raise ValueError("LoraFactors takes A and B, or shapes and a loader.")
        if A is not None:
            extras = tuple(name for name, value in zip(self.EXTRAS, (magnitude, bias, shift)) if value is not None)
        if not set(extras) <= set(self.EXTRAS):
            raise ValueError(f"LoraFactors extras must be among {self.EXTRAS}, got {extras}.")
        self.extras = tuple(name for name in self.EXTRAS if name in extras)  # canonical order
        self._tensors = None if A is None else (A, B, *(t for t in (magnitude, bias, shift) if t is not None))
        self._loader, self.scaling = loader, scaling
        self._origin = origin
        a_shape, b_shape = (tuple(A.shape), tuple(B.shape)) if A is not None else shapes
        self.rank, self.in_features = a_shape
        self.out_features = b_shape[0]

    @property
    def is_dora(self) -> bool:
        return "magnitude" in self.extras

    def dora_prepared(self, weight: torch.Tensor) -> "LoraFactors":
        """A DoRA expert's factors against the base weight W (out, in) float32, as the kernels use them (see
        `prepared_for_kernels`): `g * B` and the shift `g - 1`, with `g = m / ||W + s B A||` per output row."""
        A, B = self.A, self.B
        with torch.no_grad():
            lora = self.scaling * (B.float() @ A.float())  # (out, in)
            g = self.magnitude.float() / torch.linalg.norm(weight.to(B.device) + lora, dim=1)  # (out,)
        return LoraFactors(A, (B.float() * g[:, None]).to(B.dtype), self.scaling, bias=self.bias, shift=(g - 1).to(B.dtype))

    def unloaded(self) -> "LoraFactors":
        """Lazy factors: a copy that reads them on first access and holds them alone (self when given as tensors)."""
        if self._loader is None:
            return self
        shapes = ((self.rank, self.in_features), (self.out_features, self.rank))
        return LoraFactors(scaling=self.scaling, shapes=shapes, loader=self._loader, extras=self.extras,
                           origin=self._origin)

    @property
    def origin(self) -> tuple[str, ...]:
        """Where each tensor (A, B, *extras) comes from, for error messages (formatted when asked: a large library
        keeps thousands of these)."""
        if self._origin is None:
            return ("A", "B", *self.extras)
        path, keys = self._origin
        return tuple(f"tensor '{key}' of {path}" for key in keys)

    def read(self) -> tuple[torch.Tensor, ...]:
        """(A, B, *extras), read from their source when lazy, without keeping them here."""
        return self._tensors if self._loader is None else tuple(self._loader())

    def loaded(self) -> "LoraFactors":
        """These factors as tensors in memory (read from their source once when lazy)."""
        if self._loader is None:
            return self
        A, B, *rest = self.read()
        return LoraFactors(A, B, self.scaling, **dict(zip(self.extras, rest)))

    def _load(self) -> tuple[torch.Tensor, ...]:
        if self._tensors is None:
            self._tensors = tuple(self._loader())
        return self._tensors

    @property
    def A(self) -> torch.Tensor:
        return self._load()[0]

    @property
    def B(self) -> torch.Tensor:
        return self._load()[1]

    def _extra(self, kind: str) -> Optional[torch.Tensor]:
        return self._load()[2 + self.extras.index(kind)] if kind in self.extras else None

    @property
    def magnitude(self) -> Optional[torch.Tensor]:
        return self._extra("magnitude")

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._extra("bias")

    @property
    def shift(self) -> Optional[torch.Tensor]:
        return self._extra("shift")


def prepared_for_kernels(
    experts: Sequence[Optional[LoraFactors]], base_weight: Callable[[], torch.Tensor]
) -> list[Optional[LoraFactors]]:
    """Experts' factors as the kernels use them at a module (None stays None). A DoRA expert computes
    `g * (W x + s B A x)` with `g = m / ||W + s B A||` per output row (the base weight W (out, in) float32 that
    `base_weight` reads, norms over the input axis, as PEFT computes them and detaches them); its delta over the
    base output is `(g - 1) * W x + s (g * B) A x`: B is rescaled by g and `g - 1` kept as the expert's shift (mixed
    by the routing weights, times the base output without its bias). Other factors are returned as they are. The
    base weight is read once, and only when a DoRA expert is among them."""
    weight = None
    prepared = []
    for factors in experts:
        if factors is not None and factors.is_dora:
            weight = base_weight() if weight is None else weight
            factors = factors.dora_prepared(weight)
        prepared.append(factors)
    return prepared
