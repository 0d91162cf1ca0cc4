"""What vLLM's frontend process does for Glider adapters (where the prompt text and the HTTP requests are):

- checks a Glider adapter folder once, before any request reaches the engine, by loading it as a worker would
  (`VllmGliderAdapter`): a broken folder or an adapter made for another base is refused with its cause (HTTP 400 on
  the server, a `ValueError` from `LLM.generate`), and the engine keeps serving;
- gives each request its global scores from its own text, as `GliderModel.route(prompt)` computes them: the
  adapter's recorded global router (its instruction writer and embedder, `GlobalRouter.recorded`) against its
  experts' instruction embeddings. The scores travel to the workers in the request's `SamplingParams.extra_args`
  (`adapter.SCORES_KEY`); a request that carries its own keeps them.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import torch

from ..config import GliderConfig
from .adapter import VllmGliderAdapter


class GliderFrontend:
    """The Glider adapters one vLLM frontend has seen, each checked and its global router loaded once."""

    def __init__(self) -> None:
        self._checked: dict[str, Optional[str]] = {}  # folder -> None (fits) or why it does not
        self._needs_scores: dict[str, bool] = {}  # folder -> whether its requests must carry global scores
        self._num_experts: dict[str, int] = {}
        self._routers: dict[str, Optional[tuple]] = {}  # folder -> (router, embeddings (E, e), embedder) or None
        self._lock = threading.Lock()

    def check(self, folder: str, hf_config: Any) -> None:
        """Raise `ValueError` naming the cause when the Glider adapter in `folder` cannot be served on the model of
        `hf_config` (checked once per folder: loaded as a worker loads it, then dropped)."""
        with self._lock:
            if folder not in self._checked:
                try:
                    adapter = VllmGliderAdapter(folder, hf_config)
                    self._needs_scores[folder], self._num_experts[folder] = adapter.needs_scores, adapter.num_experts
                    self._checked[folder] = None
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
        described (no instruction embeddings: the adapter routes locally only)."""
        with self._lock:
            if folder not in self._routers:
                self._routers[folder] = _load_router(folder)
            loaded = self._routers[folder]
        if loaded is None:
            return None
        router, embeddings, embedder = loaded
        return router.score([[text]], embeddings, embedder).scores[0].tolist()


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
