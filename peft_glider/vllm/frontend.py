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
        self._routers: dict[str, Optional[tuple]] = {}  # folder -> (router, embeddings (E, e), embedder) or None
        self._lock = threading.Lock()

    def check(self, folder: str, hf_config: Any) -> None:
        """Raise `ValueError` naming the cause when the Glider adapter in `folder` cannot be served on the model of
        `hf_config` (checked once per folder: loaded as a worker loads it, then dropped)."""
        with self._lock:
            if folder not in self._checked:
                try:
                    VllmGliderAdapter(folder, hf_config)
                    self._checked[folder] = None
                except Exception as error:  # any failure a worker would meet, reported instead of killing it
                    self._checked[folder] = f"{type(error).__name__}: {error}"
            cause = self._checked[folder]
        if cause is not None:
            raise ValueError(f"Glider adapter {folder!r} cannot be served on this model: {cause}")

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
