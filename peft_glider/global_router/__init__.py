"""Global router: instruction writers, sentence embedders, an on-disk cache and per-row global scores."""

from .cache import JsonCache, default_cache_dir
from .embedders import Embedder, SentenceTransformerEmbedder
from .router import ExpertDescriptions, GlobalRouter, RouteInfo, default_writer
from .writers import (
    InstructionWriter,
    InstructionWriterError,
    LocalModelWriter,
    OpenAIWriter,
    SamplesWriter,
    instruction_prompt,
)

__all__ = [
    "Embedder",
    "ExpertDescriptions",
    "GlobalRouter",
    "InstructionWriter",
    "InstructionWriterError",
    "JsonCache",
    "LocalModelWriter",
    "OpenAIWriter",
    "RouteInfo",
    "SamplesWriter",
    "SentenceTransformerEmbedder",
    "default_cache_dir",
    "default_writer",
    "instruction_prompt",
]
