"""`LayerSnapshot`: one module's experts as one library version holds them, and the router rows computed from its
gates (cached until the gates change); `gate_parameter`, how a layer's gates are made a trainable parameter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .bank import ExpertBank

if TYPE_CHECKING:
    from .state import RoutingState

# Fused optimizers (AdamW(fused=True), transformers' default on CPU) update parameters without moving their version
# counters, so cached router rows also key on how many optimizer steps have run in this process.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class Slots(NamedTuple):
    """Which experts a layer holds, for an adapter whose layers hold only some at a time (a resident-experts
    budget): their rows of the gates (`LayerSnapshot.gate_slot`)."""

    of_expert: torch.Tensor  # (E,) long: each expert's row of the gates, -1 where the layer holds none of it
    count: int  # rows of the gates


class LayerSnapshot:
    """One module's experts as one version of the library holds them: the packed factors, the gates, k.

    Its content never changes: an edit installs new tensors in the layer and makes a new snapshot, so a call that
    holds an older version keeps routing with this one. Only its bindings follow the layer's tensors when they are
    moved or cast (`.to()`, a dtype cast, a checkpoint loaded with `assign=True`): the same values elsewhere.

    `gates` is the layer's trainable parameter; `values` the rows this version routes with (the parameter's data
    when the snapshot was made: where the layer holds only some experts (`Slots`), a change of what it holds gives
    the parameter new data and keeps its identity, for the optimizers that hold it). Row e is expert e's gate, or
    under `Slots` `gate_slot` (E,) says which row holds each held expert's (-1: not held here, its gate kept
    elsewhere: `residency`). The router rows computed from the values are cached here, keyed by the values tensor itself
    (held, so the key cannot be reused by another tensor), its version counter, the optimizer steps taken, dtype
    and device.
    """

    __slots__ = ("bank", "gates", "values", "values_at", "gate_slot", "k", "_rows")

    def __init__(self, bank: ExpertBank, gates: torch.Tensor, k: int, gate_slot: Optional[torch.Tensor] = None) -> None:
        self.bank = bank
        self.gates = gates  # (E, in), or (max_resident_experts, in) under a budget
        self.values = gates.detach()  # the same rows, without autograd; kept when the parameter's data is swapped
        self.values_at = self.values.data_ptr()  # where they are: the layer follows its parameter when it moves
        self.gate_slot = gate_slot  # (E,) long under a budget, on the gates' device; None: row = expert index
        self.k = k  # top_k capped by the number of experts present here
        self._rows: Optional[tuple] = None  # (values, the rest of the key, rows)

    def rebind(self, bank: ExpertBank, gates: torch.Tensor, gate_slot: Optional[torch.Tensor]) -> None:
        """Point at the same values after the layer's tensors were moved or cast."""
        self.bank, self.gates, self.values, self.gate_slot, self._rows = bank, gates, gates.detach(), gate_slot, None
        self.values_at = self.values.data_ptr()

    def is_bound_to(self, A: Optional[torch.Tensor], gates: Optional[torch.Tensor]) -> bool:
        """Whether a layer's A factors and gates are still the tensors this snapshot routes with, where and as they
        were (`.to()` and casts give a parameter new data in place)."""
        bank = self.bank
        return (
            A is bank.A
            and gates is self.gates
            and gates.data_ptr() == self.values_at
            and A.device == bank.device
            and A.dtype == bank.dtype
        )

    @property
    def in_features(self) -> int:
        """The number of values of one gate (the module's input features)."""
        return self.values.shape[1]

    def source(self) -> torch.Tensor:
        """The rows to route with: the trainable parameter when gradients are wanted for it (and it still holds this
        version's rows), else the values."""
        gates = self.gates
        if torch.is_grad_enabled() and gates.requires_grad and gates.data_ptr() == self.values_at:
            return gates
        return self.values

    def row(self, expert: int) -> Optional[int]:
        """The row of `gates` holding expert `expert`'s gate; None when it is not resident (under a budget)."""
        if self.gate_slot is None:
            return expert
        slot = int(self.gate_slot[expert])
        return slot if slot >= 0 else None

    def gate_of(self, expert: int) -> Optional[torch.Tensor]:
        """Expert `expert`'s gate (in,) as this version holds it; None when it is not resident (under a budget)."""
        row = self.row(expert)
        return None if row is None else self.values[row]

    def by_expert(self, source: torch.Tensor) -> torch.Tensor:
        """`source`'s rows (E, in) in expert order (under a budget the rows of experts not resident are another
        expert's: only ever read for experts routing masks out)."""
        return source if self.gate_slot is None else source[self.gate_slot.clamp_min(0)]

    def rows_of(self, gates: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """Router rows (n, in) float32 of some experts' gates (n, in: all of this snapshot's, or a call's candidates'
        under a resident-experts budget), computed now, with autograd when `gates` wants gradients."""
        if torch.is_grad_enabled() and gates.requires_grad:
            return _rows_from_gates(gates.float(), state)
        with torch.no_grad():
            return _rows_from_gates(gates.detach().float(), state)

    def router_rows(self, state: RoutingState) -> torch.Tensor:
        """What tokens are compared with, (E, in) float32: standardized gates (Phatgoose) or prototypes (Arrow).

        When gradients are wanted for the gates (training), the rows are computed from them with autograd, so the
        loss reaches the gates through the routing weights. Otherwise they are cached until the gates change: their
        version counter moves on every in-place update, and any optimizer step (fused ones move no counter) counts.
        """
        source = self.source()
        if source.requires_grad:
            return self.rows_of(self.by_expert(source), state)
        try:
            key = (source._version, _optimizer_steps[0], source.dtype, source.device, state.local_router.name,
                   state.arrow_temperature)
        except RuntimeError:  # inference tensors keep no version counter: do not cache
            key = None
        cached = self._rows
        if key is not None and cached is not None and cached[0] is source and cached[1] == key:
            return cached[2]
        rows = self.rows_of(self.by_expert(source), state).clone()
        if key is not None:
            self._rows = (source, key, rows)
        return rows


def gate_parameter(gates: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """Gates as a parameter that keeps a version counter, whatever mode it is made in. Made under
    `torch.inference_mode()` (a library loaded or edited there) a tensor is an inference tensor, which keeps none:
    its router rows could not be cached and would be recomputed at every module of every forward."""
    with torch.inference_mode(False):
        if gates.is_inference():
            gates = gates.clone()  # outside inference mode the copy is a normal tensor
        return nn.Parameter(gates, requires_grad=requires_grad)


def _rows_from_gates(gates: torch.Tensor, state: RoutingState) -> torch.Tensor:
    return state.local_router.rows(gates, state.arrow_temperature)
