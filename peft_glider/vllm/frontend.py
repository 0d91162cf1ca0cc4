"""What vLLM's frontend process does for Glider adapters (where the prompt text and the HTTP requests are):

- checks a Glider adapter folder once, before any request reaches the engine, by loading it as a worker would
  (`VllmGliderAdapter`): a broken folder or an adapter made for another base is refused with its cause (HTTP 400 on
  the server, a `ValueError` from `LLM.generate`), and the engine keeps serving;
- refuses Glider adapters in an engine mode whose layers never run the routing (compiled graphs, CUDA graphs,
  fully sharded LoRAs, dual-stream LoRA), naming the setting to change;
- gives each request its global scores from its own text, as `GliderModel.route(prompt)` computes them: the
  adapter's recorded global router (its instruction writer and embedder, `GlobalRouter.recorded`) against its
  experts' instruction embeddings. The scores travel to the workers in the request's `SamplingParams.extra_args`
  (`adapter.SCORES_KEY`); a request that carries its own keeps them;
- salts the request's prefix-cache keys with what it routes with (`routing_salt`): vLLM keys cached blocks by
  tokens and adapter only, and a Glider request's keys and values depend on its global scores.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Optional

import torch

from ..config import GliderConfig
from .adapter import SCORES_KEY, VllmGliderAdapter


class GliderFrontend:
    """The Glider adapters one vLLM frontend has seen, each checked and its global router loaded once."""

    def __init__(self) -> None:
        self._checked: dict[str, Optional[str]] = {}  # folder -> None (fits) or why it does not
        self._needs_scores: dict[str, bool] = {}  # folder -> whether its requests must carry global scores
        self._num_experts: dict[str, int] = {}
        self._routers: dict[str, Optional[tuple]] = {}  # folder -> (router, embeddings (E, e), embedder) or None
        self._lock = threading.Lock()

    def check(self, folder: str, vllm_config: Any) -> None:
        """Raise `ValueError` naming the cause when the Glider adapter in `folder` cannot be served by the engine of
        `vllm_config`: an engine mode that never runs the routing, an adapter that does not load on its model, or
        one whose experts would not fit in the memory vLLM leaves (checked once per folder: loaded as a worker
        loads it, counted, then dropped)."""
        mode = engine_mode_problem(vllm_config)
        if mode is not None:
            raise ValueError(f"Glider adapter {folder!r} cannot be served by this engine: {mode}")
        hf_config = vllm_config.model_config.hf_config
        with self._lock:
            if folder not in self._checked:
                try:
                    adapter = VllmGliderAdapter(folder, hf_config)
                    self._needs_scores[folder], self._num_experts[folder] = adapter.needs_scores, adapter.num_experts
                    needed = adapter.memory_bytes
                    del adapter
                    self._checked[folder] = memory_problem(needed, vllm_config)
                except Exception as error:  # any failure a worker would meet, reported instead of killing it
                    self._checked[folder] = f"{type(error).__name__}: {error}"
            cause = self._checked[folder]
        if cause is not None:
            raise ValueError(f"Glider adapter {folder!r} cannot be served on this model: {cause}")

    def check_scores(self, folder: str, scores: Any) -> None:
        """Raise `ValueError` unless `scores` (a request's own global scores) are one finite number per expert of the
        (checked) adapter in `folder`."""
        try:
            values = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"glider_scores must be a list of numbers, one per expert: {error}") from error
        expected = self._num_experts[folder]
        if values.numel() != expected or not torch.isfinite(values).all():
            raise ValueError(
                f"glider_scores must be {expected} finite numbers (one per expert of {folder!r}), got {values.numel()}."
            )

    def require_scores(self, folder: str) -> None:
        """Raise `ValueError` when a request without global scores cannot be routed by the (checked) adapter in
        `folder`: a resident-experts budget smaller than its library needs each request's candidates."""
        if self._needs_scores.get(folder):
            raise ValueError(
                f"Glider adapter {folder!r} holds fewer experts than it has (max_resident_experts): each request "
                "needs global scores, from its text (describe the experts with the samples writer) or given in "
                "SamplingParams(extra_args={'glider_scores': [...]})."
            )

    def scores(self, folder: str, text: str) -> Optional[list[float]]:
        """`text`'s global scores (E values) for the Glider adapter in `folder`; None when its experts were never
        described (no instruction embeddings: the adapter routes locally only). A router that cannot be rebuilt or
        run here is a `ValueError` naming the cause and the way around it."""
        try:
            with self._lock:
                if folder not in self._routers:
                    self._routers[folder] = _load_router(folder)
                loaded = self._routers[folder]
            if loaded is None:
                return None
            router, embeddings, embedder = loaded
            return router.score([[text]], embeddings, embedder).scores[0].tolist()
        except Exception as error:
            raise ValueError(
                f"Glider adapter {folder!r}: the request's global scores cannot be computed from its text here "
                f"({type(error).__name__}: {error}). Send them with the request instead: "
                f"SamplingParams(extra_args={{{SCORES_KEY!r}: [...]}}), or over HTTP "
                f"extra_body={{'vllm_xargs': {{{SCORES_KEY!r}: [...]}}}}."
            ) from error


def engine_mode_problem(vllm_config: Any) -> Optional[str]:
    """Why the engine of `vllm_config` would not route Glider tokens (None when it does): the routing runs in Python
    inside each LoRA layer's `_apply_lora_to_output`, which compiled graphs and CUDA-graph replays do not hold and
    which fully sharded and dual-stream LoRA layers never call."""
    from vllm import envs
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE:
        return (f"the model is compiled (compilation mode {compilation.mode.name}), and a compiled graph does not "
                "hold the routing: start the engine with --enforce-eager (LLM(..., enforce_eager=True)).")
    if compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        return (f"CUDA graphs are on (cudagraph mode {compilation.cudagraph_mode.name}), and a replay runs no "
                "routing: start the engine with --enforce-eager (LLM(..., enforce_eager=True)).")
    if vllm_config.lora_config is not None and vllm_config.lora_config.fully_sharded_loras:
        return "--fully-sharded-loras layers never call the routing: start the engine without it."
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        return "dual-stream LoRA layers never call the routing: unset VLLM_LORA_ENABLE_DUAL_STREAM."
    return None


def memory_problem(needed: int, vllm_config: Any) -> Optional[str]:
    """Why `needed` bytes (an adapter, as each worker holds it: every rank holds all of it) would not fit beside
    what vLLM has taken (None when they do). A worker loads an adapter at its first request, after vLLM sized its
    KV cache: on a CPU engine against the host memory available now (the KV cache is allocated at start-up), on
    a GPU against the share of the device that `--gpu-memory-utilization` leaves to others."""
    from vllm.platforms import current_platform

    mib = 2**20
    if vllm_config.device_config.device.type == "cpu":
        import psutil

        free = psutil.virtual_memory().available
        where, advice = "host memory available", "free host memory or lower VLLM_CPU_KVCACHE_SPACE"
    else:
        utilization = vllm_config.cache_config.gpu_memory_utilization
        try:
            total = current_platform.get_device_total_memory(0)
        except Exception:  # a platform that cannot tell (no NVML, say): not counted rather than refused
            return None
        free = int(total * (1 - utilization))
        where = f"device memory left beside vLLM's share (--gpu-memory-utilization {utilization:g})"
        advice = "lower --gpu-memory-utilization"
    if needed <= free:
        return None
    return (f"its experts, gates and routing tensors need {needed / mib:.0f} MiB in each worker, more than the "
            f"{free / mib:.0f} MiB of {where}: {advice}, or save it with a smaller max_resident_experts (the rest "
            "of the library stays on disk).")


def routing_salt(salt: Optional[str], scores: list[float]) -> str:
    """A request's prefix-cache salt that also names its global scores: requests routed alike share cached blocks,
    requests routed otherwise never do. `salt`: the request's own `cache_salt`, kept in the result."""
    digest = hashlib.sha256(torch.tensor(scores, dtype=torch.float32).numpy().tobytes()).hexdigest()[:32]
    return f"{salt or ''}|glider:{digest}"


def _load_router(folder: str) -> Optional[tuple]:
    from safetensors import safe_open

    from ..global_router import GlobalRouter

    config = GliderConfig.from_pretrained(folder)
    if config.instruction_embedding_dim is None:
        return None
    embeddings: Optional[torch.Tensor] = None
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as handle:
        key = next((key for key in handle.keys() if "glider_instruction_embeddings" in key), None)
        embeddings = None if key is None else handle.get_tensor(key)
    if embeddings is None:
        raise ValueError(f"Glider adapter {folder!r}: its config has instruction embeddings, its checkpoint none.")
    return GlobalRouter.recorded(config.instruction_writer, config.embedder), embeddings.float(), config.embedder
