"""The patches that let vLLM serve Glider adapters, installed by `register` in every vLLM process.

Before patching anything, `register` checks from vLLM's sources that every point it wraps is there with the
parameters it uses (`points`): all of them, or none is patched. A vLLM that misses one keeps working as if
peft-glider were not installed, except that a request or a load naming a Glider adapter is refused with the reason
(one warning in the log names the supported versions).

The points of vLLM wrapped (vLLM's own code runs unchanged around them):

- **The frontend** (`InputProcessor.process_inputs`, which has the prompt's text, and the server's
  `_check_load_lora_adapter_request`): a Glider adapter is checked before the engine sees it (`GliderFrontend`;
  a bad one, or an engine mode that would not route it, is refused with its cause, HTTP 400); a request for one
  gets its global scores from its text, unless it brings its own, and a prefix-cache salt naming them.
- **Loading** (`WorkerLoRAManager._load_adapter`): a folder whose adapter_config.json names GLIDER becomes a
  `GliderLoRAModel`: a LoRA model with no factors (vLLM's slot stays zero; `_create_merged_loras_inplace`, which
  packs a LoRA's factors, passes it by) carrying the `VllmGliderAdapter`.
- **Each engine step**: the model runner tells which requests the step's tokens belong to, in batch order, with
  their token counts (the V1 runner's `set_active_loras`; under Model Runner V2 `LoraState.make_lora_inputs`, with
  each request's sampling parameters taken when the runner adds it); the mapping vLLM then sets
  (`_set_active_loras`, which every runner calls, dummy and profiling runs too) takes that step's Glider tokens,
  and what each routes with (its request's global scores from `SamplingParams.extra_args["glider_scores"]`, or
  local routing only), or none.
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
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import points
from .adapter import SCORES_KEY, VllmGliderAdapter, is_glider_folder
from .frontend import GliderFrontend, routing_salt

# under vLLM's logger: its handlers print it in every vLLM process (a server's logging set-up silences others)
logger = logging.getLogger("vllm.plugins.peft_glider")

_REGISTERED = [False]


@dataclass
class StepRouting:
    """What one engine step routes its Glider tokens with."""

    # the step's requests in batch order, set by the runner before it sets the LoRA mapping: per request its LoRA
    # request (or None) and its global scores (1, E) (or None), and its number of scheduled tokens
    pending: Optional[tuple[list[tuple[Any, Optional[torch.Tensor]]], np.ndarray]] = None
    # per Glider adapter of the step: (token positions in the step (n,) on the adapter's device, what they route
    # with), one entry per group of tokens that share a `CallRouting`: with global scores and without, and under a
    # resident-experts budget one per share of the requests whose candidates fit it
    groups: list[tuple[VllmGliderAdapter, torch.Tensor, Any]] = field(default_factory=list)
    dora: bool = False  # whether an adapter of the step has DoRA experts (their shifts scale the base output)


_STEP = StepRouting()
_WORKER: dict[str, Any] = {}  # the worker's LoRA model manager ("manager"), once a Glider adapter was loaded
_REQUEST_SCORES: dict[str, Optional[torch.Tensor]] = {}  # Model Runner V2: request id -> its global scores (1, E)


def register() -> None:
    """The `vllm.general_plugins` entry point: install the patches (once per process), or, in a vLLM whose points
    differ from those the plugin wraps, only the refusal of Glider adapters."""
    if _REGISTERED[0]:
        return
    _REGISTERED[0] = True
    try:
        _install()
    except Exception as error:  # vLLM loads plugins without a guard: whatever happens here, vLLM must start
        logger.warning("peft-glider: the vLLM plugin is off (%s: %s); Glider adapters cannot be served.",
                       type(error).__name__, error)


def _install() -> None:
    """Every patch when vLLM's sources hold every point, else only the refusal of Glider adapters (and a warning)."""
    root = points.installed_root()
    found = points.problems(root) if root is not None else ["vllm is not installed"]
    if not found:
        try:
            _patch(_all_patches(root))
            return
        except (ImportError, AttributeError) as error:  # the sources hold the points, the modules do not load them
            found = [f"{type(error).__name__}: {error}"]
    reason = _unsupported_reason(found)
    logger.warning("peft-glider: %s", reason)

    def refuse(*_) -> None:
        raise ValueError(reason)

    if not points.refusal_problems(root or ""):
        _patch([(points.PROCESS_INPUTS, functools.partial(_scoring, route=refuse)),
                (points.CHECK_LOAD, functools.partial(_checking, check=refuse))])


def _unsupported_reason(found: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    installed = []
    for distribution in points.SUPPORTED:
        try:
            installed.append(f"{distribution} {version(distribution)}")
        except PackageNotFoundError:
            continue
    supported = ", ".join(f"{name}{spec}" for name, spec in points.SUPPORTED.items())
    return (f"Glider adapters cannot be served by this vLLM ({', '.join(installed) or 'unknown version'}; supported: "
            f"{supported}): {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
            + ". Base-model and LoRA requests are served as usual.")


def _all_patches(root: str) -> list[tuple[points.Point, Callable]]:
    runner_wrappers = {
        points.V1_STEP: _v1_stepping,
        points.V2_ADD: _adding, points.V2_STEP: _v2_stepping, points.V2_REMOVE: _removing,
        points.CPU_ADD: _adding, points.CPU_STEP: _v2_stepping, points.CPU_REMOVE: _removing,
    }
    return [
        (points.PROCESS_INPUTS, _scoring),
        (points.CHECK_LOAD, _checking),
        (points.LOAD_ADAPTER, _loading),
        (points.MERGE_LORAS, _no_merging_for_glider),
        (points.SET_MAPPING, _mapping),
        (points.APPLY_LORA, _routing),
        *[(point, runner_wrappers[point]) for point in points.present_runner_points(root)],
    ]


def _patch(patches: list[tuple[points.Point, Callable]]) -> None:
    """Wrap every point of `patches` with its wrapper factory (called with the original), or none of them when one
    cannot be reached."""
    resolved = []
    for point, wrapper in patches:
        owner = importlib.import_module(point.module)
        if point.owner is not None:
            owner = getattr(owner, point.owner)
        resolved.append((owner, point.name, wrapper(getattr(owner, point.name))))
    for owner, name, wrapped in resolved:
        setattr(owner, name, wrapped)


_FRONTEND = GliderFrontend()


def _bad_request(message: str):
    from http import HTTPStatus

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(message=message, err_type="InvalidUserInput", status_code=HTTPStatus.BAD_REQUEST)


def _glider_folder(lora_path: str) -> Optional[str]:
    """The adapter folder of a LoRA path when it holds a Glider adapter, else None."""
    from vllm.lora.utils import get_adapter_absolute_path

    folder = get_adapter_absolute_path(lora_path)
    return folder if is_glider_folder(folder) else None


def _scoring(original, route: Optional[Callable] = None):
    """`process_inputs` wrapped: each request naming a Glider adapter goes through `route(processor, request,
    prompt, folder)` (`_route_request`; in a vLLM the plugin does not support, a refusal), whose `ValueError` is
    the request's refusal."""
    route = route or _route_request

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        folder = None if request.lora_request is None else _glider_folder(request.lora_request.lora_path)
        if folder is None:
            return request
        try:
            route(self, request, prompt, folder)
        except ValueError as error:
            raise _refusal(str(error)) from error
        return request

    return process_inputs


def _route_request(processor, request, prompt: Any, folder: str) -> None:
    """Check a request for the Glider adapter in `folder`, give it its global scores from its text unless it brings
    its own, and salt its prefix-cache keys with them; `ValueError` naming the cause when it cannot be served."""
    sampling = request.sampling_params
    if sampling is None:  # a pooling request: nothing to route by
        return
    _FRONTEND.check(folder, processor.vllm_config)  # a bad adapter: this request fails, not the engine
    if SCORES_KEY in (sampling.extra_args or {}):
        _FRONTEND.check_scores(folder, sampling.extra_args[SCORES_KEY])
    else:
        text = _prompt_text(prompt, request.prompt_token_ids, processor.tokenizer)
        scores = None if text is None else _FRONTEND.scores(folder, text)
        if scores is None:
            _FRONTEND.require_scores(folder)
            return  # local routing only: the same for every request of the adapter
        sampling.extra_args = {**(sampling.extra_args or {}), SCORES_KEY: scores}
    request.cache_salt = routing_salt(request.cache_salt, sampling.extra_args[SCORES_KEY])


def _refusal(message: str) -> Exception:
    """The error a refused Glider request raises, logged: a `ValueError` in Python, and in the server one that
    vLLM answers with HTTP 400 and the message (vLLM turns other errors raised while it adds a request into an
    empty HTTP 500)."""
    logger.warning("peft-glider: %s", message)
    return _refusal_class()(message)


@functools.cache
def _refusal_class() -> type:
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # a vLLM before its own client-error classes
        return ValueError

    class GliderRequestRefused(VLLMValidationError, ValueError):
        """A request naming a Glider adapter that this engine cannot serve, and why."""

    return GliderRequestRefused


def _checking(original, check: Optional[Callable] = None):
    """The server's adapter-load check wrapped: a Glider adapter goes through `check(serving_models, folder)`
    (`_check_adapter`; in a vLLM the plugin does not support, a refusal), whose `ValueError` is an HTTP 400."""
    check = check or _check_adapter

    @functools.wraps(original)
    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        folder = None if error is not None or not request.lora_path else _glider_folder(request.lora_path)
        if folder is None:
            return error
        try:
            check(self, folder)
        except ValueError as cause:
            return _bad_request(str(cause))
        return None

    return _check_load_lora_adapter_request


def _check_adapter(serving_models, folder: str) -> None:
    _FRONTEND.check(folder, serving_models.input_processor.vllm_config)


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
    from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size

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


def _scores_of(sampling_params: Any) -> Optional[torch.Tensor]:
    """A request's global scores (1, E) from its sampling parameters (checked by the frontend: one finite value per
    expert), or None (local routing only)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return torch.as_tensor(extra[SCORES_KEY], dtype=torch.float32).reshape(1, -1) if SCORES_KEY in extra else None


def _v1_stepping(original):
    @functools.wraps(original)
    def set_active_loras(self, input_batch, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        rows = []
        for req_id in input_batch.req_ids[: len(num_scheduled_tokens)]:
            state = self.requests.get(req_id)
            rows.append((getattr(state, "lora_request", None), _scores_of(getattr(state, "sampling_params", None))))
        _STEP.pending = (rows, np.asarray(num_scheduled_tokens))
        return original(self, input_batch, num_scheduled_tokens, *args, **kwargs)

    return set_active_loras


def _adding(original):
    @functools.wraps(original)
    def add_requests(self, scheduler_output, *args, **kwargs):
        for new in scheduler_output.scheduled_new_reqs:
            _REQUEST_SCORES[new.req_id] = _scores_of(new.sampling_params)
        return original(self, scheduler_output, *args, **kwargs)

    return add_requests


def _removing(original):
    @functools.wraps(original)
    def remove_request(self, req_id, *args, **kwargs):
        _REQUEST_SCORES.pop(req_id, None)
        return original(self, req_id, *args, **kwargs)

    return remove_request


def _v2_stepping(original):
    @functools.wraps(original)
    def make_lora_inputs(self, req_ids, idx_mapping, num_scheduled_tokens, *args, **kwargs):
        rows = [(self.lora_requests.get(req_id), _REQUEST_SCORES.get(req_id)) for req_id in req_ids]
        _STEP.pending = (rows, np.asarray(num_scheduled_tokens))
        return original(self, req_ids, idx_mapping, num_scheduled_tokens, *args, **kwargs)

    return make_lora_inputs


def _mapping(original):
    @functools.wraps(original)
    def _set_active_loras(self, *args, **kwargs):
        pending, _STEP.pending = _STEP.pending, None
        _STEP.groups, _STEP.dora = [], False  # a mapping set without the step's requests (dummy runs): no Glider
        result = original(self, *args, **kwargs)  # loads the step's adapters
        if pending is not None:
            _STEP.groups = _step_groups(*pending)
            _STEP.dora = any(adapter.has_dora for adapter, _, _ in _STEP.groups)
        return result

    return _set_active_loras


def _step_groups(
    rows: list[tuple[Any, Optional[torch.Tensor]]], num_scheduled_tokens: np.ndarray
) -> list[tuple[VllmGliderAdapter, torch.Tensor, Any]]:
    """The Glider tokens of a step (its requests in batch order: LoRA request and scores, and token counts), grouped
    by adapter and by what they route with."""
    adapters = _glider_adapters()
    if not adapters:
        return []
    starts = np.concatenate([[0], np.cumsum(num_scheduled_tokens)])
    # per (adapter, whether its requests carry scores): each request's token positions and scores (1, E) or None
    requests: dict[tuple[int, bool], list[tuple[np.ndarray, Optional[torch.Tensor]]]] = {}
    for row, (lora, scores) in enumerate(rows[: len(num_scheduled_tokens)]):
        if lora is None or lora.lora_int_id not in adapters:
            continue
        positions = np.arange(starts[row], starts[row + 1])
        requests.setdefault((lora.lora_int_id, scores is not None), []).append((positions, scores))
    groups = []
    for (lora_id, _), parts in requests.items():
        adapter = adapters[lora_id]
        groups += [(adapter, positions.to(adapter.device), call) for positions, call in adapter.calls(parts)]
    return groups


def _routing(original):
    @functools.wraps(original)
    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not _STEP.groups:
            return original(self, x, output)
        sharded = self.tp_size > 1
        # the base output before any LoRA, only when DoRA experts scale it
        base = output.reshape(-1, output.shape[-1]).clone() if _STEP.dora and not sharded else None
        output = original(self, x, output)
        flat, inputs = output.reshape(-1, output.shape[-1]), x.reshape(-1, x.shape[-1])
        row_parallel = _is_row_parallel(self)
        if sharded and row_parallel:  # each rank holds a slice of the input features: routing needs all of them
            from vllm.distributed.communication_op import tensor_model_parallel_all_gather

            inputs = tensor_model_parallel_all_gather(inputs.contiguous(), dim=-1)
        names = _module_names(self)
        for adapter, positions, call in _STEP.groups:
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
    if all(delta is None for delta in deltas):  # no expert adapts this layer's modules
        return
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
