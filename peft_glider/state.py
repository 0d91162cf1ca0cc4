"""Per-adapter routing state shared by all Glider layers of a model (not a module; nothing in the state dict)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch


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

    def as_dict(self, first_choice_only: bool = False) -> dict[str, dict[str, int]]:
        """`{module: {expert_name: tokens}}`, JSON-ready."""
        return {
            module: dict(zip(self.expert_names, self.counts(module, first_choice_only).tolist()))
            for module in self.modules
        }


@dataclass
class RoutingState:
    """Router settings and the per-call routing inputs of one Glider adapter, shared by its layers."""

    top_k: int
    local_router: str = "phatgoose"
    arrow_temperature: float = 1.0
    kernel: str = "auto"
    row_bias: Optional[torch.Tensor] = None  # (B, E) alpha_b * global score, set by GliderModel.global_scores(...)
    trace: Optional[RoutingTrace] = None
    train_expert: Optional[int] = None  # set during Phatgoose gate training: only this expert, sigmoid-gated

    def global_bias(self, rows: int, device: torch.device) -> Optional[torch.Tensor]:
        """The global bias for a call with `rows` batch rows, (B, E) as set, or None for local-only routing.

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
        return self.row_bias if self.row_bias.device == device else self.row_bias.to(device)
