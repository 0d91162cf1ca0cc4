"""Tasks as multiple-choice examples, and their disjoint splits (evaluation / calibration / training)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from .assets import bbc_dir
from .sources import bigbench_dir

logger = logging.getLogger(__name__)

BBC_WORDS = 40  # words of each article shown to the model (title and lead)


@dataclass(frozen=True)
class Example:
    """A multiple-choice example: the option(s) with the top score in `correct` are right."""

    input: str
    options: tuple[str, ...]
    correct: frozenset[int]

    @property
    def prompt(self) -> str:
        return self.input + "\nAnswer:"

    @property
    def target(self) -> str:
        """The best option, as the expert learns to write it after the prompt."""
        return " " + self.options[min(self.correct)]

    def pair(self) -> tuple[str, str]:
        return self.prompt, self.target


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint parts of one task: evaluation examples never feed training, gates or instructions."""

    name: str
    eval: list[Example]
    train: list[Example]  # the expert's LoRA and gate training data (held-in tasks)
    expert_samples: list[Example]  # calibration: describe the expert (its instruction) and calibrate alpha
    query_samples: list[Example]  # calibration: describe the task as a query (its global scores)


def _bigbench_examples(task_file: Path) -> list[Example]:
    spec = json.loads(task_file.read_text())
    append_choices = spec.get("append_choices_to_input", True)
    examples = []
    for row in spec.get("examples", []):
        scores = row.get("target_scores")
        if not scores or not isinstance(row.get("input"), str):
            continue
        options = tuple(str(option) for option in scores)
        best = max(scores.values())
        if best <= 0 or len(options) < 2:
            continue
        text = row["input"].strip()
        if append_choices:
            text += "".join(f"\n  choice: {option}" for option in options)
        correct = frozenset(i for i, score in enumerate(scores.values()) if score == best)
        examples.append(Example(text, options, correct))
    return examples


def load_bigbench(cache: Path, task: str) -> list[Example]:
    """The multiple-choice examples of a BIG-bench task (its subtasks' too, for tasks split into subtasks)."""
    folder = bigbench_dir(cache) / task
    if not (folder / "task.json").exists():
        raise FileNotFoundError(f"Task {task!r} is not laid out in {folder.parent}: run the set-up.")
    examples = _bigbench_examples(folder / "task.json")
    for subtask in sorted(folder.glob("*/task.json")):
        examples += _bigbench_examples(subtask)
    if not examples:
        raise ValueError(f"BIG-bench task {task!r} has no multiple-choice examples (target_scores).")
    return examples


def load_bbc(cache: Path) -> list[Example]:
    """BBC News topic classification: the article's first words, five topics."""
    folder = bbc_dir(cache)
    labels = tuple(sorted(path.name for path in folder.iterdir() if path.is_dir()))
    question = f"\nWhich topic is this news article about: {', '.join(labels[:-1])} or {labels[-1]}?"
    examples = []
    for index, label in enumerate(labels):
        for article in sorted((folder / label).glob("*")):
            words = article.read_text(encoding="utf-8", errors="replace").split()
            examples.append(Example(" ".join(words[:BBC_WORDS]) + question, labels, frozenset([index])))
    return examples


def load_task(cache: Path, task: str) -> list[Example]:
    return load_bbc(cache) if task == "bbc" else load_bigbench(cache, task)


def _distinct_in_seeded_order(examples: list[Example], name: str, seed: int) -> list[Example]:
    """The task's examples with each input kept once (its first occurrence), shuffled by `seed` and the task name."""
    first: dict[str, Example] = {}
    for example in examples:
        first.setdefault(example.input, example)
    order = list(first.values())
    random.Random(f"{seed}:{name}").shuffle(order)
    return order


def split_task(
    examples: list[Example], name: str, num_eval: int, num_train: int, seed: int, num_samples: int = 3
) -> TaskSplit:
    """Seeded split into three parts that never overlap: evaluation, calibration (2 x `num_samples` expert samples,
    which write the expert's instruction and calibrate alpha, and `num_samples` query samples, which route the task)
    and training (the expert's LoRA and gates). Inputs that repeat are kept once, so no evaluation question is ever
    seen anywhere else. A task with fewer than `num_eval` + 3 x `num_samples` distinct examples evaluates all but
    the calibration part (logged)."""
    order = _distinct_in_seeded_order(examples, name, seed)
    reserved = 3 * num_samples
    if len(order) <= reserved:
        raise ValueError(
            f"Task {name!r} has {len(order)} distinct multiple-choice examples: at least {reserved + 1} are needed "
            f"({reserved} for the instructions, the rest evaluated)."
        )
    num_evaluated = min(num_eval, len(order) - reserved)
    if num_evaluated < num_eval:
        logger.warning("Task %r has %d distinct examples: %d evaluated instead of %d.",
                       name, len(order), num_evaluated, num_eval)
    evaluation, calibration = order[:num_evaluated], order[num_evaluated:num_evaluated + reserved]
    train = order[num_evaluated + reserved:][:num_train]
    return TaskSplit(name, evaluation, train, calibration[: 2 * num_samples], calibration[2 * num_samples:])


def library_split(examples: list[Example], name: str, num_train: int, seed: int, num_samples: int = 3) -> TaskSplit:
    """A library-only task: it gets an expert and is never evaluated: 2 x `num_samples` distinct examples are its
    expert samples (its instruction and alpha calibration), up to `num_train` of the others train it."""
    order = _distinct_in_seeded_order(examples, name, seed)
    if len(order) <= 2 * num_samples:
        raise ValueError(f"Task {name!r} has {len(order)} distinct multiple-choice examples: an expert needs more "
                         f"than {2 * num_samples}.")
    return TaskSplit(name, [], order[2 * num_samples:][:num_train], order[: 2 * num_samples], [])


@dataclass(frozen=True)
class MajorityAnswer:
    """The most frequent right answer among a task's evaluation examples, and what always giving it scores."""

    answer: str
    share: float  # of examples whose first right option is `answer`
    hits: list[int]  # per example: 1 where `answer` is one of its right options

    @property
    def accuracy(self) -> float:
        return sum(self.hits) / len(self.hits)


def majority_answer(examples: list[Example]) -> MajorityAnswer:
    """The lean of a task: a model that always answers the most frequent right option scores `accuracy` (above
    `share` only where examples have several right options). Counted on the evaluated examples themselves."""
    answers = [example.options[min(example.correct)] for example in examples]
    answer = max(dict.fromkeys(answers), key=answers.count)  # the first of the most frequent, deterministic
    hits = [int(any(example.options[i] == answer for i in example.correct)) for example in examples]
    return MajorityAnswer(answer, answers.count(answer) / len(answers), hits)
