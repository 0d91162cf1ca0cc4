"""A Glider adapter as a vLLM worker holds it: its Glider layers on a skeleton of the base model (weights on `meta`,
nothing of the base model is held twice), and what one engine step routes each of its tokens with."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from ..residency import BudgetExceededError
from ..state import CallRouting

#: The key of a request's global scores in `SamplingParams.extra_args` (one value per expert, in routing order).
SCORES_KEY = "glider_scores"


def is_glider_folder(folder: str) -> bool:
    """Whether `folder` holds a Glider adapter (its adapter_config.json names the GLIDER method)."""
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("peft_type") == "GLIDER"


class VllmGliderAdapter:
    """One Glider adapter loaded in a vLLM worker process.

    Args:
        folder: The saved Glider adapter (`save_pretrained`).
        hf_config: The served model's transformers config (the skeleton is built from it; a Glider adapter made
            for another base does not fit it and is refused with PEFT's and the library's errors).
        tensor_parallel: Whether the engine shards the model (DoRA experts are refused then).
        device: Where the worker computes (the experts and gates go there; default: the CPU).
    """

    def __init__(
        self, folder: str, hf_config, tensor_parallel: bool = False, device: Optional[torch.device] = None
    ) -> None:
        from accelerate import init_empty_weights
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        model = PeftModel.from_pretrained(skeleton, folder)
        model.eval()
        self.glider = model.base_model
        self.adapter_name = self.glider.resolve_adapter(None)
        self.config = model.peft_config[self.adapter_name]
        self.state = self.glider.routing_state(self.adapter_name)
        self.num_experts = len(self.glider.expert_names_of(self.adapter_name))
        self.layers = self.glider.glider_layers(self.adapter_name)  # transformers module name -> GliderLayer
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.device.type != "cpu":  # the skeleton's weights stay on `meta`
            for layer in self.layers.values():
                layer._move_adapter_to_device_of_base_layer(self.adapter_name, self.device)
        dora = sorted(name for name, layer in self.layers.items()
                      if layer.expert_bank(self.adapter_name).shift is not None)
        self.has_dora = bool(dora)  # DoRA experts' shifts scale the base output: the layers keep it for them
        if tensor_parallel and dora:
            raise ValueError(
                f"Glider adapter {folder!r} has DoRA experts (at {dora[0]}, ...): under tensor parallelism their "
                "rescaling needs the base output before vLLM sums the ranks' parts; serve it with "
                "tensor_parallel_size=1."
            )
        self._model = model  # keeps the skeleton (and the layers' library) alive

    @property
    def memory_bytes(self) -> int:
        """The bytes a worker holds for this adapter: its layers' experts, gates and routing tensors, each storage
        counted once (the skeleton's weights are on `meta` and hold none)."""
        storages: dict[int, int] = {}
        for layer in self.layers.values():
            bank = layer.expert_bank(self.adapter_name)
            tensors = [*layer.parameters(), *layer.buffers(), *(v for v in vars(bank).values() if torch.is_tensor(v))]
            for tensor in tensors:
                if tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    @property
    def needs_scores(self) -> bool:
        """Whether every request must carry global scores: under a resident-experts budget smaller than the library
        a call without them would score every expert (refused by the library)."""
        budget = self.config.max_resident_experts
        return budget is not None and budget < self.num_experts

    def calls(
        self, requests: list[tuple[np.ndarray, Optional[torch.Tensor]]]
    ) -> list[tuple[torch.Tensor, CallRouting]]:
        """What the tokens of some requests of one engine step route with: per request its token positions and its
        global scores (1, E), all given or all None (local routing only). Returns (positions, call) pairs, one call
        for them all, or, under a resident-experts budget their candidates together exceed, one per share of the
        requests that fits (each call keeps its own library version, so no share loses an expert to another)."""
        positions = torch.from_numpy(np.concatenate([part for part, _ in requests])).long()
        if requests[0][1] is None:
            return [(positions, self.glider.local_call(self.adapter_name))]
        scores = torch.cat([row.expand(len(part), -1) for part, row in requests])  # (n, E): a row per token
        try:
            with self.glider.global_scores(scores, adapter_name=self.adapter_name):
                return [(positions, self.state.current_call())]
        except BudgetExceededError:
            if len(requests) == 1:
                raise
            half = len(requests) // 2
            return self.calls(requests[:half]) + self.calls(requests[half:])

    def routed(
        self, module_name: str, x: torch.Tensor, call: CallRouting, base: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The routed deltas (n, o) of module `module_name` (transformers name) for tokens x (n, d); None where no
        expert adapts the module. `base` (n, o): the base layer's output without bias (DoRA experts' shifts scale
        it)."""
        layer = self.layers.get(module_name)
        snapshot = None if layer is None else layer.snapshot_in(call.version, self.adapter_name)
        if snapshot is None:
            return None
        # x as n batch rows of one token each: row i takes the global bias of token i's request
        delta = layer.routed_delta(x.unsqueeze(1), snapshot, self.state, call, base=base)  # (n, 1, o)
        return delta.view(x.shape[0], -1)

