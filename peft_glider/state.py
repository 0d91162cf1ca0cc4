"""Routing state: the settings an adapter's layers share, and what one call routes with.

`RoutingState` holds an adapter's router settings (top_k, local router, kernel); the model owns it.
`CallRouting` holds what a single call routes with (the library version it began with, global scores, a trace,
the expert under gate training). It
lives in a `contextvars.ContextVar`, never on the model: every thread (and every asyncio task) sees only the
routing it set itself, nested contexts restore exactly what they found, and nothing stays set after a context
exits, exceptions included.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional

import torch

from .local_routers import LOCAL_ROUTERS, local_router
from .routing import Candidates, check_resident, gather_candidates

if TYPE_CHECKING:
    from .bank import ExpertBank
    from .config import GliderConfig
    from .versions import LibraryVersion
    from .local_routers import LocalRouter


@dataclass
class RoutingTrace:
    """What the routers chose, recorded while `GliderModel.routing_trace()` is active.

    `selections[module]` holds one tensor per forward call through that module, shaped (rows, tokens, k): the
    selected expert indices, best first. Rows follow the batch as the module saw it (beams expanded).
    """

    expert_names: list[str]
    selections: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def record(self, module_name: str, indices: torch.Tensor) -> None:
        self.selections[module_name].append(indices.detach().to("cpu"))

    @property
    def modules(self) -> list[str]:
        """Names of the modules that routed at least one token."""
        return sorted(self.selections)

    def counts(self, module_name: Optional[str] = None, first_choice_only: bool = False) -> torch.Tensor:
        """Tokens routed to each expert, (E,), at one module or summed over all modules.

        With `first_choice_only`, count only each token's best expert; otherwise every selected expert counts.
        """
        modules = [module_name] if module_name is not None else self.modules
        total = torch.zeros(len(self.expert_names), dtype=torch.long)
        for name in modules:
            for indices in self.selections[name]:
                chosen = indices[..., 0] if first_choice_only else indices
                total += torch.bincount(chosen.reshape(-1), minlength=len(self.expert_names))
        return total

    def by_layer(self, first_choice_only: bool = False) -> tuple[list[str], torch.Tensor]:
        """Expert usage per layer: (layer names, (L, E) share of the layer's selections going to each expert).

        A layer groups the modules under one numbered block (`model.layers.3.self_attn.q_proj` and
        `model.layers.3.mlp.up_proj` are layer `model.layers.3`), in the model's order; rows sum to 1.
        """
        layers: dict[str, torch.Tensor] = {}
        for module in self.modules:
            parts = module.split(".")
            cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts))
            layer = ".".join(parts[:cut])
            layers[layer] = layers.get(layer, 0) + self.counts(module, first_choice_only)
        names = sorted(layers, key=lambda name: [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")])
        if not names:
            return [], torch.zeros(0, len(self.expert_names))
        counts = torch.stack([layers[name] for name in names]).float()
        return names, counts / counts.sum(dim=1, keepdim=True).clamp_min(1)

    def as_dict(self, first_choice_only: bool = False) -> dict[str, dict[str, int]]:
        """`{module: {expert_name: tokens}}`, JSON-ready."""
        return {
            module: dict(zip(self.expert_names, self.counts(module, first_choice_only).tolist()))
            for module in self.modules
        }


@dataclass(eq=False)  # compared and hashed by identity: it keys the per-call routing of its adapter
class RoutingState:
    """Router settings of one Glider adapter, shared by its layers (per-call inputs live in `CallRouting`)."""

    top_k: int  # experts per token
    candidates: Optional[int] = None  # M: with global scores, experts scored locally per row (None: all)
    local_router: "LocalRouter" = field(default_factory=lambda: LOCAL_ROUTERS["phatgoose"])  # its strategy
    arrow_temperature: float = 1.0  # T of Arrow's |u . v| / T
    kernel: str = "auto"  # "auto" or a forced kernel name (`GliderModel.set_kernel`)

    @classmethod
    def of(cls, config: "GliderConfig") -> "RoutingState":
        """The settings an adapter's config gives."""
        return cls(config.top_k, config.candidates, local_router(config.local_router), config.arrow_temperature)

    def current_call(self) -> Optional["CallRouting"]:
        """What the current call (this thread or task) routes this adapter with; None for plain local routing."""
        return _CALL_ROUTING.get().get(self)


@dataclass(frozen=True)
class CallRouting:
    """What one call routes an adapter with; set by `call_routing`, read by the adapter's layers."""

    row_bias: Optional[torch.Tensor] = None  # (B, E) alpha_b * global score, on the CPU, float32
    row_scores: Optional[torch.Tensor] = None  # (B, E) the global scores, which pick each row's candidates
    trace: Optional[RoutingTrace] = None
    gate_training_expert: Optional[int] = None  # Phatgoose gate training: only this expert, sigmoid-gated
    # The library version the call began with: every layer routes with it to the call's end, whatever is edited.
    version: Optional["LibraryVersion"] = None
    # The bias per device, moved once per call and shared by the layers (not by other calls).
    _bias_on_device: dict = field(default_factory=dict, compare=False, repr=False)
    # Each row's candidates per module's bank, gathered once for the whole call (see `candidates_at`).
    _candidates: dict = field(default_factory=dict, compare=False, repr=False)
    # The compiled routing decisions per module's bank (`routing.FusedRoute`), reused by the call's later forwards
    # (each decoding step).
    kernel_bindings: dict = field(default_factory=dict, compare=False, repr=False)

    def global_bias(self, rows: int, device: torch.device) -> Optional[torch.Tensor]:
        """The global bias for a layer call with `rows` batch rows, (B, E) on `device`, or None (local only).

        A bias set for B rows follows batch expansion: generate() repeats each row (num_beams,
        num_return_sequences) with repeat_interleave, and an encoder-decoder's decoder sees B * beams rows, so
        a call's rows come in B consecutive groups, group b sharing bias row b (see `routing.combine_logits`).
        """
        if self.row_bias is None:
            return None
        set_rows = self.row_bias.shape[0]
        if rows % set_rows != 0:
            raise ValueError(
                f"Global scores were set for {set_rows} rows, but a Glider layer received a batch of {rows} "
                "rows, which is not a multiple of it (rows may only be expanded by beams or return sequences)."
            )
        bias = self._bias_on_device.get(device)
        if bias is None:
            bias = self._bias_on_device[device] = self.row_bias.to(device)
        return bias

    def has_candidates(self, num_candidates: Optional[int]) -> bool:
        """Whether this call routes among candidates: it has global scores and M is below the number of experts."""
        return not (self.row_scores is None or num_candidates is None or num_candidates >= self.row_scores.shape[1])

    def candidates_at(
        self,
        bank: "ExpertBank",
        source: torch.Tensor,
        num_candidates: Optional[int],
        rows_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        row_index: Optional[torch.Tensor] = None,
    ) -> Optional[Candidates]:
        """Each row's M candidate experts at the module of `bank`, with their router rows (gathered from `source`,
        the router rows, or computed by `rows_of` from `source`, the gates; `row_index` (E,): each expert's row of
        `source` under a resident-experts budget) and global bias; None when the call has no global scores or M
        covers every expert. Gathered once per call and module, and checked resident once;
        again when `source` changed, and at every forward while gradients flow into it (gates under training: each
        forward's rows carry its own graph, from the gates as the optimizer left them)."""
        if not self.has_candidates(num_candidates):
            return None
        cached = self._candidates.get(bank)
        if cached is not None and cached.source is source and not (torch.is_grad_enabled() and source.requires_grad):
            return cached
        gathered = gather_candidates(
            self.row_scores, self.row_bias, source, bank.present, num_candidates, rows_of, row_index
        )
        if bank.partial:
            check_resident(bank, gathered)
        self._candidates[bank] = gathered
        return gathered


_CALL_ROUTING: contextvars.ContextVar[Mapping[RoutingState, CallRouting]] = contextvars.ContextVar(
    "peft_glider_call_routing", default={}
)


@contextlib.contextmanager
def call_routing(state: RoutingState, **changes) -> Iterator[CallRouting]:
    """Route the adapter of `state` with `changes` (fields of `CallRouting`) for the calls inside this context,
    in this thread or task only; other fields keep what an enclosing context set."""
    current = _CALL_ROUTING.get()
    previous = current.get(state, CallRouting())
    routing = dataclasses.replace(previous, **changes, _bias_on_device={}, _candidates={}, kernel_bindings={})
    token = _CALL_ROUTING.set({**current, state: routing})
    try:
        yield routing
    finally:
        _CALL_ROUTING.reset(token)
