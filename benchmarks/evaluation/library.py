"""The expert library: one LoRA expert per held-in (and library-only) task, trained with PEFT, then its
Phatgoose gates.

A held-in expert lives in `<cache>/experts/<settings hash>/<task>/`, a library-only one in
`<cache>/experts/library-only/<task>-<hash of its settings and data>/` (`library_only_folder`: cached per expert,
so a larger library reuses the experts of a smaller one). Written atomically (a half-trained expert is never
picked up); a rerun with the same settings and splits reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from peft_glider.expert_training import LoraTrainingArguments, train_lora_expert
from peft_glider.hub import GATES_FILE
from peft_glider.local_router import GateTrainingArguments, train_expert_gates

from .tasks import TaskSplit


@dataclass(frozen=True)
class ExpertSettings:
    """How each expert and its gates are trained (printed with the results)."""

    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    top_layers: Optional[int] = 10  # adapt only the top N decoder layers (None: all)
    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_length: int = 192
    gate_steps: int = 40
    gate_batch_size: int = 8
    seed: int = 0

    def signature(self, extra: Any) -> str:
        """A short hash of these settings and `extra` (the training data): the library's folder name."""
        return hashlib.sha256(json.dumps([asdict(self), extra], sort_keys=True).encode()).hexdigest()[:12]


def _train_lora(base_model: Any, tokenizer: Any, split: TaskSplit, settings: ExpertSettings, folder: Path) -> float:
    """Train and save one LoRA expert on the split's training pairs; returns the seconds it took."""
    start = time.perf_counter()
    args = LoraTrainingArguments(
        rank=settings.rank, lora_alpha=settings.lora_alpha, target_modules=settings.target_modules,
        top_layers=settings.top_layers, steps=settings.steps, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, max_length=settings.max_length, seed=settings.seed,
    )
    train_lora_expert(base_model, tokenizer, [e.pair() for e in split.train], folder, args, name=split.name)
    return time.perf_counter() - start


def library_only_folder(cache: Path, split: TaskSplit, settings: ExpertSettings) -> Path:
    """Where a library-only task's expert is kept: named by its own settings and training data only."""
    return cache / "experts" / "library-only" / f"{split.name}-{settings.signature([e.input for e in split.train])}"


def build_library(
    load_base: Callable[[], Any],
    tokenizer: Any,
    splits: dict[str, TaskSplit],
    targets: dict[str, Path],
    settings: ExpertSettings,
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Train (or reuse) the expert and gates of every task in `targets` ({task: its folder}):
    `({task: folder}, {task: timings})`."""
    folders, timings = {}, {}
    for task, folder in targets.items():
        timing = json.loads((folder / "timings.json").read_text()) if (folder / "timings.json").exists() else {}
        if not (folder / "adapter_model.safetensors").exists():
            timing = {"lora_seconds": _train_lora(load_base(), tokenizer, splits[task], settings, folder)}
        if not (folder / GATES_FILE).exists():
            start = time.perf_counter()
            args = GateTrainingArguments(
                steps=settings.gate_steps, batch_size=settings.gate_batch_size,
                max_length=settings.max_length, seed=settings.seed,
            )
            train_expert_gates(load_base(), str(folder), [e.pair() for e in splits[task].train], tokenizer, args)
            timing["gate_seconds"] = time.perf_counter() - start
        (folder / "timings.json").write_text(json.dumps(timing))
        folders[task], timings[task] = str(folder), timing
    return folders, timings
