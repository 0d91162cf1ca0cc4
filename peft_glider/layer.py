"""The Glider layer: wraps a linear layer, holds the experts adapting it and their gates, calls the router."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import routing
from .experts import LoraFactors
from .state import CallRouting, RoutingState

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


_LOCAL_ONLY = CallRouting()  # a call outside any routing context: local scores only

# Fused optimizers (AdamW(fused=True), transformers' default on CPU) update parameters without moving their version
# counters, so cached router rows also key on how many optimizer steps have run in this process.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class GliderLayer(BaseTunerLayer):
    """Routing state of one adapted module for every Glider adapter (keyed by adapter name)."""

    adapter_layer_names = ("glider_gates",)
    other_param_names = (
        "glider_A",
        "glider_B",
        "glider_rank_expert",
        "glider_rank_scaling",
        "glider_slot",
        "glider_spans",
        "glider_k",
        "glider_routing",
        "glider_awaiting_checkpoint",
        "_router_cache",
        "_bank_cache",
    )

    def __init__(
        self, base_layer: nn.Module, module_name: str, save_expert_weights: bool, train_expert_factors: bool = False
    ) -> None:
        self.base_layer = base_layer
        self.module_name = module_name  # as in base_model.named_modules(), e.g. "model.layers.0.self_attn.q_proj"
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or not isinstance(self.get_base_layer(), nn.Linear):
            raise TypeError(
                f"Module '{module_name}' is a {type(self.get_base_layer()).__name__}; Glider adapts nn.Linear layers."
            )
        self.in_features, self.out_features = in_features, out_features
        self.glider_gates = nn.ParameterDict({})  # (E, in) trainable gate vectors
        if train_expert_factors:  # opted in: the factors are trainable parameters, like the gates
            self.adapter_layer_names = ("glider_gates", "glider_A", "glider_B")
            self.glider_A = nn.ParameterDict({})
            self.glider_B = nn.ParameterDict({})
        else:  # frozen buffers, saved only in self-contained adapters
            self.glider_A = BufferDict({}, persistent=save_expert_weights)
            self.glider_B = BufferDict({}, persistent=save_expert_weights)
        # glider_A: (R, in) the experts' A factors concatenated; glider_B: (R, out) their B factors, transposed
        self.glider_rank_expert = BufferDict({}, persistent=False)  # (R,) expert of each rank row
        self.glider_rank_scaling = BufferDict({}, persistent=False)  # (R,) scaling of each rank row
        self.glider_slot = BufferDict({}, persistent=False)  # (E,) position among present experts, -1 if absent
        self.glider_spans: dict[str, list[tuple[int, int] | None]] = {}
        self.glider_k: dict[str, int] = {}  # top_k capped by the number of present experts
        self.glider_routing: dict[str, RoutingState] = {}
        # Adapters restored from a saved config whose expert factors are still zero placeholders: a checkpoint's
        # state dict fills them (see `_note_loaded_factors`); routing refuses to run until it has.
        self.glider_awaiting_checkpoint: dict[str, bool] = {}
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
        self.glider_slot[adapter_name] = torch.where(present, present.long().cumsum(0) - 1, -1)
        self.glider_spans[adapter_name] = spans
        self._bank_cache.pop(adapter_name, None)
        self.glider_k[adapter_name] = min(routing_state.top_k, sum(span is not None for span in spans))
        self.glider_routing[adapter_name] = routing_state
        # Gates take the base layer's dtype (PEFT's `autocast_adapter_dtype` then upcasts half precision to float32),
        # or keep the dtype this adapter's gates already have here (a relayout after add_expert / remove_expert).
        previous = self.glider_gates[adapter_name] if adapter_name in self.glider_gates else None
        gates = torch.zeros(len(experts), self.in_features)
        if routing_state.local_router == "arrow":  # training-free prototypes take the gates' place
            for index, factors in enumerate(experts):
                if factors is not None:
                    gates[index] = routing.top_right_singular_vector(factors.A.float(), factors.B.float())
        if previous is None:
            self.glider_gates[adapter_name] = nn.Parameter(gates)
            self._move_adapter_to_device_of_base_layer(adapter_name, device)
        else:
            self.glider_gates[adapter_name] = nn.Parameter(gates, requires_grad=previous.requires_grad)
            self._move_adapter_to_device_of_base_layer(adapter_name, device, gate_dtype=previous.dtype)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: Optional[torch.device] = None, gate_dtype: Optional[torch.dtype] = None
    ) -> None:
        """Put this adapter's tensors where the base layer computes (accelerate's execution device when
        offloaded, never `meta`); expert factors and gates take the base dtype (gates `gate_dtype` if given)."""
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
        for name in ("glider_rank_expert", "glider_slot"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)
        if adapter_name in self.glider_gates and self.glider_gates[adapter_name].device.type != "meta":
            gates = self.glider_gates[adapter_name]  # meta under low_cpu_mem_usage: the checkpoint fills it
            gate_dtype = gate_dtype or dtype
            self.glider_gates[adapter_name] = nn.Parameter(
                gates.data.to(device, dtype=gate_dtype), requires_grad=gates.requires_grad
            )

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
                A=bank.A[span[0] : span[1]].detach().clone(),
                B=bank.BT[span[0] : span[1]].T.detach().clone(),
                scaling=float(bank.rank_scaling[span[0]]),
            )
            for span in bank.spans
        ]

    def await_checkpoint(self, adapter_name: str) -> None:
        """Mark the adapter's factors here as placeholders that a checkpoint must fill before any forward."""
        self.glider_awaiting_checkpoint[adapter_name] = True

    def _note_loaded_factors(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """load_state_dict pre-hook: a checkpoint that carries an adapter's factors fills its placeholders."""
        for adapter_name in list(self.glider_awaiting_checkpoint):
            if f"{prefix}glider_A.{adapter_name}" in state_dict and f"{prefix}glider_B.{adapter_name}" in state_dict:
                del self.glider_awaiting_checkpoint[adapter_name]

    def _check_weights_loaded(self, adapter_name: str) -> None:
        if adapter_name in self.glider_awaiting_checkpoint:
            raise RuntimeError(
                f"Glider adapter {adapter_name!r} was built from a saved adapter's config, whose experts' weights live "
                f"in its checkpoint, but that checkpoint was never loaded (module {self.module_name!r} still holds "
                "zero placeholders). Call the PeftModel (its forward and generate load the experts from their "
                "sources), or load the adapter with PeftModel.from_pretrained(base_model, path)."
            )

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
        train_expert_factors: bool = False,
    ) -> None:
        super().__init__()
        GliderLayer.__init__(self, base_layer, module_name, save_expert_weights, train_expert_factors)
        self.register_load_state_dict_pre_hook(self._note_loaded_factors)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, experts, routing_state, device)

    def router_rows(self, adapter_name: str) -> torch.Tensor:
        """What tokens are compared with, (E, in) float32: standardized gates (Phatgoose) or prototypes (Arrow).

        When gradients are wanted for the gates (training), the rows are computed from them with autograd, so the
        loss reaches the gates through the routing weights. Otherwise they are cached until the gates change: their
        version counter moves on every in-place update, and any optimizer step (fused ones move no counter) counts.
        """
        gates = self.glider_gates[adapter_name]
        state = self.glider_routing[adapter_name]
        if torch.is_grad_enabled() and gates.requires_grad:
            return self._rows_from_gates(gates.float(), state)
        try:
            key = (gates.data_ptr(), gates._version, _optimizer_steps[0], gates.dtype, state.local_router,
                   state.arrow_temperature)
        except RuntimeError:  # inference tensors keep no version counter: do not cache
            key = None
        cached = self._router_cache.get(adapter_name)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            rows = self._rows_from_gates(gates.detach().float(), state).clone()
        if key is not None:
            self._router_cache[adapter_name] = (key, rows)
        return rows

    @staticmethod
    def _rows_from_gates(gates: torch.Tensor, state: RoutingState) -> torch.Tensor:
        if state.local_router == "arrow":
            return routing.arrow_rows(gates, state.arrow_temperature)
        return routing.phatgoose_rows(gates)

    def routed_delta(
        self, x: torch.Tensor, adapter_name: str, out: Optional[torch.Tensor] = None, call: Optional[CallRouting] = None
    ) -> torch.Tensor:
        """Add the adapter's contribution for input x (..., in) into `out` (N, out), or return it (..., out).

        `call`: what this call routes with (`RoutingState.current_call()`, read once by `forward`); None: local only.
        """
        bank = self.expert_bank(adapter_name)
        state = self.glider_routing[adapter_name]
        call = call or _LOCAL_ONLY
        u = x.reshape(-1, self.in_features)  # (N, in)
        if u.shape[0] == 0:  # an empty batch: nothing to route
            return out if out is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        if u.dtype != bank.A.dtype or u.device != bank.A.device:
            u = u.to(bank.A.device, bank.A.dtype)
        if call.gate_training_expert is not None:
            gate = self.glider_gates[adapter_name][call.gate_training_expert]
            delta = routing.delta_gated_single(u, bank, call.gate_training_expert, gate)
            return delta.view(*x.shape[:-1], self.out_features)
        rows = x.shape[0] if x.dim() > 1 else 1
        selection, delta = routing.route(
            u,
            bank,
            self.router_rows(adapter_name),
            standardized=state.local_router != "arrow",
            k=self.glider_k[adapter_name],
            global_bias=call.global_bias(rows, u.device),
            kernel=state.kernel,
            out=out,
        )
        if call.trace is not None:
            call.trace.record(self.module_name, selection.indices.view(rows, -1, selection.indices.shape[-1]))
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
            self._check_weights_loaded(adapter_name)
            A = self.glider_A[adapter_name]
            call = self.glider_routing[adapter_name].current_call()
            if (
                may_add_in_place
                and result.dtype == A.dtype
                and result.device == A.device
                and (call is None or call.gate_training_expert is None)
            ):
                self.routed_delta(x, adapter_name, out=result.view(-1, self.out_features), call=call)
            else:
                result = result + self.routed_delta(x, adapter_name, call=call).to(result.device, result.dtype)
        return result

    def __repr__(self) -> str:
        return "glider." + super().__repr__()
