"""A Glider adapter as a vLLM worker holds it: its Glider layers on a skeleton of the base model (weights on `meta`,
nothing of the base model is held twice), and what one engine step routes each of its tokens with."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

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
    """

    def __init__(self, folder: str, hf_config, tensor_parallel: bool = False) -> None:
        from accelerate import init_empty_weights
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        model = PeftModel.from_pretrained(skeleton, folder)
        model.eval()
        self.glider = model.base_model
        self.adapter_name = self.glider.resolve_adapter(None)
        config = model.peft_config[self.adapter_name]
        if config.max_resident_experts is not None:
            raise ValueError(
                f"Glider adapter {folder!r} has max_resident_experts={config.max_resident_experts}; serving it in vLLM "
                "needs every expert resident for now: save it without a resident-experts budget."
            )
        self.state = self.glider.routing_state(self.adapter_name)
        self.num_experts = len(self.glider.expert_names_of(self.adapter_name))
        self.layers = self.glider.glider_layers(self.adapter_name)  # transformers module name -> GliderLayer
        dora = sorted(name for name, layer in self.layers.items()
                      if layer.expert_bank(self.adapter_name).shift is not None)
        if tensor_parallel and dora:
            raise ValueError(
                f"Glider adapter {folder!r} has DoRA experts (at {dora[0]}, ...): under tensor parallelism their "
                "rescaling needs the base output before vLLM sums the ranks' parts; serve it with "
                "tensor_parallel_size=1."
            )
        self._model = model  # keeps the skeleton (and the layers' library) alive

    def call(self, scores: Optional[torch.Tensor]) -> CallRouting:
        """What a group of tokens routes with: `scores` (n, E), one row per token (its request's global scores), or
        None: local routing only. Computed once per engine step (the library version, alpha, the global bias)."""
        if scores is None:
            return self.glider.local_call(self.adapter_name)
        with self.glider.global_scores(scores, adapter_name=self.adapter_name):
            return self.state.current_call()

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

