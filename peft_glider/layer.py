"""The Glider layer: wraps a linear layer, holds the experts adapting it and their gates, calls the router."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from . import routing
from .experts import LoraFactors
from .state import RoutingState

MERGE_ERROR = (
    "Glider adapters cannot be merged: each token picks its own experts at every layer, so there is no single "
    "weight delta to merge. Use `unload()` to get the base model back, or keep the Glider model unmerged."
)


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device a module computes on: accelerate's hook execution device if it has one, else its weight's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return None
    return weight.device


class GliderLayer(BaseTunerLayer):
    """Routing state of one adapted module for every Glider adapter (keyed by adapter name)."""

    adapter_layer_names = ("glider_gates",)
    other_param_names = (
        "glider_A",
        "glider_B",
        "glider_rank_expert",
        "glider_rank_scaling",
        "glider_present",
        "glider_slot",
        "glider_spans",
        "glider_k",
        "glider_routing",
        "_router_cache",
        "_bank_cache",
    )

    def __init__(self, base_layer: nn.Module, module_name: str, save_expert_weights: bool) -> None:
        self.base_layer = base_layer
        self.module_name = module_name  # as in base_model.named_modules(), e.g. "model.layers.0.self_attn.q_proj"
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or not isinstance(self.get_base_layer(), nn.Linear):
            raise TypeError(
                f"Module '{module_name}' is a {type(self.get_base_layer()).__name__}; Glider adapts nn.Linear layers."
            )
        self.in_features, self.out_features = in_features, out_features
        self.glider_gates = nn.ParameterDict({})  # (E, in) trainable gate vectors
        self.glider_A = BufferDict({}, persistent=save_expert_weights)  # (R, in) concatenated A factors
        self.glider_B = BufferDict({}, persistent=save_expert_weights)  # (R, out) concatenated B factors, transposed
        self.glider_rank_expert = BufferDict({}, persistent=False)  # (R,) expert of each rank row
        self.glider_rank_scaling = BufferDict({}, persistent=False)  # (R,) scaling of each rank row
        self.glider_present = BufferDict({}, persistent=False)  # (E,) experts adapting this module
        self.glider_slot = BufferDict({}, persistent=False)  # (E,) position among present experts, -1 if absent
        self.glider_spans: dict[str, list[tuple[int, int] | None]] = {}
        self.glider_k: dict[str, int] = {}  # top_k capped by the number of present experts
        self.glider_routing: dict[str, RoutingState] = {}
        self._router_cache: dict[str, tuple] = {}  # adapter -> (gates version key, router rows)
        self._bank_cache: dict[str, routing.ExpertBank] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(
        self,
        adapter_name: str,
        experts: Sequence[Optional[LoraFactors]],
        routing_state: RoutingState,
        device: Optional[torch.device] = None,
    ) -> None:
        """Install one Glider adapter: `experts[e]` is expert e's factors here, or None where it does not adapt."""
        spans, a_rows, b_rows, rank_expert, rank_scaling = [], [], [], [], []
        offset = 0
        for index, factors in enumerate(experts):
            if factors is None:
                spans.append(None)
                continue
            spans.append((offset, offset + factors.rank))
            offset += factors.rank
            a_rows.append(factors.A)
            b_rows.append(factors.B.T)
            rank_expert += [index] * factors.rank
            rank_scaling += [factors.scaling] * factors.rank
        dtype = a_rows[0].dtype
        self.glider_A[adapter_name] = torch.cat(a_rows, dim=0).to(dtype)
        self.glider_B[adapter_name] = torch.cat(b_rows, dim=0).to(dtype)
        self.glider_rank_expert[adapter_name] = torch.tensor(rank_expert, dtype=torch.long)
        self.glider_rank_scaling[adapter_name] = torch.tensor(rank_scaling, dtype=dtype)
        present = torch.tensor([span is not None for span in spans])
        self.glider_present[adapter_name] = present
        self.glider_slot[adapter_name] = torch.where(present, present.long().cumsum(0) - 1, -1)
        self.glider_spans[adapter_name] = spans
        self._bank_cache.pop(adapter_name, None)
        self.glider_k[adapter_name] = min(routing_state.top_k, sum(span is not None for span in spans))
        self.glider_routing[adapter_name] = routing_state
        gates = torch.zeros(len(experts), self.in_features)
        if routing_state.local_router == "arrow":  # training-free prototypes take the gates' place
            for index, factors in enumerate(experts):
                if factors is not None:
                    gates[index] = routing.top_right_singular_vector(factors.A.float(), factors.B.float())
        self.glider_gates[adapter_name] = nn.Parameter(gates)
        self._move_adapter_to_device_of_base_layer(adapter_name, device)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Put this adapter's tensors where the base layer computes (accelerate's execution device when
        offloaded, never `meta`); expert factors take the base dtype, gates stay float32."""
        base_layer = self.get_base_layer()
        device = device or execution_device(base_layer)
        if device is None:
            return
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else None
        for name in ("glider_A", "glider_B", "glider_rank_scaling"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device, dtype=dtype)
        for name in ("glider_rank_expert", "glider_present", "glider_slot"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)
        if adapter_name in self.glider_gates and self.glider_gates[adapter_name].device.type != "meta":
            gates = self.glider_gates[adapter_name]  # meta under low_cpu_mem_usage: the checkpoint fills it
            self.glider_gates[adapter_name] = nn.Parameter(gates.data.to(device), requires_grad=gates.requires_grad)

    def expert_bank(self, adapter_name: str) -> routing.ExpertBank:
        """The adapter's experts here; built once and reused while its tensors stay the same objects."""
        bank = self._bank_cache.get(adapter_name)
        if bank is not None and bank.A is self.glider_A[adapter_name] and bank.BT is self.glider_B[adapter_name]:
            return bank
        bank = self._bank_cache[adapter_name] = routing.ExpertBank(
            A=self.glider_A[adapter_name],
            BT=self.glider_B[adapter_name],
            rank_expert=self.glider_rank_expert[adapter_name],
            rank_scaling=self.glider_rank_scaling[adapter_name],
            spans=self.glider_spans[adapter_name],
            expert_slot=self.glider_slot[adapter_name],
        )
        return bank

    def expert_factors(self, adapter_name: str) -> list[Optional[LoraFactors]]:
        """Each expert's factors at this module (None where it does not adapt it), read back from the bank."""
        bank = self.expert_bank(adapter_name)
        return [
            None
            if span is None
            else LoraFactors(
                A=bank.A[span[0] : span[1]].clone(),
                B=bank.BT[span[0] : span[1]].T.clone(),
                scaling=float(bank.rank_scaling[span[0]]),
            )
            for span in bank.spans
        ]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged."""


class GliderLinear(nn.Module, GliderLayer):
    """A linear layer plus the routed sum of its selected experts' LoRA deltas."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        module_name: str,
        experts: Sequence[Optional[LoraFactors]],
        routing_state: RoutingState,
        save_expert_weights: bool = True,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        GliderLayer.__init__(self, base_layer, module_name, save_expert_weights)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, experts, routing_state, device)

    def router_rows(self, adapter_name: str) -> torch.Tensor:
        """What tokens are compared with, (E, in): standardized gates (Phatgoose) or prototypes (Arrow).

        Cached until the gates change (their version counter moves on every in-place update)."""
        gates = self.glider_gates[adapter_name]
        state = self.glider_routing[adapter_name]
        try:
            key = (gates.data_ptr(), gates._version, state.local_router)
        except RuntimeError:  # inference tensors keep no version counter: do not cache
            key = None
        cached = self._router_cache.get(adapter_name)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            if state.local_router == "arrow":
                rows = routing.arrow_rows(gates, state.arrow_temperature)
            else:
                rows = routing.phatgoose_rows(gates)
            rows = rows.detach().clone()
        if key is not None:
            self._router_cache[adapter_name] = (key, rows)
        return rows

    def routed_delta(self, x: torch.Tensor, adapter_name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the adapter's contribution for input x (..., in) into `out` (N, out), or return it (..., out)."""
        bank = self.expert_bank(adapter_name)
        state = self.glider_routing[adapter_name]
        u = x.reshape(-1, self.in_features)  # (N, in)
        if u.shape[0] == 0:  # an empty batch: nothing to route
            return out if out is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        if u.dtype != bank.A.dtype or u.device != bank.A.device:
            u = u.to(bank.A.device, bank.A.dtype)
        if state.train_expert is not None:
            gate = self.glider_gates[adapter_name][state.train_expert]
            return routing.delta_gated_single(u, bank, state.train_expert, gate).view(*x.shape[:-1], self.out_features)
        rows = x.shape[0] if x.dim() > 1 else 1
        router_rows = self.router_rows(adapter_name)
        k = self.glider_k[adapter_name]
        global_bias = state.global_bias(rows, u.device)
        needs_grad = torch.is_grad_enabled() and (
            u.requires_grad or (global_bias is not None and global_bias.requires_grad)
        )
        kernel = routing.resolve_kernel(state.kernel, u.shape[0], bank, k, u.dtype, needs_grad)
        if kernel == "native" and routing.can_fuse_routing(router_rows, bank):
            standardized = state.local_router != "arrow"
            selection, delta = routing.route_and_apply_native(u, router_rows, standardized, global_bias, k, bank, out)
        else:
            scored = u if u.dtype == router_rows.dtype else u.to(router_rows.dtype)
            if state.local_router == "arrow":
                local = routing.arrow_dots(scored, router_rows)  # (N, E)
            else:
                local = routing.standardized_dots(scored, router_rows)  # (N, E)
            logits = routing.combine_logits(local, global_bias)
            present = None if bank.num_present == bank.num_experts else self.glider_present[adapter_name]
            selection = routing.select_top_k(logits, present, k)
            delta = routing.apply_experts(u, bank, selection, kernel, out)  # (N, out)
        if state.trace is not None:
            state.trace.record(self.module_name, selection.indices.view(rows, -1, selection.indices.shape[-1]))
        return delta if out is not None else delta.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        # Without gradients, the deltas go straight into the base output: no extra (N, out) tensor.
        may_add_in_place = not torch.is_grad_enabled() and result.is_contiguous()
        for adapter_name in self.active_adapters:
            if adapter_name not in self.glider_routing:
                continue
            A = self.glider_A[adapter_name]
            if (
                may_add_in_place
                and result.dtype == A.dtype
                and result.device == A.device
                and self.glider_routing[adapter_name].train_expert is None
            ):
                self.routed_delta(x, adapter_name, out=result.view(-1, self.out_features))
            else:
                result = result + self.routed_delta(x, adapter_name).to(result.device, result.dtype)
        return result

    def __repr__(self) -> str:
        return "glider." + super().__repr__()
