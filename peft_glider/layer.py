"""The Glider layer: wraps a linear layer, holds the experts adapting it and their gates, calls the router."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import routing
from .bank import ExpertBank, Packed, expert_slots, pack_experts
from .kernels import delta_gated_single, output_terms
from .experts import LoraFactors
from .state import CallRouting, RoutingState

if TYPE_CHECKING:
    from .library import ExpertLibrary, LibraryVersion

MERGE_ERROR = (
    "Glider adapters cannot be merged: each token picks its own experts at every layer, so there is no single "
    "weight delta to merge. Use `unload()` to get the base model back, or keep the Glider model unmerged."
)


def is_linear(module: nn.Module) -> bool:
    """Whether Glider can adapt `module`: an nn.Linear, or transformers' Conv1D (GPT-2 family: its weight is stored
    transposed, (in, out); LoRA factors are the same as for a linear layer)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as (out, in), dequantized (bitsandbytes, torchao), in float32; read from accelerate's
    offload (CPU or disk) when the layer is dispatched with it."""
    from accelerate.utils import align_module_device
    from peft.utils.integrations import dequantize_module_weight
    from transformers.pytorch_utils import Conv1D

    with align_module_device(module):
        weight = dequantize_module_weight(module).detach().float()
    return weight.T if isinstance(module, Conv1D) else weight


def base_bias(module: nn.Module, device: torch.device) -> Optional[torch.Tensor]:
    """The base layer's bias (None without one), read from accelerate's offload when the layer is offloaded (its
    tensors are on `meta` outside its forward)."""
    bias = getattr(module, "bias", None)
    if bias is None or bias.device.type != "meta":
        return bias
    from accelerate.utils import align_module_device

    with align_module_device(module, device):
        return module.bias.detach().clone()


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


class LayerSnapshot:
    """One module's experts as one version of the library holds them: the packed factors, the gates, k.

    Its content never changes: an edit installs new tensors in the layer and makes a new snapshot, so a call that
    holds an older version keeps routing with this one. Only its bindings follow the layer's tensors when they are
    moved or cast (`.to()`, a dtype cast, a checkpoint loaded with `assign=True`): the same values elsewhere.

    `gates` is the layer's trainable parameter; `values` the rows this version routes with (the parameter's data
    when the snapshot was made: under a resident-experts budget a residency change gives the parameter new data
    and keeps its identity, for the optimizers that hold it). Without a budget row e is expert e's gate; under one
    `gate_slot` (E,) says which row holds each resident expert's (-1: not resident, its gate in the library's
    `GateStore`). The router rows computed from the values are cached here, keyed by the values tensor itself
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


def _dora_prepared(factors: LoraFactors, weight: torch.Tensor) -> LoraFactors:
    """A DoRA expert's factors against the base weight (out, in) float32: `g * B` and the shift `g - 1` (see
    `GliderLayer.prepared`)."""
    A, B = factors.A, factors.B
    with torch.no_grad():
        lora = factors.scaling * (B.float() @ A.float())  # (out, in)
        g = factors.magnitude.float() / torch.linalg.norm(weight.to(B.device) + lora, dim=1)  # (out,)
    return LoraFactors(A, (B.float() * g[:, None]).to(B.dtype), factors.scaling, bias=factors.bias,
                       shift=(g - 1).to(B.dtype))


def _packed_to(packed: Packed, device: torch.device, dtype: Optional[torch.dtype]) -> Packed:
    """The packed tensors on `device`, the floating ones in `dtype` (None: kept)."""
    floating = {name: getattr(packed, name) for name in ("A", "BT", "rank_scaling", "shift", "bias")}
    moved = {name: None if t is None else t.to(device, dtype=dtype) for name, t in floating.items()}
    return packed._replace(rank_expert=packed.rank_expert.to(device), **moved)


def _storage(container: nn.Module) -> dict[str, torch.Tensor]:
    """The dict in which a ParameterDict or BufferDict keeps its tensors, by adapter name (torch and accelerate
    move, cast and load tensors in place in it, and an edit replaces its entries: the dict itself stays)."""
    return container._parameters if isinstance(container, nn.ParameterDict) else container._buffers


def _rows_from_gates(gates: torch.Tensor, state: RoutingState) -> torch.Tensor:
    return state.local_router.rows(gates, state.arrow_temperature)


class GliderLayer(BaseTunerLayer):
    """Routing state of one adapted module for every Glider adapter (keyed by adapter name).

    The tensors in `glider_gates`, `glider_A`, `glider_B` are what PEFT saves, loads, moves and casts; what a call
    routes with is the `LayerSnapshot` of this module in the library version the call holds (`snapshot_in`). Every
    change to the experts here goes through `_install`, which makes new tensors and a new snapshot and never
    writes into tensors an older snapshot holds.
    """

    adapter_layer_names = ("glider_gates",)
    other_param_names = (
        "glider_A",
        "glider_B",
        "glider_rank_expert",
        "glider_rank_scaling",
        "glider_slot",
        "glider_gate_slot",
        "glider_shift",
        "glider_bias",
        "glider_spans",
        "glider_adapts",
        "glider_routing",
        "glider_library",
        "glider_awaiting_checkpoint",
        "released_in",
        "_installed",
    )

    def __init__(
        self, base_layer: nn.Module, module_name: str, save_expert_weights: bool, train_expert_factors: bool = False
    ) -> None:
        self.base_layer = base_layer
        self.module_name = module_name  # as in base_model.named_modules(), e.g. "model.layers.0.self_attn.q_proj"
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or not is_linear(self.get_base_layer()):
            raise TypeError(
                f"Module '{module_name}' is a {type(self.get_base_layer()).__name__}; Glider adapts linear layers "
                "(nn.Linear, transformers' Conv1D)."
            )
        self.in_features, self.out_features = in_features, out_features
        # (E, in) trainable gate vectors; under a resident-experts budget (max_resident_experts, in): the resident
        # experts' gates, at the rows `glider_gate_slot` (E,) gives (-1: not resident, in the library's GateStore)
        self.glider_gates = nn.ParameterDict({})
        self.glider_gate_slot = BufferDict({}, persistent=False)
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
        # (E, out) per-expert output terms, only where some expert has one: DoRA's g - 1 (its B factors above are
        # stored rescaled by g) and the B factors' biases. Saved with the factors they were made with.
        self.glider_shift = BufferDict({}, persistent=save_expert_weights)
        self.glider_bias = BufferDict({}, persistent=save_expert_weights)
        # Where those containers keep the tensors, read directly at every call (`snapshot_in`): their own lookups
        # pass through nn.Module's attribute fallback, ~1 microsecond each, at every module of every decoding step.
        self._live_A, self._live_B, self._live_gates = (
            _storage(self.glider_A), _storage(self.glider_B), _storage(self.glider_gates)
        )
        self.glider_spans: dict[str, list[tuple[int, int] | None]] = {}
        # (E,) bool: the experts adapting this module, for an adapter with a resident-experts budget (its factors
        # here are the resident experts' only); absent otherwise (the spans say it).
        self.glider_adapts: dict[str, torch.Tensor] = {}
        self.glider_routing: dict[str, RoutingState] = {}
        self.glider_library: dict[str, "ExpertLibrary"] = {}  # publishes the versions calls route with
        # Adapters restored from a saved config whose expert factors are still zero placeholders: a checkpoint's
        # state dict fills them (see `_note_loaded_factors`); routing refuses to run until it has.
        self.glider_awaiting_checkpoint: dict[str, bool] = {}
        self._installed: dict[str, Optional[LayerSnapshot]] = {}  # the snapshot of what the tensors here hold now
        self.released_in: dict[str, int] = {}  # adapter -> the library version from which it takes no part here
        self._disable_adapters = False
        self.merged_adapters = []

    # ------------------------------------------------------------------ installing experts

    def update_layer(
        self,
        adapter_name: str,
        experts: Sequence[Optional[LoraFactors]],
        routing_state: RoutingState,
        library: "ExpertLibrary",
        device: Optional[torch.device] = None,
        resident: Optional[Collection[int]] = None,
    ) -> LayerSnapshot:
        """Install one Glider adapter: `experts[e]` is expert e's factors here, or None where it does not adapt.
        `resident`: under a resident-experts budget, the experts whose factors are read and held here (the others
        only adapt it; None: all).

        Factors take the base layer's dtype and execution device. Gates take the base layer's dtype too (PEFT's
        `autocast_adapter_dtype` then upcasts half precision to float32), or keep the dtype this adapter's gates
        already have here; under Arrow they hold the experts' prototypes. Under a budget the gates of experts not
        resident go to the library's `GateStore`."""
        self.glider_routing[adapter_name] = routing_state
        self.glider_library[adapter_name] = library
        previous = self.glider_gates[adapter_name] if adapter_name in self.glider_gates else None
        adapts = gate_slot = None
        if resident is not None:
            adapts = torch.tensor([factors is not None for factors in experts])
            gate_slot = library.gate_slots()
        held = self.prepared([f if resident is None or i in resident else None for i, f in enumerate(experts)])
        gates = torch.zeros(len(experts) if resident is None else library.budget, self.in_features)
        for index, factors in enumerate(experts):
            if factors is None:
                continue
            gate = self._initial_gate(held[index] or factors, routing_state)
            row = index if gate_slot is None else int(gate_slot[index])
            if row >= 0:
                gates[row] = gate
            elif gate.any():  # zeros need no writing: a row never written reads as zeros
                library.keep_cold_gate(self.module_name, index, gate)
        packed = pack_experts(held, (self.in_features, self.out_features))
        device, dtype = self._placement(device)
        if device is not None:
            packed = _packed_to(packed, device, dtype)
            adapts = None if adapts is None else adapts.to(device)
            gate_slot = None if gate_slot is None else gate_slot.to(device)
            gates = gates.to(device, dtype=previous.dtype if previous is not None else dtype)
        requires_grad = previous.requires_grad if previous is not None else True
        snapshot = self._install(adapter_name, packed, gate_parameter(gates, requires_grad), adapts, gate_slot)
        self.set_adapter(self.active_adapters)
        return snapshot

    def _placement(self, device: Optional[torch.device] = None) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        """Where and in which dtype the adapter's tensors live: the base layer's execution device (accelerate's when
        offloaded, never `meta`; None when unknown) and its floating dtype."""
        base_layer = self.get_base_layer()
        device = device or execution_device(base_layer)
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else None
        return device, dtype

    def prepared(self, experts: Sequence[Optional[LoraFactors]]) -> list[Optional[LoraFactors]]:
        """Experts' factors as the kernels use them here (None stays None). A DoRA expert computes
        `g * (W x + s B A x)` with `g = m / ||W + s B A||` per output row (the base weight W, norms over the input
        axis, as PEFT computes them and detaches them); its delta over the base output is
        `(g - 1) * W x + s (g * B) A x`: B is rescaled by g and `g - 1` kept as the expert's shift (mixed by the
        routing weights, times the base output without its bias). Other factors are returned as they are. The base
        weight is read once, and only when a DoRA expert is among them."""
        weight = None
        prepared = []
        for factors in experts:
            if factors is not None and factors.is_dora:
                weight = base_weight(self.get_base_layer()) if weight is None else weight
                factors = _dora_prepared(factors, weight)
            prepared.append(factors)
        return prepared

    def _initial_gate(self, factors: LoraFactors, state: RoutingState) -> torch.Tensor:
        """A new expert's gate here: zeros (Phatgoose, until trained or set), or its prototype (Arrow)."""
        return state.local_router.initial_vector(factors, self.in_features)

    def append_expert(
        self, adapter_name: str, factors: Optional[LoraFactors], gate: Optional[torch.Tensor] = None
    ) -> LayerSnapshot:
        """Add one expert after the others (None: it does not adapt this module), with its gate (default zeros, or
        its prototype under Arrow). The other experts' factors and gates are not copied out or changed. Under a
        resident-experts budget it starts out of residence: its gate goes to the library's `GateStore`."""
        current = self.installed_snapshot(adapter_name)
        bank, state = current.bank, self.glider_routing[adapter_name]
        adapts = bank.adapts
        with torch.no_grad():
            held = self.prepared([factors])[0] if adapts is None else None
            packed = bank.appended(held)
            if gate is None:
                gate = torch.zeros(self.in_features) if factors is None else self._initial_gate(held or factors, state)
            if adapts is not None:
                adapts = torch.cat([adapts, torch.tensor([factors is not None], device=adapts.device)])
                gate_slot = torch.cat([current.gate_slot, current.gate_slot.new_full((1,), -1)])
                if factors is not None and gate.any():
                    self.glider_library[adapter_name].keep_cold_gate(self.module_name, bank.num_experts, gate)
                return self._install(adapter_name, packed, current.gates, adapts, gate_slot)
            old_gates = current.gates.detach()
            gates = torch.cat([old_gates, gate.to(old_gates.device, old_gates.dtype)[None]])
        return self._install(adapter_name, packed, gate_parameter(gates, current.gates.requires_grad))

    def remove_expert(self, adapter_name: str, index: int) -> Optional[LayerSnapshot]:
        """Drop expert `index` here; None (and nothing changed) when it is the only expert adapting this module.
        Under a budget the gate rows stay as they are (the library frees the expert's slot)."""
        current = self.installed_snapshot(adapter_name)
        bank = current.bank
        if bank.adapting(index) and bank.num_adapting == 1:
            return None
        keep = [i for i in range(bank.num_experts) if i != index]
        with torch.no_grad():
            packed = bank.without(index)
            if bank.adapts is not None:
                return self._install(adapter_name, packed, current.gates, bank.adapts[keep], current.gate_slot[keep])
            gates = current.gates.detach()[keep]
        return self._install(adapter_name, packed, gate_parameter(gates, current.gates.requires_grad))

    def install_resident(
        self,
        adapter_name: str,
        experts: Sequence[Optional[LoraFactors]],
        gate_slot: torch.Tensor,
        incoming: Mapping[int, torch.Tensor],
    ) -> LayerSnapshot:
        """Hold exactly these experts' factors here (None: not resident, or not adapting this module), under a
        resident-experts budget, with the gates at the rows `gate_slot` (E,) gives; `incoming` (row -> (in,)) the
        gates of the experts made resident now. The gate parameter keeps its identity (an optimizer may hold it) and
        takes new data: the snapshots of older versions keep the rows they route with."""
        current = self.installed_snapshot(adapter_name)
        bank = current.bank
        with torch.no_grad():
            packed = pack_experts(self.prepared(experts), (self.in_features, self.out_features))
            packed = _packed_to(packed, bank.device, bank.dtype)
            self._swap_gate_rows(adapter_name, current, incoming)
        return self._install(adapter_name, packed, current.gates, bank.adapts, gate_slot.to(current.values.device))

    def replace_gates(self, adapter_name: str, rows: Mapping[int, torch.Tensor]) -> LayerSnapshot:
        """New gates `rows` (expert index -> (in,) vector); the factors stay as they are. Without a budget the gates
        are a new tensor; under one the resident experts' rows are new data of the same parameter, the others go to
        the library's `GateStore`."""
        current = self.installed_snapshot(adapter_name)
        with torch.no_grad():
            if current.gate_slot is None:
                gates = current.gates.detach().clone()
                for index, vector in rows.items():
                    gates[index] = vector.to(gates.device, gates.dtype)
                self._installed[adapter_name] = None
                self.glider_gates[adapter_name] = gate_parameter(gates, current.gates.requires_grad)
            else:
                resident = {}
                for index, vector in rows.items():
                    row = current.row(index)
                    if row is None:
                        self.glider_library[adapter_name].keep_cold_gate(self.module_name, index, vector)
                    else:
                        resident[row] = vector
                self._swap_gate_rows(adapter_name, current, resident)
        return self._snapshot_installed(adapter_name)

    def _swap_gate_rows(self, adapter_name: str, current: LayerSnapshot, rows: Mapping[int, torch.Tensor]) -> None:
        """Give the gate parameter new data: `current`'s values with `rows` (row -> (in,)) replaced (nothing when
        there are none). `current` keeps the old data as its values, and is marked uninstalled first: calls of
        older versions must not follow the parameter to the new data."""
        self._installed[adapter_name] = None
        if not rows:
            return
        values = current.values.clone()
        for row, vector in rows.items():
            values[row] = vector.to(values.device, values.dtype)
        current.gates.data = values

    def release(self, adapter_name: str, version_number: int) -> None:
        """No expert of the adapter adapts this module any more from version `version_number` on: drop its tensors
        here. Calls still holding an older version keep routing with that version's snapshot; the layer stays in
        the model until none does (`released_in` tells which release a later retirement is for)."""
        self.released_in[adapter_name] = version_number
        self._installed[adapter_name] = None
        for name in ("glider_gates", "glider_A", "glider_B", "glider_rank_expert", "glider_rank_scaling", "glider_slot",
                     "glider_gate_slot", "glider_shift", "glider_bias", "glider_spans", "glider_adapts",
                     "glider_awaiting_checkpoint", "_installed"):  # fmt: skip
            container = getattr(self, name)
            if adapter_name in container:
                del container[adapter_name]

    def _install(
        self,
        adapter_name: str,
        packed: Packed,
        gates: nn.Parameter,
        adapts: Optional[torch.Tensor] = None,
        gate_slot: Optional[torch.Tensor] = None,
    ) -> LayerSnapshot:
        """Make these the adapter's tensors here and snapshot them. Nothing an older snapshot holds is written to.
        Under a resident-experts budget: `adapts` (E,) bool, the experts adapting the module, and `gate_slot` (E,),
        each resident expert's row of `gates` (None, None: no budget)."""
        self._installed[adapter_name] = None  # calls of older versions must not rebind to what follows
        self.glider_A[adapter_name] = packed.A
        self.glider_B[adapter_name] = packed.BT
        self.glider_rank_expert[adapter_name] = packed.rank_expert
        self.glider_rank_scaling[adapter_name] = packed.rank_scaling
        self.glider_slot[adapter_name] = expert_slots(packed.spans).to(packed.rank_expert.device)
        self.glider_spans[adapter_name] = packed.spans
        for container, terms in ((self.glider_shift, packed.shift), (self.glider_bias, packed.bias)):
            if terms is not None:
                container[adapter_name] = terms
            elif adapter_name in container:
                del container[adapter_name]
        if adapts is not None:
            self.glider_adapts[adapter_name] = adapts
            self.glider_gate_slot[adapter_name] = gate_slot
        self.glider_gates[adapter_name] = gates
        return self._snapshot_installed(adapter_name)

    def _snapshot_installed(self, adapter_name: str) -> LayerSnapshot:
        bank = self._bank(adapter_name)
        k = min(self.glider_routing[adapter_name].top_k, bank.num_adapting)
        gate_slot = _storage(self.glider_gate_slot).get(adapter_name)
        snapshot = LayerSnapshot(bank, self.glider_gates[adapter_name], k, gate_slot)
        self._installed[adapter_name] = snapshot
        return snapshot

    def _bank(self, adapter_name: str) -> ExpertBank:
        return ExpertBank(
            A=self.glider_A[adapter_name],
            BT=self.glider_B[adapter_name],
            rank_expert=self.glider_rank_expert[adapter_name],
            rank_scaling=self.glider_rank_scaling[adapter_name],
            spans=self.glider_spans[adapter_name],
            expert_slot=self.glider_slot[adapter_name],
            adapts=self.glider_adapts.get(adapter_name),
            shift=self.glider_shift[adapter_name] if adapter_name in self.glider_shift else None,
            bias=self.glider_bias[adapter_name] if adapter_name in self.glider_bias else None,
        )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's hook: put this adapter's tensors where the base layer computes, in its dtype (the snapshot
        follows them on the next call)."""
        device, dtype = self._placement(device)
        if device is None:
            return
        for name in ("glider_A", "glider_B", "glider_rank_scaling", "glider_shift", "glider_bias"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device, dtype=dtype)
        for name in ("glider_rank_expert", "glider_slot", "glider_gate_slot", "glider_adapts"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)
        if adapter_name in self.glider_gates and self.glider_gates[adapter_name].device.type != "meta":
            gates = self.glider_gates[adapter_name]  # meta under low_cpu_mem_usage: the checkpoint fills it
            self.glider_gates[adapter_name] = gate_parameter(gates.data.to(device, dtype=dtype), gates.requires_grad)

    # ------------------------------------------------------------------ what calls route with

    def installed_snapshot(self, adapter_name: str) -> LayerSnapshot:
        """The snapshot of the adapter's tensors as they are here now (for edits, which hold the library's lock)."""
        snapshot = self._installed.get(adapter_name)
        if snapshot is None:
            return self._snapshot_installed(adapter_name)
        self._follow_moves(snapshot, adapter_name)
        return snapshot

    def snapshot_in(self, version: "LibraryVersion", adapter_name: str) -> Optional[LayerSnapshot]:
        """This module's experts in `version` (None where the adapter takes no part here in that version).

        Never builds a snapshot from the layer's tensors, which an edit in another thread may be replacing. The hot
        path of every layer call: a dict read and a few identity checks."""
        snapshot = version.layers.get(self.module_name)
        if snapshot is None or snapshot is not self._installed.get(adapter_name):
            return snapshot
        bank = snapshot.bank
        A, gates = self._live_A.get(adapter_name), self._live_gates.get(adapter_name)
        if A is None or gates is None:  # released by an edit meanwhile
            return snapshot
        if (
            A is not bank.A
            or gates is not snapshot.gates
            or gates.data_ptr() != snapshot.values_at  # `.to()` and casts give a parameter new data in place
            or A.device != bank.device
            or A.dtype != bank.dtype
        ):
            self._follow_moves(snapshot, adapter_name)
        return snapshot

    def _follow_moves(self, snapshot: LayerSnapshot, adapter_name: str) -> None:
        """Rebind the installed snapshot to the layer's tensors when they were moved or cast (not edited: an edit
        makes a new snapshot). The tensors are read before checking that `snapshot` is still the installed one, and
        an edit marks it uninstalled before it replaces any tensor, so an edit's tensors are never bound here."""
        bank = snapshot.bank
        A, BT = self._live_A.get(adapter_name), self._live_B.get(adapter_name)
        gates = self._live_gates.get(adapter_name)
        if (
            A is bank.A
            and BT is bank.BT
            and gates is snapshot.gates
            and gates.data_ptr() == snapshot.values_at
            and A.device == bank.device
            and A.dtype == bank.dtype
        ):
            return
        if gates is not None and gates.is_inference():  # loaded with assign=True under inference mode
            gates = self._live_gates[adapter_name] = gate_parameter(gates, gates.requires_grad)
        try:
            moved = self._bank(adapter_name)
        except (KeyError, AttributeError):  # released by an edit meanwhile
            return
        if snapshot is self._installed.get(adapter_name) and moved.A is A and gates is not None:
            snapshot.rebind(moved, gates, _storage(self.glider_gate_slot).get(adapter_name))

    def adapts(self, adapter_name: str, expert: int) -> bool:
        """Whether expert `expert` (routing index) of the adapter adapts this module, as the layer holds it now."""
        return self.expert_bank(adapter_name).adapting(expert)

    def gate_parameter(self, adapter_name: str) -> nn.Parameter:
        """The adapter's trainable gates here (prototypes under Arrow): (E, in), one row per expert, or under a
        resident-experts budget (max_resident_experts, in), the resident experts' rows (see `gate_row`)."""
        return self.glider_gates[adapter_name]

    def gate_row(self, adapter_name: str, expert: int) -> Optional[int]:
        """The row of `gate_parameter` holding expert `expert`'s gate; None when it is not resident (budget)."""
        return self.installed_snapshot(adapter_name).row(expert)

    def full_gates(self, adapter_name: str) -> torch.Tensor:
        """Every expert's gate here, (E, in) in the parameter's dtype and device, zeros where an expert does not
        adapt the module: the parameter itself without a budget, assembled from it and the library's `GateStore`
        under one (what a checkpoint holds either way)."""
        snapshot = self.installed_snapshot(adapter_name)
        if snapshot.gate_slot is None:
            return snapshot.values
        bank, library = snapshot.bank, self.glider_library[adapter_name]
        full = snapshot.values.new_zeros(bank.num_experts, self.in_features)
        if full.device.type == "meta":  # laid out for a checkpoint to fill (low_cpu_mem_usage)
            return full
        for index in range(bank.num_experts):
            if bank.adapting(index):
                gate = snapshot.gate_of(index)
                full[index] = gate if gate is not None else library.cold_gate(self.module_name, index, self.in_features)
        return full

    def _full_gates_in_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """state_dict post-hook: under a budget a checkpoint holds every expert's gates (`full_gates`), as without
        one, not the resident rows. Left as they are for `keep_vars=True` (the caller wants the parameters)."""
        for adapter_name in self.glider_gate_slot:
            key = f"{prefix}glider_gates.{adapter_name}"
            if key in state_dict and not isinstance(state_dict[key], nn.Parameter):
                state_dict[key] = self.full_gates(adapter_name).detach().clone()

    def _resident_gates_from_checkpoint(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """load_state_dict pre-hook: under a budget a checkpoint's (E, in) gates are split into the resident rows,
        which the parameter loads, and the others, which go to the library's `GateStore`."""
        for adapter_name in self.glider_gate_slot:
            key = f"{prefix}glider_gates.{adapter_name}"
            full = state_dict.get(key)
            snapshot = self.installed_snapshot(adapter_name)
            bank = snapshot.bank
            if full is None or tuple(full.shape) != (bank.num_experts, self.in_features):
                continue  # torch reports the mismatch, naming the key
            library = self.glider_library[adapter_name]
            values = snapshot.values
            rows = full.new_zeros(values.shape) if values.device.type == "meta" else values.clone().to(full)
            for index in range(bank.num_experts):
                if bank.adapting(index):
                    row = snapshot.row(index)
                    if row is None:
                        library.keep_cold_gate(self.module_name, index, full[index])
                    else:
                        rows[row] = full[index]
            state_dict[key] = rows

    def expert_bank(self, adapter_name: str) -> ExpertBank:
        """The adapter's experts here as the layer holds them now."""
        return self.installed_snapshot(adapter_name).bank

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
        library: "ExpertLibrary",
        save_expert_weights: bool = True,
        device: Optional[torch.device] = None,
        train_expert_factors: bool = False,
        resident: Optional[Collection[int]] = None,
    ) -> None:
        super().__init__()
        GliderLayer.__init__(self, base_layer, module_name, save_expert_weights, train_expert_factors)
        self.register_load_state_dict_pre_hook(self._note_loaded_factors)
        self.register_load_state_dict_pre_hook(self._resident_gates_from_checkpoint)
        # registered unbound (torch marks the hook function; a bound method takes no attributes): called as
        # hook(module, state_dict, prefix, metadata)
        self.register_state_dict_post_hook(GliderLayer._full_gates_in_state_dict)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, experts, routing_state, library, device, resident)

    def routed_delta(
        self,
        x: torch.Tensor,
        snapshot: LayerSnapshot,
        state: RoutingState,
        call: Optional[CallRouting] = None,
        out: Optional[torch.Tensor] = None,
        base: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Add the contribution of `snapshot`'s experts for input x (..., in) into `out` (N, out), or return it
        (..., out). `call`: what this call routes with (read once by `forward`); None: local only. `base` (N, out):
        the base layer's output without its bias, which DoRA experts' shifts multiply (`base_output`)."""
        bank = snapshot.bank
        call = call or _LOCAL_ONLY
        u = x.reshape(-1, self.in_features)  # (N, in)
        if u.shape[0] == 0:  # an empty batch: nothing to route
            return out if out is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        if u.dtype != bank.A.dtype or u.device != bank.A.device:
            u = u.to(bank.A.device, bank.A.dtype)
        source = snapshot.source()  # (E, in), or the resident rows under a budget
        if call.gate_training_expert is not None:
            gate = source[snapshot.row(call.gate_training_expert)]
            delta = delta_gated_single(u, bank, call.gate_training_expert, gate, base)
            return delta.view(*x.shape[:-1], self.out_features)
        batch_rows = x.shape[0] if x.dim() > 1 else 1
        if bank.adapts is not None and call.has_candidates(state.candidates):
            # A resident-experts budget: only the call's candidates' rows are computed (once per call and module),
            # never the rows of all E experts, which would grow with the library, not the budget.
            rows_of = lambda gates: snapshot.rows_of(gates, state)  # noqa: E731
            candidates = call.candidates_at(bank, source, state.candidates, rows_of, snapshot.gate_slot)
            router_rows = candidates.rows
        else:
            router_rows = snapshot.router_rows(state)
            candidates = call.candidates_at(bank, router_rows, state.candidates)
        selection, delta = routing.route(
            u,
            bank,
            router_rows,
            standardized=state.local_router.standardized,
            k=snapshot.k,
            global_bias=call.global_bias(batch_rows, u.device),
            kernel=state.kernel,
            out=out,
            candidates=candidates,
            bindings=None if call is _LOCAL_ONLY else call.kernel_bindings,  # the shared default keeps none
            want_selection=call.trace is not None or bank.has_output_terms,
        )
        if bank.has_output_terms:
            terms = output_terms(selection, bank, base)
            delta = delta.add_(terms.to(delta.dtype)) if out is not None or not delta.requires_grad else delta + terms
        if call.trace is not None:
            call.trace.record(self.module_name, selection.indices.view(batch_rows, -1, selection.indices.shape[-1]))
        return delta if out is not None else delta.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        routed = []  # (state, call, snapshot) of each active adapter taking part here
        scales_base = False  # whether a DoRA expert is here: it scales the base output itself
        for adapter_name in self.active_adapters:
            library = self.glider_library.get(adapter_name)
            if library is None:
                continue
            state = self.glider_routing[adapter_name]
            call = state.current_call()
            # The version the call began with (pinned by the model's forward hook or a routing context); a bare call
            # of the inner model, outside both, reads the current one.
            version = call.version if call is not None and call.version is not None else library.current
            snapshot = self.snapshot_in(version, adapter_name)
            if snapshot is None:  # the adapter takes no part here in this version
                continue
            self._check_weights_loaded(adapter_name)
            routed.append((state, call, snapshot))
            scales_base = scales_base or snapshot.bank.shift is not None
        base = self.base_output(result) if scales_base else None  # taken before any delta is added to it
        # Without gradients, the deltas go straight into the base output: no extra (N, out) tensor.
        may_add_in_place = not torch.is_grad_enabled() and result.is_contiguous()
        for state, call, snapshot in routed:
            A = snapshot.bank.A
            if (
                may_add_in_place
                and result.dtype == A.dtype
                and result.device == A.device
                and (call is None or call.gate_training_expert is None)
            ):
                self.routed_delta(x, snapshot, state, call, out=result.view(-1, self.out_features), base=base)
            else:
                delta = self.routed_delta(x, snapshot, state, call, base=base)
                result = result + delta.to(result.device, result.dtype)
        return result

    def base_output(self, result: torch.Tensor) -> torch.Tensor:
        """(N, out): the base layer's output `W x` without its bias (a copy), as DoRA's rescaling takes it."""
        base = result.reshape(-1, self.out_features)
        bias = base_bias(self.get_base_layer(), base.device)
        return base - bias.to(base.dtype) if bias is not None else base.clone()

    def __repr__(self) -> str:
        return "glider." + super().__repr__()
