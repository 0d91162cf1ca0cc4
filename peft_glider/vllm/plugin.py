"""The patches that let vLLM (0.32) serve Glider adapters, installed by `register` in every vLLM process.

The points of vLLM wrapped (vLLM's own code runs unchanged around them):

- **The frontend** (`InputProcessor.process_inputs`, which has the prompt's text, and the server's
  `_check_load_lora_adapter_request`): a Glider adapter is checked before the engine sees it (`GliderFrontend`;
  a bad one is refused with its cause, HTTP 400), and a request for one gets its global scores from its text,
  unless it brings its own.
- **Loading** (`WorkerLoRAManager._load_adapter`): a folder whose adapter_config.json names GLIDER becomes a
  `GliderLoRAModel`: a LoRA model with no factors (vLLM's slot stays zero; `_create_merged_loras_inplace`, which
  packs a LoRA's factors, passes it by) carrying the `VllmGliderAdapter`.
- **Each engine step** (`LoRAModelRunnerMixin.set_active_loras`, which knows every scheduled token's request):
  which tokens of the step use which Glider adapter, and what each of them routes with (its request's global
  scores from `SamplingParams.extra_args["glider_scores"]`, or local routing only). Every other mapping vLLM sets
  (`_set_active_loras`: dummy and profiling runs) clears it.
- **Each LoRA linear layer** (`BaseLinearLayerWithLoRA._apply_lora_to_output`): after vLLM adds its LoRA slots'
  products, the tokens of Glider adapters get their routed deltas, per output slice (vLLM packs q/k/v and
  gate/up in one layer; each slice routes with its own module's experts and gates).

Under tensor parallelism every rank routes every token the same way (the same inputs, gates and scores): a
column-parallel layer adds its own shard of the delta (cut as vLLM cuts LoRA B factors, `slice_lora_b`); a
row-parallel layer, whose input is sharded, gathers it first and adds the whole delta on rank 0 only (vLLM sums
the ranks' outputs). DoRA experts need the base output before that sum and are refused under tensor parallelism.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .adapter import SCORES_KEY, VllmGliderAdapter, is_glider_folder
from .frontend import GliderFrontend

_REGISTERED = [False]


@dataclass
class StepRouting:
    """What one engine step routes its Glider tokens with (set by the runner before the forward)."""

    # per Glider adapter (its LoRA int id): (token positions in the step (n,), what they route with), one entry per
    # group of tokens that share a `CallRouting`: with global scores and without, and under a resident-experts
    # budget one per share of the requests whose candidates fit it
    groups: dict[int, list[tuple[torch.Tensor, Any]]] = field(default_factory=dict)


_STEP = StepRouting()
_WORKER: dict[str, Any] = {}  # the worker's LoRA model manager ("manager"), once a Glider adapter was loaded


def register() -> None:
    """The `vllm.general_plugins` entry point: install the patches (once per process)."""
    if _REGISTERED[0]:
        return
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    InputProcessor.process_inputs = _scoring(InputProcessor.process_inputs)
    OpenAIServingModels._check_load_lora_adapter_request = _checking(
        OpenAIServingModels._check_load_lora_adapter_request
    )
    WorkerLoRAManager._load_adapter = _loading(WorkerLoRAManager._load_adapter)
    LoRAModelManager._create_merged_loras_inplace = _no_merging_for_glider(
        LoRAModelManager._create_merged_loras_inplace
    )
    LoRAModelRunnerMixin._set_active_loras = _clearing(LoRAModelRunnerMixin._set_active_loras)
    LoRAModelRunnerMixin.set_active_loras = _stepping(LoRAModelRunnerMixin.set_active_loras)
    BaseLinearLayerWithLoRA._apply_lora_to_output = _routing(BaseLinearLayerWithLoRA._apply_lora_to_output)
    _REGISTERED[0] = True


_FRONTEND = GliderFrontend()


def _glider_folder(lora_path: str) -> Optional[str]:
    """The adapter folder of a LoRA path when it holds a Glider adapter, else None."""
    from vllm.lora.utils import get_adapter_absolute_path

    folder = get_adapter_absolute_path(lora_path)
    return folder if is_glider_folder(folder) else None


def _scoring(original):
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        lora, sampling = request.lora_request, request.sampling_params
        folder = None if lora is None or sampling is None else _glider_folder(lora.lora_path)
        if folder is None:
            return request
        _FRONTEND.check(folder, self.model_config.hf_config)  # a bad adapter: this request fails, not the engine
        if SCORES_KEY in (sampling.extra_args or {}):
            _FRONTEND.check_scores(folder, sampling.extra_args[SCORES_KEY])
            return request
        text = _prompt_text(prompt, request.prompt_token_ids, self.tokenizer)
        scores = None if text is None else _FRONTEND.scores(folder, text)
        if scores is None:
            _FRONTEND.require_scores(folder)
        else:
            sampling.extra_args = {**(sampling.extra_args or {}), SCORES_KEY: scores}
        return request

    return process_inputs


def _checking(original):
    @functools.wraps(original)
    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        folder = None if error is not None or not request.lora_path else _glider_folder(request.lora_path)
        if folder is None:
            return error
        from http import HTTPStatus

        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            _FRONTEND.check(folder, self.model_config.hf_config)
        except ValueError as cause:
            return create_error_response(message=str(cause), err_type="InvalidUserInput",
                                         status_code=HTTPStatus.BAD_REQUEST)
        return None

    return _check_load_lora_adapter_request


def _prompt_text(prompt: Any, token_ids: Optional[list[int]], tokenizer: Any) -> Optional[str]:
    """The text a request was given (a string, or a prompt dict's "prompt"), else its tokens decoded; None when
    neither is at hand (token prompts without a tokenizer)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    if token_ids is not None and tokenizer is not None:
        return tokenizer.decode(token_ids, skip_special_tokens=True)
    return None


@functools.cache
def _glider_lora_model_class():
    from vllm.lora.lora_model import LoRAModel

    class GliderLoRAModel(LoRAModel):
        """A LoRA model with no factors of its own, carrying a Glider adapter."""

        glider: Optional[VllmGliderAdapter] = None

        def clone(self, lora_model_id: int) -> "GliderLoRAModel":
            copy = super().clone(lora_model_id)
            copy.glider = self.glider
            return copy

    return GliderLoRAModel


def _loading(original):
    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        from vllm.lora.utils import get_adapter_absolute_path

        folder = get_adapter_absolute_path(lora_request.lora_path)
        if not is_glider_folder(folder):
            return original(self, lora_request)
        manager = self._adapter_manager
        model = _glider_lora_model_class()(lora_request.lora_int_id, rank=1, loras={})
        model.glider = VllmGliderAdapter(folder, manager.model.config, tensor_parallel=_tensor_parallel_size() > 1,
                                         device=self.device)  # the served model's transformers config
        _WORKER["manager"] = manager
        return model

    return _load_adapter


def _no_merging_for_glider(original):
    @functools.wraps(original)
    def _create_merged_loras_inplace(self, lora_model):
        if getattr(lora_model, "glider", None) is None:  # a Glider adapter has no factors in vLLM's slots to pack
            return original(self, lora_model)

    return _create_merged_loras_inplace


def _tensor_parallel_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_world_size()
    except AssertionError:  # no distributed state in this process
        return 1


def _glider_adapters() -> dict[int, VllmGliderAdapter]:
    """The Glider adapters registered with the worker's LoRA manager, by LoRA int id."""
    manager = _WORKER.get("manager")
    if manager is None:
        return {}
    return {
        lora_id: model.glider
        for lora_id, model in manager._registered_adapters.items()
        if getattr(model, "glider", None) is not None
    }


def _clearing(original):
    @functools.wraps(original)
    def _set_active_loras(self, *args, **kwargs):
        _STEP.groups = {}  # every mapping vLLM sets (dummy and profiling runs too) starts without Glider tokens
        return original(self, *args, **kwargs)

    return _set_active_loras


def _stepping(original):
    @functools.wraps(original)
    def set_active_loras(self, input_batch, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        result = original(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        _STEP.groups = _step_groups(self, input_batch, num_scheduled_tokens)
        return result

    return set_active_loras


def _step_groups(runner, input_batch, num_scheduled_tokens: np.ndarray) -> dict[int, list[tuple[torch.Tensor, Any]]]:
    """For each Glider adapter of this step: its tokens' positions and what they route with."""
    adapters = _glider_adapters()
    if not adapters:
        return {}
    starts = np.concatenate([[0], np.cumsum(num_scheduled_tokens)])
    # per (adapter, whether its requests carry scores): each request's token positions and scores (1, E) or None
    requests: dict[tuple[int, bool], list[tuple[np.ndarray, Optional[torch.Tensor]]]] = {}
    for row, req_id in enumerate(input_batch.req_ids[: len(num_scheduled_tokens)]):
        request = runner.requests.get(req_id)
        lora = getattr(request, "lora_request", None)
        if lora is None or lora.lora_int_id not in adapters:
            continue
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        scores = None  # checked by the frontend: one finite value per expert
        if SCORES_KEY in extra:
            scores = torch.as_tensor(extra[SCORES_KEY], dtype=torch.float32).reshape(1, -1)
        positions = np.arange(starts[row], starts[row + 1])
        requests.setdefault((lora.lora_int_id, scores is not None), []).append((positions, scores))
    groups: dict[int, list[tuple[torch.Tensor, Any]]] = {}
    for (lora_id, _), parts in requests.items():
        groups.setdefault(lora_id, []).extend(adapters[lora_id].calls(parts))
    return groups


def _routing(original):
    @functools.wraps(original)
    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not _STEP.groups:
            return original(self, x, output)
        sharded = self.tp_size > 1
        base = None if sharded else output.reshape(-1, output.shape[-1]).clone()  # before any LoRA: DoRA scales it
        output = original(self, x, output)
        flat, inputs = output.reshape(-1, output.shape[-1]), x.reshape(-1, x.shape[-1])
        row_parallel = _is_row_parallel(self)
        if sharded and row_parallel:  # each rank holds a slice of the input features: routing needs all of them
            from vllm.distributed import tensor_model_parallel_all_gather

            inputs = tensor_model_parallel_all_gather(inputs.contiguous(), dim=-1)
        adapters = _glider_adapters()
        names = _module_names(self)
        for lora_id, groups in _STEP.groups.items():
            adapter = adapters.get(lora_id)
            if adapter is None:
                continue
            for positions, call in groups:
                deltas = []  # per output slice: the whole delta (n, out features of its module), or None
                offset = 0
                for name, size in zip(names, self.output_slices):
                    base_rows = None if base is None else _without_bias(self, base[positions], offset, size)
                    deltas.append(adapter.routed(name, inputs[positions], call, base_rows))
                    offset += size
                _add_shards(self, flat, positions, deltas, row_parallel)
        return output

    return _apply_lora_to_output


def _is_row_parallel(layer) -> bool:
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    return isinstance(layer, RowParallelLinearWithLoRA)


def _add_shards(layer, flat: torch.Tensor, positions: torch.Tensor, deltas: list, row_parallel: bool) -> None:
    """Add this rank's part of each slice's delta into the layer's output rows `positions`: all of it without
    tensor parallelism, the rank's shard of a column-parallel layer (as vLLM shards LoRA B), all of it on rank 0
    only for a row-parallel layer (the ranks' outputs are summed after)."""
    if layer.tp_size > 1 and row_parallel:
        deltas = deltas if layer.tp_rank == 0 else [None] * len(deltas)
    elif layer.tp_size > 1:
        transposed = [None if delta is None else delta.T for delta in deltas]  # (out, n): shaped like a B factor
        sliced = layer.slice_lora_b(transposed) if layer.n_slices > 1 else [layer.slice_lora_b(transposed[0])]
        deltas = [None if part is None else part.T for part in sliced]
    offset = 0
    for delta, size in zip(deltas, layer.output_slices):
        if delta is not None:
            flat[positions, offset : offset + size] += delta.to(flat.device, flat.dtype)
        offset += size


def _without_bias(layer, base: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """Columns [offset, offset + size) of the base output rows `base`, without the base layer's bias."""
    base = base[:, offset : offset + size]
    bias = getattr(layer.base_layer, "bias", None)
    return base if bias is None else base - bias[offset : offset + size].to(base.dtype)


def _module_names(layer) -> list[str]:
    """The transformers module names of a vLLM LoRA layer's output slices (q/k/v of `qkv_proj`, gate/up of
    `gate_up_proj`, or the layer's own name)."""
    names = getattr(layer, "_glider_module_names", None)
    if names is None:
        manager = _WORKER["manager"]
        vllm_name = next(name for name, module in manager.modules.items() if module is layer)
        prefix, _, last = vllm_name.rpartition(".")
        parts = manager.packed_modules_mapping.get(last, [last])
        names = layer._glider_module_names = [f"{prefix}.{part}" if prefix else part for part in parts]
    return names
