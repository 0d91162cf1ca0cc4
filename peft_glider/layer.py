"""The Glider layer: wraps a linear layer, holds the experts adapting it and their gates, calls the router.

A layer holds what it is given: every expert's factors and gates (row e of the gates is expert e's), or only some
experts' factors and their gates at the rows its `Slots` give (`update_layer`, `hold_experts`), which experts and
where the others' gates are being decided by whoever gives the slots. It computes the routed delta of what it holds.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn

from . import routing
from .bank import ExpertBank, Packed, expert_slots, pack_experts
from .base_layer import base_bias, base_weight, execution_device, is_linear
from .factors import LoraFactors, prepared_for_kernels
from .kernels import delta_gated_single, output_terms
from .snapshot import LayerSnapshot, Slots, gate_parameter
from .state import CallRouting, RoutingState
from .versions import LibraryVersion, Versions

MERGE_ERROR = (
    "Glider adapters cannot be merged: each token picks its own experts at every layer, so there is no single "
    "weight delta to merge. Use `unload()` to get the base model back, or keep the Glider model unmerged."
)

_LOCAL_ONLY = CallRouting()  # a call outside any routing context: local scores only


def _storage(container: nn.Module) -> dict[str, torch.Tensor]:
    """The dict in which a ParameterDict or BufferDict keeps its tensors, by adapter name (torch and accelerate
    move, cast and load tensors in place in it, and an edit replaces its entries: the dict itself stays)."""
    return container._parameters if isinstance(container, nn.ParameterDict) else container._buffers


class GliderLayer(BaseTunerLayer):
    """Routing state of one adapted module for every Glider adapter (keyed by adapter name).

    The tensors in `glider_gates`, `glider_A`, `glider_B` are what PEFT saves, loads, moves and casts; what a call
    routes with is the `LayerSnapshot` of this module in the library version the call holds (`snapshot_in`). Every
    change to the experts here goes through `_install`, which makes new tensors and a new snapshot and never
    writes into tensors an older snapshot holds.
    """

    adapter_layer_names = ("glider_gates",)
    other_param_names = (
        "glider_A", "glider_B", "glider_rank_expert", "glider_rank_scaling", "glider_slot", "glider_gate_slot",
        "glider_shift", "glider_bias", "glider_spans", "glider_adapts", "glider_routing", "glider_versions",
        "glider_awaiting_checkpoint", "released_in", "_installed",
    )  # fmt: skip

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
        # (E, in) trainable gate vectors; where the layer holds only some experts, (slots, in): their gates, at the
        # rows `glider_gate_slot` (E,) gives (-1: not held here)
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
        # (E,) bool: the experts adapting this module, for an adapter whose factors here are some experts' only
        # (`Slots`); absent otherwise (the spans say it).
        self.glider_adapts: dict[str, torch.Tensor] = {}
        self.glider_routing: dict[str, RoutingState] = {}
        self.glider_versions: dict[str, Versions] = {}  # where the versions calls route with are published
        # Adapters restored from a saved config whose expert factors are still zero placeholders: a checkpoint's
        # state dict fills them (see `_note_loaded_factors`); routing refuses to run until it has.
        self.glider_awaiting_checkpoint: dict[str, bool] = {}
        self._installed: dict[str, Optional[LayerSnapshot]] = {}  # the snapshot of what the tensors here hold now
        self.released_in: dict[str, int] = {}  # adapter -> the library version from which it takes no part here
        self._disable_adapters = False
        self.merged_adapters = []

    # ------------------------------------------------------------------ installing experts

    def update_layer(
        self, adapter_name: str, experts: Sequence[Optional[LoraFactors]], routing_state: RoutingState,
        versions: Versions, device: Optional[torch.device] = None, slots: Optional[Slots] = None,
    ) -> LayerSnapshot:  # fmt: skip
        """Install one Glider adapter: `experts[e]` is expert e's factors here, or None where it does not adapt.
        `slots`: hold only the experts with a row there, their gates at those rows (the others only adapt the
        module: their factors are not read); None: every expert, row e.

        Factors take the base layer's dtype and execution device. Gates take the base layer's dtype too (PEFT's
        `autocast_adapter_dtype` then upcasts half precision to float32), or keep the dtype this adapter's gates
        already have here; under Arrow they hold the experts' prototypes."""
        self.glider_routing[adapter_name] = routing_state
        self.glider_versions[adapter_name] = versions
        previous = self.glider_gates[adapter_name] if adapter_name in self.glider_gates else None
        adapts = gate_slot = None
        rows = list(range(len(experts)))
        if slots is not None:
            adapts = torch.tensor([factors is not None for factors in experts])
            gate_slot, rows = slots.of_expert, slots.of_expert.tolist()
            experts = [factors if row >= 0 else None for factors, row in zip(experts, rows)]
        held = self.prepared(experts)
        gates = torch.zeros(len(experts) if slots is None else slots.count, self.in_features)
        for factors, row in zip(held, rows):
            if factors is not None:
                gates[row] = routing_state.local_router.initial_vector(factors, self.in_features)
        packed = pack_experts(held, (self.in_features, self.out_features))
        device, dtype = self._placement(device)
        if device is not None:
            packed = packed.to(device, dtype)
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
        """Experts' factors as the kernels use them here (`factors.prepared_for_kernels`: DoRA's against this base
        layer's weight)."""
        return prepared_for_kernels(experts, lambda: base_weight(self.get_base_layer()))

    def initial_gate(self, adapter_name: str, factors: LoraFactors) -> torch.Tensor:
        """A new expert's gate here: zeros (Phatgoose, until trained or set), or its prototype (Arrow)."""
        return self.glider_routing[adapter_name].local_router.initial_vector(factors, self.in_features)

    def append_expert(
        self, adapter_name: str, factors: Optional[LoraFactors], gate: Optional[torch.Tensor] = None
    ) -> LayerSnapshot:
        """Add one expert after the others (None: it does not adapt this module), with its gate (default zeros, or
        its prototype under Arrow). The other experts' factors and gates are not copied out or changed. A layer that
        holds only some experts (`Slots`) does not hold the new one: its gate is kept elsewhere (`gate` unused)."""
        current = self.installed_snapshot(adapter_name)
        bank = current.bank
        adapts = bank.adapts
        with torch.no_grad():
            if adapts is not None:
                adapts = torch.cat([adapts, torch.tensor([factors is not None], device=adapts.device)])
                gate_slot = torch.cat([current.gate_slot, current.gate_slot.new_full((1,), -1)])
                return self._install(adapter_name, bank.appended(None), current.gates, adapts, gate_slot)
            held = self.prepared([factors])[0]
            if gate is None:
                gate = torch.zeros(self.in_features) if held is None else self.initial_gate(adapter_name, held)
            old_gates = current.gates.detach()
            gates = torch.cat([old_gates, gate.to(old_gates.device, old_gates.dtype)[None]])
        return self._install(adapter_name, bank.appended(held), gate_parameter(gates, current.gates.requires_grad))

    def remove_expert(self, adapter_name: str, index: int) -> Optional[LayerSnapshot]:
        """Drop expert `index` here; None (and nothing changed) when it is the only expert adapting this module.
        Under `Slots` the gate rows stay as they are (whoever gave the slots frees the expert's)."""
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

    def hold_experts(
        self, adapter_name: str, experts: Sequence[Optional[LoraFactors]], gate_slot: torch.Tensor,
        incoming: Mapping[int, torch.Tensor],
    ) -> LayerSnapshot:  # fmt: skip
        """Hold exactly these experts' factors here (None: not held, or not adapting this module), in a layer that
        holds only some experts (`Slots`), with the gates at the rows `gate_slot` (E,) gives; `incoming` (row ->
        (in,)) the gates of the experts held from now on. The gate parameter keeps its identity (an optimizer may
        hold it) and takes new data: the snapshots of older versions keep the rows they route with."""
        current = self.installed_snapshot(adapter_name)
        bank = current.bank
        with torch.no_grad():
            packed = pack_experts(self.prepared(experts), (self.in_features, self.out_features))
            packed = packed.to(bank.device, bank.dtype)
            self._swap_gate_rows(adapter_name, current, incoming)
        return self._install(adapter_name, packed, current.gates, bank.adapts, gate_slot.to(current.values.device))

    def set_gate_rows(self, adapter_name: str, rows: Mapping[int, torch.Tensor]) -> LayerSnapshot:
        """New gates at these rows (row -> (in,); row e is expert e's, or a slot's under `Slots`), the factors as they
        are: a new gate tensor, or under `Slots` new data of the same parameter (an optimizer may hold it)."""
        current = self.installed_snapshot(adapter_name)
        with torch.no_grad():
            if current.gate_slot is None:
                gates = current.gates.detach().clone()
                for row, vector in rows.items():
                    gates[row] = vector.to(gates.device, gates.dtype)
                self._installed[adapter_name] = None
                self.glider_gates[adapter_name] = gate_parameter(gates, current.gates.requires_grad)
            else:
                self._swap_gate_rows(adapter_name, current, rows)
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
        self, adapter_name: str, packed: Packed, gates: nn.Parameter, adapts: Optional[torch.Tensor] = None,
        gate_slot: Optional[torch.Tensor] = None,
    ) -> LayerSnapshot:  # fmt: skip
        """Make these the adapter's tensors here and snapshot them. Nothing an older snapshot holds is written to.
        Where the layer holds only some experts (`Slots`): `adapts` (E,) bool, the experts adapting the module, and
        `gate_slot` (E,), each held expert's row of `gates` (None, None: it holds every expert)."""
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
        """The snapshot of the adapter's tensors as they are here now (for edits, which hold the adapter's edit lock)."""
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
        A, gates = self._live_A.get(adapter_name), self._live_gates.get(adapter_name)
        if A is not None and gates is not None and not snapshot.is_bound_to(A, gates):  # None: released meanwhile
            self._follow_moves(snapshot, adapter_name)
        return snapshot

    def _follow_moves(self, snapshot: LayerSnapshot, adapter_name: str) -> None:
        """Rebind the installed snapshot to the layer's tensors when they were moved or cast (not edited: an edit
        makes a new snapshot). The tensors are read before checking that `snapshot` is still the installed one, and
        an edit marks it uninstalled before it replaces any tensor, so an edit's tensors are never bound here."""
        A, BT = self._live_A.get(adapter_name), self._live_B.get(adapter_name)
        gates = self._live_gates.get(adapter_name)
        if BT is snapshot.bank.BT and snapshot.is_bound_to(A, gates):
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
        """The adapter's trainable gates here (prototypes under Arrow): (E, in), one row per expert, or where the
        layer holds only some experts (`Slots`) one row per slot (`LayerSnapshot.row` says whose)."""
        return self.glider_gates[adapter_name]

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
        self, base_layer: nn.Module, adapter_name: str, module_name: str, experts: Sequence[Optional[LoraFactors]],
        routing_state: RoutingState, versions: Versions, save_expert_weights: bool = True,
        device: Optional[torch.device] = None, train_expert_factors: bool = False, slots: Optional[Slots] = None,
    ) -> None:  # fmt: skip
        super().__init__()
        GliderLayer.__init__(self, base_layer, module_name, save_expert_weights, train_expert_factors)
        self.register_load_state_dict_pre_hook(self._note_loaded_factors)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, experts, routing_state, versions, device, slots)

    def routed_delta(
        self, x: torch.Tensor, snapshot: LayerSnapshot, state: RoutingState, call: Optional[CallRouting] = None,
        out: Optional[torch.Tensor] = None, base: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:  # fmt: skip
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
        source = snapshot.source()  # (E, in), or one row per slot (`Slots`)
        if call.gate_training_expert is not None:
            gate = source[snapshot.row(call.gate_training_expert)]
            delta = delta_gated_single(u, bank, call.gate_training_expert, gate, base)
            return delta.view(*x.shape[:-1], self.out_features)
        batch_rows = x.shape[0] if x.dim() > 1 else 1
        if bank.adapts is not None and call.has_candidates(state.candidates):
            # Some experts held (`Slots`): only the call's candidates' rows are computed (once per call and module),
            # never the rows of all E experts, which would grow with the library, not with what is held.
            rows_of = lambda gates: snapshot.rows_of(gates, state)  # noqa: E731
            candidates = call.candidates_at(bank, source, state.candidates, rows_of, snapshot.gate_slot)
            router_rows = candidates.rows
        else:
            router_rows = snapshot.router_rows(state)
            candidates = call.candidates_at(bank, router_rows, state.candidates)
        selection, delta = routing.route(
            u, bank, router_rows, standardized=state.local_router.standardized, k=snapshot.k,
            global_bias=call.global_bias(batch_rows, u.device), kernel=state.kernel, out=out, candidates=candidates,
            bindings=None if call is _LOCAL_ONLY else call.kernel_bindings,  # the shared default keeps none
            want_selection=call.trace is not None or bank.has_output_terms,
        )  # fmt: skip
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
            versions = self.glider_versions.get(adapter_name)
            if versions is None:
                continue
            state = self.glider_routing[adapter_name]
            call = state.current_call()
            # The version the call began with (pinned by the model's forward hook or a routing context); a bare call
            # of the inner model, outside both, reads the current one.
            version = call.version if call is not None and call.version is not None else versions.current
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
