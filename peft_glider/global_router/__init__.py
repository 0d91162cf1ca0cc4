"""Global router: instruction writers, sentence embedders, an on-disk cache and per-row global scores."""

from .cache import JsonCache, default_cache_dir
from .embedders import Embedder, SentenceTransformerEmbedder
from .router import AUTO_ALPHA_RULES, ExpertDescriptions, GlobalRouter, RouteInfo, default_writer
from .writers import (
    FEW_SHOT_SYSTEM_PROMPT,
    HybridWriter,
    InstructionWriter,
    InstructionWriterError,
    LocalModelWriter,
    OpenAIWriter,
    SamplesWriter,
    instruction_prompt,
)

__all__ = [
    "AUTO_ALPHA_RULES",
    "Embedder",
    "FEW_SHOT_SYSTEM_PROMPT",
    "ExpertDescriptions",
    "GlobalRouter",
    "HybridWriter",
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
