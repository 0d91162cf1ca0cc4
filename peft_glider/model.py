"""`GliderModel`: injects Glider layers into a base model and exposes the routing API."""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import TYPE_CHECKING, Collection, Iterator, Mapping, Optional, Sequence, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .base_layer import execution_device
from .config import ExpertEntry, GliderConfig, check_adapter_name
from .contexts import CallContexts
from .host import AdapterHost
from .layer import MERGE_ERROR, GliderLayer, GliderLinear
from .library import ExpertLibrary
from .snapshot import gate_parameter
from .state import CallRouting, RoutingState, RoutingTrace, call_routing

if TYPE_CHECKING:
    from .global_router import ExpertDescriptions, GlobalRouter, RouteInfo


class GliderModel(BaseTuner):
    """Routes every token, at every adapted linear layer, among a library of LoRA experts (GLIDER).

    Build it with `peft.get_peft_model(model, GliderConfig(experts=[...]))` after `import peft_glider`.
    All experts live inside one PEFT adapter; `expert_names` gives their routing order.

    Routing is local (gate vectors, see `set_gates`) plus `alpha` times the global scores set with
    `global_scores(...)`; outside that context routing is local only and `alpha` has no effect. What a call routes
    with (`global_scores`, `route`, `routing_trace`) belongs to the calling thread or task, never to the model, so
    one model serves concurrent requests.

    In train mode the gates receive gradients through the routing weights (the selected experts' softmax), so a
    plain PyTorch loop or `transformers.Trainer` fine-tunes the router; the experts' factors are frozen buffers
    (trainable parameters too with `GliderConfig(train_expert_factors=True)`).
    """

    prefix: str = "glider_"
    tuner_layer_cls = GliderLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True

    def __init__(self, model: nn.Module, config, adapter_name: str, low_cpu_mem_usage: bool = False, state_dict=None):
        # Plain per-adapter state (kept by nn.Module re-initialisation in BaseTuner.__init__).
        self._routing_states: dict[str, RoutingState] = {}
        self._libraries: dict[str, ExpertLibrary] = {}
        self._call_contexts: dict[str, CallContexts] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ injection

    def _pre_injection_hook(self, model: nn.Module, config: GliderConfig, adapter_name: str) -> None:
        # Model-level container (keyed by adapter name); saved as "base_model.glider_instruction_embeddings".
        if not hasattr(self, "glider_instruction_embeddings"):
            self.glider_instruction_embeddings = BufferDict({}, persistent=True)  # per adapter: (E, e)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Resolve the adapter's expert library, then let PEFT replace the modules the experts adapt.

        As in PEFT, the adapter keeps the config object it was given; its expert entries are completed with what
        pins them (commit, tensor hash, layout), which does not change their meaning: building again from it, or
        from a saved adapter's config, gives the same experts (see `_enable_peft_forward_hooks`). A config object
        already used by another adapter of this model is copied, so adapters never share one.
        """
        check_adapter_name(adapter_name)
        config: GliderConfig = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        library = ExpertLibrary.resolve(config, model)
        fresh = not config.is_resolved  # built from sources now, not restored from a saved adapter
        for entry, expert in zip(config.experts, library.experts):
            entry.update(expert.pins)
        config.target_modules = library.modules
        self._libraries[adapter_name] = library
        library.attach(adapter_name, config, AdapterHost(self, adapter_name))
        self._routing_states[adapter_name] = RoutingState.of(config)
        super().inject_adapter(model, adapter_name, **kwargs)
        if config.instruction_embedding_dim is not None:
            self.glider_instruction_embeddings[adapter_name] = torch.zeros(
                len(config.experts), config.instruction_embedding_dim
            )
        library.begin(self.get_instruction_embeddings(adapter_name), fresh)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """PEFT enters this around every `PeftModel` forward and generate call: the call takes the library version
        current now (unless a routing context it runs in took one already) and keeps it to its end, a whole
        generate included, whatever another thread edits meanwhile.

        An active adapter built from a saved adapter's config whose checkpoint was never loaded into it (e.g.
        `get_peft_model(base, PeftConfig.from_pretrained(path))`) still holds zero placeholders: its experts are
        loaded from their sources at the pinned commits, as a fresh build would, before the call routes anything."""
        with contextlib.ExitStack() as stack:
            for adapter_name in self.active_adapters:
                if adapter_name not in self._routing_states:
                    continue
                state, library = self._routing_states[adapter_name], self._libraries[adapter_name]
                if library.placeholders:  # only until the first call: no walk over the model after
                    library.fill_placeholders(state, self.model)
                call = state.current_call()
                if call is None or call.version is None:  # the call keeps the version it began with, to its end
                    stack.enter_context(call_routing(state, version=self._calls(adapter_name).bare_call_version()))
            yield

    def _prepare_adapter_config(self, peft_config: GliderConfig, model_config: dict) -> GliderConfig:
        return peft_config  # target modules come from the experts (see inject_adapter)

    def _check_new_adapter_config(self, config: GliderConfig) -> None:
        super()._check_new_adapter_config(config)
        for setting in ("save_expert_weights", "train_expert_factors"):
            if len({getattr(c, setting) for c in self.peft_config.values()}) > 1:
                raise ValueError(f"All Glider adapters of a model must share the same {setting} setting.")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        library = self._libraries[adapter_name]
        experts, slots = library.module_factors(current_key), library.residency.slots()
        state = self._routing_states[adapter_name]
        if isinstance(target, GliderLayer):
            target.update_layer(adapter_name, experts, state, library.versions, slots=slots)
        else:
            new_module = GliderLinear(
                target, adapter_name, current_key, experts, state, library.versions, config.save_expert_weights,
                device=execution_device(target), train_expert_factors=config.train_expert_factors, slots=slots,
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        library.residency.adopt(target, experts)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's default moves adapter tensors to the base weight's device, which is `meta` for offloaded layers;
        # GliderLinear already placed them on the execution device.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention for the trainable tensors, the gates: made in the base layer's dtype, upcast from half
        precision to float32 unless `autocast_adapter_dtype=False`. The frozen expert factors keep the base dtype
        either way (PEFT's default cast would upcast every buffer, doubling their memory)."""
        if not autocast_adapter_dtype:
            return
        for layer in self.glider_layers(adapter_name).values():
            gates = layer.glider_gates[adapter_name]
            if gates.dtype in (torch.float16, torch.bfloat16):
                layer.glider_gates[adapter_name] = gate_parameter(gates.data.float(), gates.requires_grad)

    # ------------------------------------------------------------------ merging, deleting

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._routing_states.pop(adapter_name, None)
        self._libraries.pop(adapter_name, None)
        self._call_contexts.pop(adapter_name, None)
        if adapter_name in self.glider_instruction_embeddings:
            del self.glider_instruction_embeddings[adapter_name]

    # ------------------------------------------------------------------ incremental library

    def add_expert(
        self, expert: ExpertEntry, instruction_embedding: Optional[torch.Tensor] = None, adapter_name: Optional[str] = None
    ) -> str:
        """Append one expert (Hub id, folder or entry dict) to the library without touching the others.

        Its shipped gates (glider_gates.safetensors) are installed; pass its instruction embedding when the
        adapter has embeddings. The result equals a model built from scratch with the same experts. Returns
        the new expert's name. Calls already running finish on the library as it was (docs/usage.md).
        """
        return self._libraries[self.resolve_adapter(adapter_name)].add_expert(expert, instruction_embedding)

    def remove_expert(self, name: str, adapter_name: Optional[str] = None) -> None:
        """Remove one expert from the library without touching the others (equal to a rebuild without it)."""
        self._libraries[self.resolve_adapter(adapter_name)].remove_expert(name)

    # ------------------------------------------------------------------ public API

    def resolve_adapter(self, adapter_name: Optional[str] = None) -> str:
        """The Glider adapter's name: `adapter_name`, checked, or the only active adapter's."""
        if adapter_name is None:
            active = self.active_adapters
            if len(active) != 1:
                raise ValueError(f"Several adapters are active ({active}); pass adapter_name.")
            adapter_name = active[0]
        if adapter_name not in self._routing_states:
            raise ValueError(f"No Glider adapter named {adapter_name!r}; have {sorted(self._routing_states)}.")
        return adapter_name

    def glider_layers(self, adapter_name: Optional[str] = None) -> dict[str, GliderLayer]:
        """Module name -> Glider layer holding the adapter (all Glider layers without an adapter name)."""
        return {
            module.module_name: module
            for module in self.model.modules()
            if isinstance(module, GliderLayer) and (adapter_name is None or adapter_name in module.glider_gates)
        }

    @property
    def expert_names(self) -> list[str]:
        """Expert names of the active Glider adapter; the list index is the routing index."""
        return self.expert_names_of(None)

    def expert_names_of(self, adapter_name: Optional[str] = None) -> list[str]:
        """Expert names of an adapter (the active one by default), in routing order."""
        return list(self._libraries[self.resolve_adapter(adapter_name)].versions.current.expert_names)

    def record_gates(self, expert: str, how: str, adapter_name: Optional[str] = None) -> None:
        """Record how an expert's gates were made (e.g. by a gate trainer); shown on the model card."""
        self._libraries[self.resolve_adapter(adapter_name)].record_gates(expert, how)

    def set_gates(
        self,
        gates: Mapping[str, Mapping[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        how: str = "set",
    ) -> None:
        """Set learned gate vectors: `{expert_name: {module_name: tensor(in_features)}}`.

        Module names are as in `base_model.named_modules()` (e.g. `"model.layers.0.self_attn.q_proj"`).
        Gates not given keep their values. Raises on unknown experts or modules, modules the expert does not
        adapt, wrong shapes and non-finite values, before changing anything. `how` says where the gates come from;
        it is recorded in each expert's config entry (`"gates"`) and shown on the model card.
        """
        self._libraries[self.resolve_adapter(adapter_name)].set_gates(gates, how)

    def get_gates(self, adapter_name: Optional[str] = None) -> dict[str, dict[str, torch.Tensor]]:
        """The gate vectors, in the form `set_gates` takes (only modules each expert adapts)."""
        return self._libraries[self.resolve_adapter(adapter_name)].gates()

    def local_call(self, adapter_name: Optional[str] = None) -> CallRouting:
        """What a call without global scores routes with (local routing only): the current library version, every
        expert made resident first under a resident-experts budget. For engines that call the layers themselves
        (`GliderLayer.routed_delta`), as the vLLM plugin does; a `PeftModel` call takes it by itself."""
        return CallRouting(version=self._calls(self.resolve_adapter(adapter_name)).bare_call_version())

    def make_resident(self, experts: Collection[str], adapter_name: Optional[str] = None) -> None:
        """Under a resident-experts budget (`max_resident_experts`), read these experts' factors and gates into the
        layers now (the least recently used others evicted), as entering `route(...)` does for a call's candidates;
        e.g. before training their gates. Nothing without a budget (every expert is resident)."""
        self._libraries[self.resolve_adapter(adapter_name)].residency.make_resident(experts)

    def set_instruction_embeddings(self, embeddings: torch.Tensor, adapter_name: Optional[str] = None) -> None:
        """Set the per-expert instruction embeddings `g_e`, a tensor (E, e) in `expert_names` order."""
        self._libraries[self.resolve_adapter(adapter_name)].set_embeddings(embeddings)

    def get_instruction_embeddings(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """The per-expert instruction embeddings (E, e), or None if none were set."""
        adapter_name = self.resolve_adapter(adapter_name)
        if adapter_name not in self.glider_instruction_embeddings:
            return None
        return self.glider_instruction_embeddings[adapter_name]

    def set_expert_descriptions(
        self,
        descriptions: "ExpertDescriptions",
        router: Optional["GlobalRouter"] = None,
        adapter_name: Optional[str] = None,
    ) -> None:
        """Store what `GlobalRouter.describe` computed, all or nothing: the instruction texts (in the config's expert
        entries), their embeddings, the embedder's id and the `alpha="auto"` threshold (when calibrated). With
        `router`, it becomes the one `route(...)` uses for this adapter."""
        adapter_name = self.resolve_adapter(adapter_name)
        self._libraries[adapter_name].set_descriptions(descriptions)
        if router is not None:
            self.set_global_router(router, adapter_name)

    def global_router(self, adapter_name: Optional[str] = None) -> Optional["GlobalRouter"]:
        """The router `route(...)` uses for the adapter when given none (None until one is set or rebuilt)."""
        return self._calls(adapter_name).router

    def set_global_router(self, router: "GlobalRouter", adapter_name: Optional[str] = None) -> None:
        """Make `router` the one `route(...)` uses for the adapter."""
        self._calls(adapter_name).router = router

    def _calls(self, adapter_name: Optional[str]) -> CallContexts:
        """The routing contexts of the adapter (the active one by default), made once per adapter."""
        adapter = self.resolve_adapter(adapter_name)
        contexts = self._call_contexts.get(adapter)
        if contexts is None:
            contexts = self._call_contexts[adapter] = CallContexts(
                self.peft_config[adapter],
                self._routing_states[adapter],
                self._libraries[adapter],
                embeddings=functools.partial(self.get_instruction_embeddings, adapter),  # copies and pickles
            )
        return contexts

    def global_scores(
        self,
        scores: torch.Tensor,
        alpha: Optional[Union[float, torch.Tensor]] = None,
        adapter_name: Optional[str] = None,
    ) -> contextlib.AbstractContextManager[torch.Tensor]:
        """Route the calls inside with per-row global scores `scores` (B, E), e.g. cosines `cos(q_b, g_e)`.

        Row b of every batch inside belongs to query b; rows expanded by `generate` (beams, return sequences)
        inherit their query's scores. The logit of expert e becomes `local + alpha_b * scores[b, e]`, with
        `alpha_b` from `alpha` (a number or a (B,) tensor) or else from the config (for `alpha="auto"`, by the
        calibrated threshold rule). Yields the per-row alpha used.

        The scores hold for the calls this thread (or asyncio task) makes inside the context; other threads keep
        their own. Contexts nest: the inner one wins until it exits, and nothing stays set afterwards. The calls
        inside route with the library as it was when the context was entered, whatever another thread edits.
        """
        return self._calls(adapter_name).global_scores(scores, alpha)

    def route(
        self,
        prompts: Optional[Union[str, Sequence[str]]] = None,
        task_samples: Optional[Sequence] = None,
        router: Optional["GlobalRouter"] = None,
        adapter_name: Optional[str] = None,
    ) -> contextlib.AbstractContextManager["RouteInfo"]:
        """Route the calls inside by the prompts' own instructions (per query) or their task's (`task_samples`).

        `prompts` is one prompt (a string) or a list of them, one per batch row. Per task, the rows (`len(prompts)`,
        or one) share one instruction written from `task_samples`. Uses `router`, or the `GlobalRouter` that
        described this adapter's experts, or else the one the adapter records (a shared adapter loaded elsewhere:
        rebuilt on first use when its instructions came from the samples writer). Yields a `RouteInfo` with the
        instructions, scores, per-row alpha and the time spent in the LLM and the embedder. Like `global_scores`,
        it holds for this thread or task only.
        """
        return self._calls(adapter_name).route(prompts, task_samples, router)

    def routing_trace(self, adapter_name: Optional[str] = None) -> contextlib.AbstractContextManager[RoutingTrace]:
        """Record which experts each token picks at each module during the calls inside (off otherwise); only the
        calls of this thread or task are recorded."""
        return self._calls(adapter_name).trace()

    def set_kernel(self, kernel: str, adapter_name: Optional[str] = None) -> None:
        """Force a kernel for the experts' products ("concat", "gather", "sparse", "native", the compiled one that
        also routes, or "triton", on a GPU; see `kernels.KERNELS`) or let each call's shapes decide ("auto", the
        default). A forced kernel that cannot run a call falls back to "concat"."""
        from .kernels import KERNELS

        if kernel not in KERNELS:
            raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
        self._routing_states[self.resolve_adapter(adapter_name)].kernel = kernel

    def routing_state(self, adapter_name: Optional[str] = None) -> RoutingState:
        """The shared routing state (top_k, alpha, kernel) of an adapter."""
        return self._routing_states[self.resolve_adapter(adapter_name)]
