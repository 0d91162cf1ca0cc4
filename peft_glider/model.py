"""`GliderModel`: injects Glider layers into a base model and exposes the routing API."""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import _get_submodules
from torch import nn

from .config import ExpertEntry, GliderConfig, normalize_expert_entry
from .experts import LoadedExpert, load_expert
from .hub import GATES_FILE
from .layer import MERGE_ERROR, GliderLayer, GliderLinear, execution_device
from .library import ExpertLibrary, LibraryVersion, check_fits
from .routing import auto_alpha
from .state import RoutingState, RoutingTrace, call_routing
from ._warnings import warn_user

if TYPE_CHECKING:
    from .global_router import ExpertDescriptions, GlobalRouter, RouteInfo


_PLACEHOLDER_LOCK = threading.Lock()  # one loader of placeholders at a time (module level: models stay copyable)


def _check_adapter_name(adapter_name: str) -> None:
    # PEFT's state-dict filter drops keys containing ".{other_adapter}.", and "." or "/" break key parsing.
    if not adapter_name or adapter_name.isdigit() or any(ch in adapter_name for ch in "./\\"):
        raise ValueError(
            f"Invalid Glider adapter name {adapter_name!r}: use a non-numeric name without '.', '/' or '\\'."
        )


class GliderModel(BaseTuner):
    """Routes every token, at every adapted linear layer, among a library of LoRA experts (GLIDER).

    Build it with `peft.get_peft_model(model, GliderConfig(experts=[...]))` after `import peft_glider`.
    All experts live inside one PEFT adapter; `expert_names` gives their routing order.

    Routing is local (gate vectors, see `set_gates`) plus `alpha` times the global scores set with
    `global_scores(...)`; outside that context routing is local only and `alpha` has no effect. What a call routes
    with (`global_scores`, `route`, `routing_trace`) belongs to the calling thread or task, never to the model, so
    one model serves concurrent requests.

    In train mode the gates receive gradients through the routing weights (the selected experts' softmax), so a
    plain PyTorch loop or `transformers.Trainer` fine-tunes the router; the experts' factors are frozen buffers.
    """

    prefix: str = "glider_"
    tuner_layer_cls = GliderLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True

    def __init__(self, model: nn.Module, config, adapter_name: str, low_cpu_mem_usage: bool = False, state_dict=None):
        # Plain per-adapter state (kept by nn.Module re-initialisation in BaseTuner.__init__).
        self._routing_states: dict[str, RoutingState] = {}
        self._libraries: dict[str, ExpertLibrary] = {}
        self._awaiting_checkpoint: set[str] = set()  # adapters whose layers were laid out as placeholders
        self._global_routers: dict[str, "GlobalRouter"] = {}
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
        _check_adapter_name(adapter_name)
        config: GliderConfig = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        library = ExpertLibrary.resolve(config, model)
        fresh = not config.is_resolved  # built from sources now, not restored from a saved adapter
        for entry, expert in zip(config.experts, library.experts):
            entry.update(expert.pins)
        config.target_modules = library.modules
        self._libraries[adapter_name] = library
        self._routing_states[adapter_name] = RoutingState(
            top_k=config.top_k,
            local_router=config.local_router,
            arrow_temperature=config.arrow_temperature,
        )
        super().inject_adapter(model, adapter_name, **kwargs)
        if config.instruction_embedding_dim is not None:
            self.glider_instruction_embeddings[adapter_name] = torch.zeros(
                len(config.experts), config.instruction_embedding_dim
            )
        library.publish(
            expert_names=tuple(config.expert_names),
            layers={name: layer.installed_snapshot(adapter_name) for name, layer in self.glider_layers(adapter_name).items()},
            embeddings=self.get_instruction_embeddings(adapter_name),
        )
        if library.placeholders:
            for layer in self.glider_layers(adapter_name).values():
                layer.await_checkpoint(adapter_name)
            self._awaiting_checkpoint.add(adapter_name)
        elif config.local_router == "phatgoose":
            self._install_shipped_gates(library.experts, adapter_name, warn=fresh)

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
                if adapter_name in self._awaiting_checkpoint:  # only until the first call: no walk over the model after
                    self._load_placeholders_from_sources(adapter_name)
                state = self._routing_states[adapter_name]
                call = state.current_call()
                if call is None or call.version is None:  # the call keeps the version it began with, to its end
                    stack.enter_context(call_routing(state, version=self._current_version(adapter_name)))
            yield

    def _load_placeholders_from_sources(self, adapter_name: str) -> None:
        with _PLACEHOLDER_LOCK:
            waiting = {
                name: layer
                for name, layer in self.glider_layers(adapter_name).items()
                if adapter_name in layer.glider_awaiting_checkpoint
            }
            if not waiting:  # its checkpoint filled every placeholder
                self._awaiting_checkpoint.discard(adapter_name)
                return
            config: GliderConfig = self.peft_config[adapter_name]
            try:
                library = ExpertLibrary.resolve(config, self.model, placeholders=False)
            except (OSError, ValueError) as error:
                raise RuntimeError(
                    f"Glider adapter {adapter_name!r} comes from a saved adapter's config, but its checkpoint was never "
                    "loaded and its experts could not be loaded from their sources either. Load it with "
                    f"PeftModel.from_pretrained(base_model, path) (or peft_glider.load_glider). Cause: {error}"
                ) from error
            state, published = self._routing_states[adapter_name], self._libraries[adapter_name]
            with published.editing:
                snapshots = dict(published.current.layers)
                for name, layer in waiting.items():
                    snapshots[name] = layer.update_layer(adapter_name, library.module_factors(name), state, published)
                    del layer.glider_awaiting_checkpoint[adapter_name]
                published.publish(layers=snapshots)
            self._awaiting_checkpoint.discard(adapter_name)
            if config.local_router == "phatgoose":
                self._install_shipped_gates(library.experts, adapter_name, warn=False)

    def _install_shipped_gates(self, experts: list[LoadedExpert], adapter_name: str, warn: bool = True) -> None:
        """Set the gates experts carry (glider_gates.safetensors); warn, naming them, about experts without."""
        self.set_gates({e.name: e.gates for e in experts if e.gates is not None}, adapter_name, how="shipped with the expert")
        if warn:
            self._warn_ungated([e.name for e in experts if e.gates is None])

    @staticmethod
    def _warn_ungated(names: list[str]) -> None:
        if names:
            warn_user(
                f"Experts {names} carry no trained gates ({GATES_FILE}): their local routing is uninformed "
                "until gates are trained (peft_glider.train_missing_gates) or set (GliderModel.set_gates)."
            )

    def _prepare_adapter_config(self, peft_config: GliderConfig, model_config: dict) -> GliderConfig:
        return peft_config  # target modules come from the experts (see inject_adapter)

    def _check_new_adapter_config(self, config: GliderConfig) -> None:
        super()._check_new_adapter_config(config)
        for setting in ("save_expert_weights", "train_expert_factors"):
            if len({getattr(c, setting) for c in self.peft_config.values()}) > 1:
                raise ValueError(f"All Glider adapters of a model must share the same {setting} setting.")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        library = self._libraries[adapter_name]
        experts = library.module_factors(current_key)
        state = self._routing_states[adapter_name]
        if isinstance(target, GliderLayer):
            target.update_layer(adapter_name, experts, state, library)
            return
        new_module = GliderLinear(
            target,
            adapter_name,
            module_name=current_key,
            experts=experts,
            routing_state=state,
            library=library,
            save_expert_weights=config.save_expert_weights,
            device=execution_device(target),
            train_expert_factors=config.train_expert_factors,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
                layer.glider_gates[adapter_name] = nn.Parameter(gates.data.float(), requires_grad=gates.requires_grad)

    # ------------------------------------------------------------------ merging, deleting

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._routing_states.pop(adapter_name, None)
        self._libraries.pop(adapter_name, None)
        self._awaiting_checkpoint.discard(adapter_name)
        self._global_routers.pop(adapter_name, None)
        if adapter_name in self.glider_instruction_embeddings:
            del self.glider_instruction_embeddings[adapter_name]

    # ------------------------------------------------------------------ incremental library

    def add_expert(
        self,
        expert: ExpertEntry,
        instruction_embedding: Optional[torch.Tensor] = None,
        adapter_name: Optional[str] = None,
    ) -> str:
        """Append one expert (Hub id, folder or entry dict) to the library without touching the others.

        Its shipped gates (glider_gates.safetensors) are installed; pass its instruction embedding when the
        adapter has embeddings. The result equals a model built from scratch with the same experts. Returns
        the new expert's name.
        """
        adapter_name = self._adapter(adapter_name)
        config: GliderConfig = self.peft_config[adapter_name]
        entry = normalize_expert_entry(expert, len(config.experts))
        if entry["name"] in config.expert_names:
            raise ValueError(f"add_expert: an expert named {entry['name']!r} exists already; give another 'name'.")
        embeddings = self.get_instruction_embeddings(adapter_name)
        if (embeddings is None) != (instruction_embedding is None):
            raise ValueError(
                "add_expert: pass an instruction_embedding exactly when the adapter has instruction embeddings."
            )
        if embeddings is not None:
            instruction_embedding = torch.as_tensor(instruction_embedding).reshape(1, -1)
            if instruction_embedding.shape[1] != embeddings.shape[1] or not torch.isfinite(instruction_embedding).all():
                raise ValueError(f"add_expert: the instruction embedding must be {embeddings.shape[1]} finite values.")
        loaded = load_expert(entry)
        modules = dict(self.model.named_modules())
        for module_name, factors in loaded.factors.items():
            check_fits(loaded.name, module_name, factors, modules)
        shipped = config.local_router == "phatgoose" and loaded.gates is not None
        gates = loaded.gates if shipped else {}
        for module_name, vector in gates.items():
            factors = loaded.factors.get(module_name)
            check_gate(loaded.name, module_name, vector, factors.in_features if factors else None, "add_expert")
        entry.update(loaded.pins)
        if shipped:
            entry["gates"] = "shipped with the expert"

        library = self._libraries[adapter_name]
        with library.editing:
            library.add(
                loaded,
                adapter_name,
                self.glider_layers(adapter_name),
                wrap=lambda module_name: self._wrap_module(config, adapter_name, module_name),
                gates={name: torch.as_tensor(vector) for name, vector in gates.items()},
                embedding=instruction_embedding,
            )
            config.experts.append(entry)
            config.target_modules = sorted(self.glider_layers(adapter_name))
            if embeddings is not None:
                self.glider_instruction_embeddings[adapter_name] = library.current.embeddings
        if config.local_router == "phatgoose" and not shipped:
            self._warn_ungated([loaded.name])
        return loaded.name

    def _wrap_module(self, config: GliderConfig, adapter_name: str, module_name: str) -> GliderLayer:
        """Make the Glider layer of a module the adapter did not adapt yet (the library's experts say what)."""
        parent, target, target_name = _get_submodules(self.model, module_name)
        self._create_and_replace(config, adapter_name, target, target_name, parent, module_name)
        return _get_submodules(self.model, module_name)[1]

    def remove_expert(self, name: str, adapter_name: Optional[str] = None) -> None:
        """Remove one expert from the library without touching the others (equal to a rebuild without it)."""
        adapter_name = self._adapter(adapter_name)
        config: GliderConfig = self.peft_config[adapter_name]
        names = config.expert_names
        if name not in names:
            raise KeyError(f"remove_expert: unknown expert {name!r}; experts are {names}.")
        if len(names) == 1:
            raise ValueError("remove_expert: a Glider adapter needs at least one expert.")
        if config.top_k > len(names) - 1:
            raise ValueError(f"remove_expert: top_k={config.top_k} would exceed the {len(names) - 1} experts left.")
        index = names.index(name)
        library = self._libraries[adapter_name]
        with library.editing:
            library.remove(
                index, adapter_name, self.glider_layers(adapter_name),
                retire=lambda module_names, number: self._retire_layers(adapter_name, module_names, number),
            )  # fmt: skip
            del config.experts[index]
            config.target_modules = sorted(self.glider_layers(adapter_name))
            if library.current.embeddings is not None:
                self.glider_instruction_embeddings[adapter_name] = library.current.embeddings

    def _retire_layers(self, adapter_name: str, module_names: list[str], number: int) -> None:
        """Take the layers released in library version `number` out of the model once no call routes through them
        any more: unwrap a layer that holds no other adapter, else drop the adapter's last references there. A
        module the adapter adapts again (an expert added since), or released again later, is left alone."""
        library = self._libraries.get(adapter_name)
        with library.editing if library is not None else contextlib.nullcontext():
            for module_name in module_names:
                try:
                    parent, layer, target_name = _get_submodules(self.model, module_name)
                except AttributeError:
                    continue
                if not isinstance(layer, GliderLayer) or layer.released_in.get(adapter_name) != number:
                    continue
                if adapter_name in layer.glider_gates:  # adapted again since
                    continue
                layer.glider_library.pop(adapter_name, None)
                layer.glider_routing.pop(adapter_name, None)
                layer.released_in.pop(adapter_name, None)
                if not layer.glider_gates:
                    setattr(parent, target_name, layer.get_base_layer())

    # ------------------------------------------------------------------ public API

    def _adapter(self, adapter_name: Optional[str]) -> str:
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
        return list(self._libraries[self._adapter(None)].current.expert_names)

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
        adapter_name = self._adapter(adapter_name)
        names = self.peft_config[adapter_name].expert_names
        layers = self.glider_layers(adapter_name)
        library = self._libraries[adapter_name]
        with library.editing:
            rows: dict[GliderLayer, dict[int, torch.Tensor]] = {}
            for expert, per_module in gates.items():
                if expert not in names:
                    raise KeyError(f"set_gates: unknown expert {expert!r}; experts are {names}.")
                index = names.index(expert)
                for module_name, vector in per_module.items():
                    layer = layers.get(module_name)
                    if layer is None:
                        raise KeyError(f"set_gates: expert {expert!r}: no Glider layer at module {module_name!r}.")
                    adapts = layer.glider_spans[adapter_name][index] is not None
                    in_features = layer.in_features if adapts else None
                    rows.setdefault(layer, {})[index] = check_gate(expert, module_name, vector, in_features, "set_gates")
            library.replace_gates(adapter_name, rows)
            for expert in gates:
                self.peft_config[adapter_name].experts[names.index(expert)]["gates"] = how

    def get_gates(self, adapter_name: Optional[str] = None) -> dict[str, dict[str, torch.Tensor]]:
        """The gate vectors, in the form `set_gates` takes (only modules each expert adapts)."""
        adapter_name = self._adapter(adapter_name)
        version = self._libraries[adapter_name].current
        gates: dict[str, dict[str, torch.Tensor]] = {name: {} for name in version.expert_names}
        for module_name, snapshot in sorted(version.layers.items()):
            for index, span in enumerate(snapshot.bank.spans):
                if span is not None:
                    gates[version.expert_names[index]][module_name] = snapshot.gates[index].detach().clone()
        return gates

    def set_instruction_embeddings(self, embeddings: torch.Tensor, adapter_name: Optional[str] = None) -> None:
        """Set the per-expert instruction embeddings `g_e`, a tensor (E, e) in `expert_names` order."""
        adapter_name = self._adapter(adapter_name)
        embeddings = self._checked_embeddings(embeddings, adapter_name)
        with self._libraries[adapter_name].editing:
            self.glider_instruction_embeddings[adapter_name] = embeddings
            self.peft_config[adapter_name].instruction_embedding_dim = embeddings.shape[1]
            self._libraries[adapter_name].publish(embeddings=embeddings)

    def _checked_embeddings(self, embeddings: torch.Tensor, adapter_name: str) -> torch.Tensor:
        num_experts = len(self.peft_config[adapter_name].experts)
        embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2 or embeddings.shape[0] != num_experts:
            raise ValueError(
                f"Instruction embeddings must have shape (num_experts={num_experts}, dim), "
                f"got {tuple(embeddings.shape)}."
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError("Instruction embeddings contain non-finite values.")
        return embeddings.detach().float().clone()

    def get_instruction_embeddings(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """The per-expert instruction embeddings (E, e), or None if none were set."""
        adapter_name = self._adapter(adapter_name)
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
        adapter_name = self._adapter(adapter_name)
        config: GliderConfig = self.peft_config[adapter_name]
        if list(descriptions.names) != config.expert_names:
            raise ValueError(
                f"The descriptions are for experts {list(descriptions.names)}, the adapter has {config.expert_names}."
            )
        embeddings = self._checked_embeddings(descriptions.embeddings, adapter_name)  # checked before any change
        with self._libraries[adapter_name].editing:
            self.glider_instruction_embeddings[adapter_name] = embeddings
            config.instruction_embedding_dim = embeddings.shape[1]
            self._libraries[adapter_name].publish(embeddings=embeddings)
        for entry, text in zip(config.experts, descriptions.instructions):
            entry["instruction"] = text
        config.embedder = descriptions.embedder
        config.instruction_writer = descriptions.writer
        if descriptions.auto_alpha_threshold is not None:
            config.auto_alpha_threshold = descriptions.auto_alpha_threshold
        if router is not None:
            self._global_routers[adapter_name] = router

    def _recorded_router(self, adapter_name: str) -> "GlobalRouter":
        """The router the adapter records (a shared adapter, loaded elsewhere), rebuilt on first use and kept."""
        from .global_router import GlobalRouter

        config: GliderConfig = self.peft_config[adapter_name]
        router = GlobalRouter.recorded(config.instruction_writer, config.embedder)
        return self._global_routers.setdefault(adapter_name, router)

    def set_global_router(self, router: "GlobalRouter", adapter_name: Optional[str] = None) -> None:
        """Make `router` the one `route(...)` uses for the adapter."""
        self._global_routers[self._adapter(adapter_name)] = router

    @contextlib.contextmanager
    def global_scores(
        self,
        scores: torch.Tensor,
        alpha: Optional[Union[float, torch.Tensor]] = None,
        adapter_name: Optional[str] = None,
    ) -> Iterator[torch.Tensor]:
        """Route the calls inside with per-row global scores `scores` (B, E), e.g. cosines `cos(q_b, g_e)`.

        Row b of every batch inside belongs to query b; rows expanded by `generate` (beams, return sequences)
        inherit their query's scores. The logit of expert e becomes `local + alpha_b * scores[b, e]`, with
        `alpha_b` from `alpha` (a number or a (B,) tensor) or else from the config (for `alpha="auto"`, by the
        calibrated threshold rule). Yields the per-row alpha used.

        The scores hold for the calls this thread (or asyncio task) makes inside the context; other threads keep
        their own. Contexts nest: the inner one wins until it exits, and nothing stays set afterwards.
        """
        adapter_name = self._adapter(adapter_name)
        with self._scores_context(adapter_name, self._call_version(adapter_name), scores, alpha) as row_alpha:
            yield row_alpha

    @contextlib.contextmanager
    def _scores_context(
        self, adapter_name: str, version: LibraryVersion, scores: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]]
    ) -> Iterator[torch.Tensor]:
        """Route the calls inside with `version` and global scores `scores` checked against its experts."""
        config: GliderConfig = self.peft_config[adapter_name]
        num_experts = version.num_experts
        scores = torch.as_tensor(scores)
        if scores.dim() == 1:
            scores = scores[None]
        if scores.dim() != 2 or scores.shape[1] != num_experts or scores.shape[0] == 0:
            raise ValueError(
                f"Global scores must have shape (batch, num_experts={num_experts}), got {tuple(scores.shape)}."
            )
        if not torch.isfinite(scores).all():
            raise ValueError("Global scores contain non-finite values.")
        scores = scores.detach().float().cpu()
        row_alpha = self._row_alpha(config, scores, alpha)
        with call_routing(self._routing_states[adapter_name], version=version, row_bias=row_alpha[:, None] * scores):
            yield row_alpha

    @staticmethod
    def _row_alpha(
        config: GliderConfig, scores: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]]
    ) -> torch.Tensor:
        rows = scores.shape[0]
        if alpha is not None:
            row_alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1).expand(rows).clone()
            if not torch.isfinite(row_alpha).all():
                raise ValueError("alpha must be finite.")
            return row_alpha
        if config.alpha != "auto":
            return torch.full((rows,), config.alpha)
        if config.auto_alpha_threshold is None:
            raise ValueError(
                "alpha='auto' needs a calibrated threshold: run GlobalRouter.describe_experts(...) or set "
                "config.auto_alpha_threshold."
            )
        return auto_alpha(scores, config.auto_alpha_threshold, config.alpha_held_in, config.alpha_held_out)

    @contextlib.contextmanager
    def route(
        self,
        prompts: Optional[Union[str, Sequence[str]]] = None,
        task_samples: Optional[Sequence] = None,
        router: Optional["GlobalRouter"] = None,
        adapter_name: Optional[str] = None,
    ) -> Iterator["RouteInfo"]:
        """Route the calls inside by the prompts' own instructions (per query) or their task's (`task_samples`).

        `prompts` is one prompt (a string) or a list of them, one per batch row. Per task, the rows (`len(prompts)`,
        or one) share one instruction written from `task_samples`. Uses `router`, or the `GlobalRouter` that
        described this adapter's experts, or else the one the adapter records (a shared adapter loaded elsewhere:
        rebuilt on first use when its instructions came from the samples writer). Yields a `RouteInfo` with the instructions, scores, per-row alpha and the
        time spent in the LLM and the embedder. Like `global_scores`, it holds for this thread or task only.
        """
        adapter_name = self._adapter(adapter_name)
        router = router or self._global_routers.get(adapter_name) or self._recorded_router(adapter_name)
        version = self._call_version(adapter_name)
        if version.embeddings is None:
            raise ValueError("The Glider adapter has no instruction embeddings: run describe_experts(...) first.")
        rows = _route_rows(prompts, task_samples)
        info = router.score(rows, version.embeddings, self.peft_config[adapter_name].embedder)
        with self._scores_context(adapter_name, version, info.scores, None) as row_alpha:
            info.alpha = row_alpha
            yield info

    @contextlib.contextmanager
    def routing_trace(self, adapter_name: Optional[str] = None) -> Iterator[RoutingTrace]:
        """Record which experts each token picks at each module during the calls inside (off otherwise); only the
        calls of this thread or task are recorded."""
        adapter_name = self._adapter(adapter_name)
        version = self._call_version(adapter_name)
        trace = RoutingTrace(expert_names=list(version.expert_names))
        with call_routing(self._routing_states[adapter_name], version=version, trace=trace):
            yield trace

    def _call_version(self, adapter_name: str) -> LibraryVersion:
        """The library version a call routes with: the one an enclosing context of this call took, else the current
        one (which the context about to be entered then keeps to its end)."""
        call = self._routing_states[adapter_name].current_call()
        if call is not None and call.version is not None:
            return call.version
        return self._current_version(adapter_name)

    def _current_version(self, adapter_name: str) -> LibraryVersion:
        """The adapter's current library version, republished first if its instruction embeddings were replaced
        behind the library's back (a checkpoint loaded with `assign=True`, a move to another device)."""
        library = self._libraries[adapter_name]
        version = library.current
        embeddings = self.get_instruction_embeddings(adapter_name)
        if version.embeddings is not embeddings:
            with library.editing:  # an edit may be between setting the embeddings and publishing them: read again
                embeddings = self.get_instruction_embeddings(adapter_name)
                if library.current.embeddings is not embeddings:
                    library.publish(embeddings=embeddings)
                version = library.current
        return version

    def set_kernel(self, kernel: str, adapter_name: Optional[str] = None) -> None:
        """Force a kernel for the experts' products ("concat", "gather", "sparse" or "native", the compiled one that
        also routes; see `routing.KERNELS`) or let each call's shapes decide ("auto", the default). A forced kernel
        that cannot run a call falls back to "concat"."""
        from .routing import KERNELS

        if kernel not in KERNELS:
            raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
        self._routing_states[self._adapter(adapter_name)].kernel = kernel

    def routing_state(self, adapter_name: Optional[str] = None) -> RoutingState:
        """The shared routing state (top_k, alpha, kernel) of an adapter."""
        return self._routing_states[self._adapter(adapter_name)]



def check_gate(
    expert: str, module_name: str, vector: torch.Tensor, in_features: Optional[int], caller: str
) -> torch.Tensor:
    """A gate vector for `expert` at `module_name`, checked: the expert adapts the module (`in_features` is its
    input size, None where it does not), the shape fits and the values are finite."""
    if in_features is None:
        raise ValueError(f"{caller}: expert {expert!r} does not adapt module {module_name!r}.")
    vector = torch.as_tensor(vector)
    if vector.shape != (in_features,):
        raise ValueError(
            f"{caller}: gate of expert {expert!r} at {module_name!r} has shape {tuple(vector.shape)}, "
            f"expected ({in_features},)."
        )
    if not torch.isfinite(vector).all():
        raise ValueError(f"{caller}: gate of expert {expert!r} at {module_name!r} is not finite.")
    return vector


def _route_rows(prompts: Optional[Union[str, Sequence[str]]], task_samples: Optional[Sequence]) -> list[list]:
    """The samples each batch row is routed by: its own prompt (per query) or the task's samples (per task)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if task_samples is not None:
        if isinstance(task_samples, str):
            task_samples = [task_samples]
        return [list(task_samples)] * (len(prompts) if prompts else 1)
    if not prompts:
        raise ValueError("route() needs prompts (per-query routing) or task_samples (per-task routing).")
    return [[prompt] for prompt in prompts]
