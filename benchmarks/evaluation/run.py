"""The pipeline: set-up -> expert library (LoRA + gates) -> instructions -> rank-classification of every method.

Every stage is cached under the cache folder: the extracted data and converted model, the expert library
(keyed by its settings), the instructions and embeddings, and each (method, task) accuracy, so a rerun after
an interruption, or of the report alone, redoes nothing that is finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from filelock import FileLock

from peft_glider.global_router import GlobalRouter, LocalModelWriter, OpenAIWriter, RouteInfo, SamplesWriter

from . import assets, methods
from .library import ExpertSettings, build_library, library_only_folder
from .scoring import rank_classify, tokenize_options
from .registry_tasks import place_tasks
from .sources import TaskSource, TaskSourceError, lay_out_added, task_provenance, task_sources
from .tasks import TaskSplit, library_split, load_task, majority_answer, split_task

# The default library and held-out tasks, all from the registry (`registry_tasks.py`): 24 experts in families
# (science QA, NLI, commonsense, MMLU subjects by field), held-out tasks related to a family or to none.
DEFAULT_HELD_IN = [
    "arc_challenge", "sciq", "openbookqa", "rte", "mrpc", "boolq", "piqa", "siqa", "csqa", "hellaswag",
    "mmlu_high_school_biology", "mmlu_nutrition", "mmlu_clinical_knowledge", "mmlu_high_school_chemistry",
    "mmlu_high_school_physics", "mmlu_high_school_us_history", "mmlu_high_school_world_history", "mmlu_prehistory",
    "mmlu_high_school_macroeconomics", "mmlu_high_school_psychology", "mmlu_high_school_geography",
    "mmlu_high_school_government_and_politics", "mmlu_philosophy", "mmlu_marketing",
]
DEFAULT_HELD_OUT = [
    "arc_easy", "cb", "copa", "mmlu_college_biology", "mmlu_high_school_european_history",
    "mmlu_high_school_microeconomics",  # related: a held-in family exists
    "sst2", "winogrande", "arithmetic", "mmlu_computer_security",  # unrelated: no held-in task of their family
]
QUICK_HELD_IN = ["arc_challenge", "sciq", "rte"]
QUICK_HELD_OUT = ["arc_easy", "sst2"]
ADDED_PREFIX = "added-"  # tasks of --held-out-dir are named "added-<file stem>" (never a registry task's name)
LARGE_LIBRARY = [f"mmlu_{subject}" for subject in (  # library-only experts of `--library large`: never evaluated
    "anatomy", "astronomy", "business_ethics", "college_physics", "econometrics", "formal_logic", "global_facts",
    "human_sexuality", "international_law", "medical_genetics", "moral_disputes", "world_religions",  # --quick: 12
    "college_chemistry", "college_medicine", "conceptual_physics", "electrical_engineering", "human_aging",
    "jurisprudence", "logical_fallacies", "management", "miscellaneous", "moral_scenarios", "professional_accounting",
    "professional_law", "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology",
)]
LARGE_CANDIDATES = (8, 16)  # the candidates rows of a large-library run
QUICK_LARGE_LIBRARY = 12  # a quick large run takes the first 12 library-only tasks
MAJORITY = "Majority answer"
SCORING = "acc_norm"  # length-normalized log-likelihood (scoring.py); part of every result key


@dataclass
class RunSettings:
    """What one run evaluates and how (the defaults are the full run)."""

    held_in: list[str] = field(default_factory=lambda: list(DEFAULT_HELD_IN))
    held_out: list[str] = field(default_factory=lambda: list(DEFAULT_HELD_OUT))
    num_eval: int = 30  # evaluation examples per held-in task (fewer where a task has fewer)
    num_eval_held_out: Optional[int] = 60  # ... per held-out task (None: num_eval)
    num_train: int = 240  # training examples per held-in task (LoRA and gates)
    seed: int = 0
    # 30 LoRA steps at lr 2e-3 and 15 gate steps, inputs cut to 160 tokens: about 70 s per expert on 2 cores, so
    # that 24 experts and every method's evaluation fit the full run's 3-hour budget with room to spare.
    experts: ExpertSettings = field(default_factory=lambda: ExpertSettings(
        steps=30, gate_steps=15, learning_rate=2e-3, max_length=160))
    endpoint_url: Optional[str] = None  # an OpenAI-compatible endpoint as a third global-router source
    endpoint_model: Optional[str] = None
    candidates: tuple[int, ...] = (8,)  # extra rows: GLIDER alpha="auto" routing among each row's M best experts
    library: list[str] = field(default_factory=list)  # library-only tasks: an expert each, never evaluated
    # How library-only experts are trained: a third of the held-in steps (at twice the learning rate) on inputs cut
    # to their last 128 tokens, to fit 32 of them in the large run's budget (about a minute each on 2 cores).
    library_experts: ExpertSettings = field(default_factory=lambda: ExpertSettings(
        steps=20, gate_steps=10, learning_rate=2e-3, max_length=128))
    llm_source: bool = False  # also route with SmolLM2's instructions (the "GLIDER α=auto · llm" row)
    arrow_local: bool = False  # also the "GLIDER α=auto · Arrow local" row (Arrow prototypes, no gates)
    bigbench_dir: Optional[str] = None  # a local BIG-bench checkout or task folders, tried first (sources.py)
    tasks_dir: Optional[str] = None  # the user's own tasks, <task>.jsonl, tried next
    # --held-out-dir: evaluate only these held-out tasks (`added-<stem>`), against the library a run with the same
    # settings built; nothing is trained (a missing expert is an error)
    held_out_dir: Optional[str] = None

    def task_sources(self) -> list[TaskSource]:
        """Where this run's tasks are read from, in the order tried (the user's folders first)."""
        return task_sources(self.bigbench_dir, self.tasks_dir)

    def with_held_out_dir(self, folder: str) -> "RunSettings":
        """These settings evaluating only the `<task>.jsonl` files of `folder`, as held-out tasks named
        `added-<stem>`, against this run's library (trained by an earlier run; nothing is trained)."""
        stems = sorted(path.stem for path in Path(folder).glob("*.jsonl"))
        if not stems:
            raise TaskSourceError(f"--held-out-dir {folder}: no <task>.jsonl file there.")
        return replace(self, held_out=[ADDED_PREFIX + stem for stem in stems], held_out_dir=str(folder))

    def num_evaluated(self, task: str) -> int:
        """How many examples of `task` are evaluated (at most)."""
        held_out = task in self.held_out and self.num_eval_held_out is not None
        return self.num_eval_held_out if held_out else self.num_eval

    @classmethod
    def quick(cls, **overrides: Any) -> "RunSettings":
        """3 held-in and 2 held-out tasks, fewer steps and examples: about 7 minutes on 2 CPU cores."""
        experts = ExpertSettings(steps=30, gate_steps=15, top_layers=6, learning_rate=2e-3, max_length=160)
        settings = dict(held_in=list(QUICK_HELD_IN), held_out=list(QUICK_HELD_OUT), num_eval=20, num_eval_held_out=None,
                        num_train=200, candidates=(),
                        library_experts=ExpertSettings(steps=10, gate_steps=5, top_layers=6, learning_rate=2e-3,
                                                       max_length=128))
        return cls(**{**settings, "experts": experts, **overrides})

    def with_large_library(self, quick: bool = False) -> "RunSettings":
        """These settings plus the 31 library-only experts (12 when `quick`) and candidates rows at M = 8, 16; the
        rows of the offline default only (SmolLM2 writing 55 instructions would not fit the budget)."""
        library = LARGE_LIBRARY[:QUICK_LARGE_LIBRARY] if quick else LARGE_LIBRARY
        return replace(self, library=list(library), candidates=LARGE_CANDIDATES, llm_source=False)

    @property
    def evaluated(self) -> list[str]:
        """The tasks scored: the held-out ones only for --held-out-dir."""
        return self.held_out if self.held_out_dir else self.held_in + self.held_out

    def check(self) -> None:
        if len(self.held_in) < 2:
            raise ValueError(f"Routing needs at least 2 held-in tasks (top-k={methods.TOP_K}); got {self.held_in}.")
        overlap = sorted(set(self.held_in) & set(self.held_out))
        if overlap:
            raise ValueError(f"Task(s) {overlap} are both held-in and held-out.")
        evaluated_in_library = sorted(set(self.library) & set(self.evaluated))
        if evaluated_in_library:
            raise ValueError(f"Task(s) {evaluated_in_library} are library-only (never evaluated) and also evaluated.")
        everything = self.evaluated + self.library
        duplicates = sorted({t for t in everything if everything.count(t) > 1})
        if duplicates:
            raise ValueError(f"Task(s) {duplicates} are listed twice.")
        named_like_added = sorted(t for t in self.held_in + self.library if t.startswith(ADDED_PREFIX))
        if named_like_added:
            raise ValueError(f"Task(s) {named_like_added}: names starting with {ADDED_PREFIX!r} are --held-out-dir's.")
        if bool(self.endpoint_url) != bool(self.endpoint_model):
            raise ValueError("An endpoint needs both --endpoint-url and --endpoint-model.")


class ResultStore:
    """(method pass, task) -> accuracy and routing, in one JSON file, written atomically after every entry.

    Two runs may share a cache (a `--held-out-dir` run beside a full one): each entry is merged into what the file
    holds now, under a file lock, so neither run's entries overwrite the other's.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> dict:
        return self.entries[key]

    def put(self, key: str, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            self.entries = {**self.entries, **self._read(), key: entry}
            write_text_atomically(self.path, json.dumps(self.entries, indent=1))


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all (through a partial file renamed into place)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class Pipeline:
    """One run: builds what is missing, evaluates what is not scored yet, returns the results as a dict."""

    def __init__(self, settings: RunSettings, cache: Path) -> None:
        from transformers import AutoTokenizer

        settings.check()
        self.settings, self.cache = settings, cache
        self.tasks = settings.evaluated
        start = time.perf_counter()
        added = lay_out_added(cache, Path(settings.held_out_dir), ADDED_PREFIX) if settings.held_out_dir else []
        everything = [task for task in settings.held_in + settings.held_out + settings.library if task not in added]
        assets.setup(cache, everything, settings.task_sources())
        self.setup_seconds = time.perf_counter() - start
        self.tokenizer = AutoTokenizer.from_pretrained(assets.base_model_dir(cache))
        self.splits: dict[str, TaskSplit] = {  # held-in splits even when not evaluated: they name the library
            task: split_task(load_task(cache, task), task, settings.num_evaluated(task), settings.num_train,
                             settings.seed)
            for task in settings.held_in + settings.held_out
        }
        self.splits.update({task: library_split(load_task(cache, task), task, settings.num_train, settings.seed)
                            for task in settings.library})
        self.eval_keys = {  # names each task's evaluated examples and the scoring in the result keys
            task: hashlib.sha256("\n".join([SCORING] + [f"{e.input}|{e.options}|{sorted(e.correct)}"
                                                       for e in self.splits[task].eval]).encode()).hexdigest()[:8]
            for task in self.tasks
        }
        trained_on = {task: [e.input for e in self.splits[task].train] for task in settings.held_in}
        signature = settings.experts.signature(trained_on)  # a change of data or settings: a new library
        self.expert_folders = {task: cache / "experts" / signature / task for task in settings.held_in}
        self.expert_folders.update({
            task: library_only_folder(cache, self.splits[task], settings.library_experts) for task in settings.library
        })
        # base and oracle need no library; every other method's scores are keyed by the library-only experts too
        library_only = sorted(self.expert_folders[task].name for task in settings.library)
        self.library_key = f"library-{hashlib.sha256(json.dumps(library_only).encode()).hexdigest()[:8]}/" \
            if library_only else ""
        self.store = ResultStore(cache / "results" / f"{signature}.json")
        self.scoring_seconds: dict[str, float] = {}  # {entry key: seconds its scoring took, in this run or earlier}

    def load_base(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(assets.base_model_dir(self.cache), dtype=torch.float32).eval()

    def library(self) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
        """Every expert and its gates (held-in tasks', then library-only tasks'), trained where missing:
        `({task: folder}, {task: timings})`. With --held-out-dir nothing is trained: a missing expert is an error."""
        missing = [task for task, folder in self.expert_folders.items() if not (folder / "timings.json").exists()]
        if self.settings.held_out_dir and missing:
            raise TaskSourceError(
                f"--held-out-dir evaluates against a finished run's library, and {self.cache} has no expert for "
                f"{missing} with these settings: run the evaluation first with the same --cache-dir and settings.")
        folders, timings = {}, {}
        for tasks, settings in ((self.settings.held_in, self.settings.experts),
                                (self.settings.library, self.settings.library_experts)):
            built, took = build_library(self.load_base, self.tokenizer, self.splits,
                                        {task: self.expert_folders[task] for task in tasks}, settings)
            folders.update(built)
            timings.update(took)
        return folders, timings

    def expert_samples(self, tasks: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
        """Each task's expert samples as (input, output) pairs: what its instruction is written from."""
        return {task: [e.pair() for e in self.splits[task].expert_samples] for task in tasks}

    # ------------------------------------------------------------------ scoring

    def score(self, key: str, model: Any, task: str, glider: Any = None, uses_library: bool = True) -> dict:
        """Accuracy of `model` on the task's evaluation examples, cached under `key|task` (prefixed by the
        library-only experts when `uses_library`); with `glider`, also the share of tokens whose first choice was
        each expert (all modules)."""
        entry_key = f"{self.library_key if uses_library else ''}{key}|{task}|{self.eval_keys[task]}"
        if entry_key in self.store:
            self.scoring_seconds[entry_key] = self.store[entry_key]["seconds"]
            return self.store[entry_key]
        start = time.perf_counter()
        trace_context = glider.routing_trace() if glider is not None else contextlib.nullcontext()
        with trace_context as trace:
            hits = rank_classify(model, self.tokenizer, self.splits[task].eval, desc=entry_key)
        entry = {"accuracy": sum(hits) / len(hits), "n": len(hits), "hits": [int(hit) for hit in hits],
                 "seconds": time.perf_counter() - start}
        if trace is not None:
            counts = trace.counts(first_choice_only=True).float()
            entry["first_choice_share"] = dict(zip(trace.expert_names, (counts / counts.sum()).tolist()))
        self.store.put(entry_key, entry)
        self.scoring_seconds[entry_key] = entry["seconds"]
        return entry

    def default_router(self) -> GlobalRouter:
        """The offline default's global router (`methods.DEFAULT_SOURCE`: the raw samples, no LLM)."""
        return GlobalRouter(SamplesWriter(), cache_dir=self.cache / "global")

    def routers(self) -> dict[str, GlobalRouter]:
        """The global-router sources: the local LLM's instructions (SmolLM2, the base model itself, loaded here),
        the default (the raw samples), and an OpenAI-compatible endpoint if configured."""
        folder = self.cache / "global"
        routers = {}
        if self.settings.llm_source:
            routers["llm"] = GlobalRouter(LocalModelWriter(str(assets.base_model_dir(self.cache))), cache_dir=folder)
        routers[methods.DEFAULT_SOURCE] = self.default_router()
        if self.settings.endpoint_url:
            writer = OpenAIWriter(self.settings.endpoint_model, base_url=self.settings.endpoint_url)
            routers["endpoint"] = GlobalRouter(writer, cache_dir=folder)
        return routers

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        held_in = [task for task in self.settings.held_in if task in self.tasks]
        start = time.perf_counter()
        folders, expert_timings = self.library()
        library_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.accuracy, self.hits = {}, {}

        majority = {task: majority_answer(self.splits[task].eval) for task in self.tasks}
        for task, answer in majority.items():
            self.record(MAJORITY, task, {"accuracy": answer.accuracy, "hits": answer.hits})
        base = self.load_base()
        for task in self.tasks:
            self.record("Base (zero-shot)", task, self.score("base", base, task, uses_library=False))
        del base
        experts = methods.single_expert_model(self.load_base, folders)
        for task in held_in:
            self.record(methods.ORACLE, task, self.score_expert(experts, task, task))
        merged = methods.merged_model(self.load_base, folders)
        for task in self.tasks:
            self.record("Uniform merge", task, self.score("merge", merged, task))
        del merged
        arrow = methods.arrow_model(self.load_base, folders)
        for task in self.tasks:
            self.record(f"PEFT Arrow (k={methods.TOP_K})", task, self.score("arrow", arrow, task))
        del arrow
        routing, alphas, shares = self.run_glider(folders)
        for task in self.tasks:  # retrieval: the whole query to the global router's top-1 expert
            self.record(methods.RETRIEVAL, task,
                        self.score_expert(experts, routing[methods.DEFAULT_SOURCE]["tasks"][task]["top_expert"], task))
        placement = place_tasks(self.settings.held_in, self.settings.held_out, self.settings.library)
        for task in self.tasks:
            if placement[task]["part"] == "related":
                self.record(methods.FAMILY_BEST, task, self.best_family_expert(experts, placement[task]["kin"], task))
        del experts
        agreement = self.run_glider_candidates(folders, alphas)
        eval_seconds = time.perf_counter() - start

        return {
            "settings": {**asdict(self.settings), "top_k": methods.TOP_K},
            "held_in": held_in,
            "held_out": self.settings.held_out,
            "placement": {task: placement[task] for task in self.tasks},
            "library": self.settings.library,
            "experts": list(folders),
            "majority": {task: {"answer": answer.answer, "share": answer.share, "accuracy": answer.accuracy}
                         for task, answer in majority.items()},
            "accuracy": self.accuracy,
            "hits": self.hits,
            "resolved_alpha": alphas,
            "global_routing": routing,
            "first_choice_share": shares,
            "candidates_agreement": agreement,
            "num_eval": {task: len(self.splits[task].eval) for task in self.tasks},
            "num_train": {task: len(self.splits[task].train) for task in self.settings.held_in + self.settings.library},
            "provenance": {task: task_provenance(self.cache, task) for task in self.tasks},
            "timings": {
                "setup_seconds": self.setup_seconds, "library_seconds": library_seconds,
                "evaluation_seconds": eval_seconds, "experts": expert_timings,
                "scoring": scoring_by_pass(self.scoring_seconds),
            },
            "versions": versions(),
        }

    def score_expert(self, experts: Any, expert: str, task: str) -> dict:
        """The task scored with one expert of the library alone (the oracle when it is the task's own)."""
        experts.set_adapter(expert)
        return self.score(f"expert:{expert}", experts, task, uses_library=False)

    def best_family_expert(self, experts: Any, kin: list[str], task: str) -> dict:
        """A related held-out task scored with each expert of its family alone: the best entry (ties: the first in
        `kin`), picked with the evaluation's answers, so an upper bound for routing the task to one family expert."""
        entries = [self.score_expert(experts, expert, task) for expert in kin]
        return max(entries, key=lambda entry: entry["accuracy"])

    def record(self, method: str, task: str, entry: dict) -> None:
        """Keep a scored entry's accuracy (and its per-example hits, for the intervals) under its table row."""
        self.accuracy.setdefault(method, {})[task] = entry["accuracy"]
        if "hits" in entry:  # entries cached before hits were kept have none
            self.hits.setdefault(method, {})[task] = entry["hits"]

    def route_task(self, router: GlobalRouter, glider: Any, task: str) -> tuple[RouteInfo, float]:
        """The task's global scores from its query samples (routed per task, as in the paper) against the experts
        `glider` holds, and the alpha that `alpha="auto"` resolves them to."""
        query = [[e.pair() for e in self.splits[task].query_samples]]
        info = router.score(query, glider.get_instruction_embeddings(), glider.peft_config["default"].embedder)
        with glider.global_scores(info.scores) as auto:
            return info, float(auto[0])

    def run_glider(self, folders: dict[str, str]) -> tuple[dict, dict, dict]:
        """Phatgoose and every GLIDER row (`record`ed). A row with alpha="auto" resolves, per task, to alpha 100 or
        3; a pass is scored once per (source, alpha) and shared by the rows that resolve to it. The last row uses
        the Arrow local router (no gate training) with the default source's global scores at alpha="auto"."""
        model = methods.glider_model(self.load_base, folders)
        glider = model.base_model
        routers = self.routers()
        rows = methods.glider_rows(list(routers))
        expert_samples = self.expert_samples(folders)
        alphas: dict[str, dict[str, float]] = {row.name: {} for row in rows}
        shares: dict[str, dict[str, dict]] = {}
        routing: dict[str, dict] = {}
        for task in self.tasks:  # Phatgoose: local routers only
            entry = self.score("phatgoose", model, task, glider)
            self.record(rows[0].name, task, entry)
            alphas[rows[0].name][task] = 0.0
            shares.setdefault("phatgoose", {})[task] = entry["first_choice_share"]
        for source, router in routers.items():
            router.describe_experts(model, expert_samples, calibrate_for="task")  # tasks are routed per task
            threshold = glider.peft_config["default"].auto_alpha_threshold
            routing[source] = {"auto_alpha_threshold": threshold, "tasks": {}}
            for task in self.tasks:
                info, auto_alpha = self.route_task(router, glider, task)
                cosines = dict(zip(glider.expert_names, info.scores[0].tolist()))
                routing[source]["tasks"][task] = {
                    "instruction": info.instructions[0], "cosine": cosines,
                    "top_expert": max(cosines, key=cosines.get), "auto_alpha": auto_alpha,
                }
                for row in (row for row in rows if row.source == source):
                    alpha = auto_alpha if row.alpha == "auto" else float(row.alpha)
                    key = f"glider:{source}:alpha={alpha:g}"
                    with glider.global_scores(info.scores, alpha=alpha):
                        entry = self.score(f"glider:{routed_by(router, info)}:alpha={alpha:g}", model, task, glider)
                    self.record(row.name, task, entry)
                    alphas[row.name][task] = alpha
                    shares.setdefault(key, {})[task] = entry["first_choice_share"]
        del model
        if self.settings.arrow_local:
            self.run_glider_arrow(folders, routers[methods.DEFAULT_SOURCE], expert_samples, alphas)
        return routing, alphas, shares

    def run_glider_arrow(self, folders: dict[str, str], router: GlobalRouter, expert_samples: dict,
                         alphas: dict) -> None:
        """GLIDER over Arrow prototypes: the same global scores and alpha="auto", no gate training at all."""
        model = methods.glider_model(self.load_base, folders, local_router="arrow")
        router.describe_experts(model, expert_samples, calibrate_for="task")  # the cached instructions
        self.score_auto_row(methods.GLIDER_ARROW.name, "glider-arrow", model, router, alphas)

    def score_auto_row(self, row: str, key: str, model: Any, router: GlobalRouter, alphas: dict,
                       each_task: Optional[Callable[[str, RouteInfo, float], None]] = None) -> None:
        """Score a GLIDER row at alpha="auto" on every task (scores cached under `key`), routed per task by
        `router`, recording the alpha each task resolved to in `alphas[row]`; `each_task(task, info, alpha)` runs
        after each task's score."""
        glider = model.base_model
        alphas[row] = {}
        for task in self.tasks:
            info, alpha = self.route_task(router, glider, task)
            with glider.global_scores(info.scores, alpha=alpha):
                entry = self.score(f"{key}:{routed_by(router, info)}:alpha={alpha:g}", model, task, glider)
            self.record(row, task, entry)
            alphas[row][task] = alpha
            if each_task is not None:
                each_task(task, info, alpha)

    def run_glider_candidates(self, folders: dict[str, str], alphas: dict) -> dict[str, dict[str, float]]:
        """GLIDER alpha="auto" (the offline default) with `candidates=M`, for each M of the settings: its accuracy,
        and how often its token selections equal full routing's (`selection_agreement`). Returns
        `{row name: {task: agreement}}`."""
        if not self.settings.candidates:
            return {}
        router = self.default_router()
        expert_samples = self.expert_samples(folders)
        full = methods.glider_model(self.load_base, folders)
        router.describe_experts(full, expert_samples, calibrate_for="task")  # the cached instructions
        agreement = {}
        for m in self.settings.candidates:
            model = methods.glider_model(self.load_base, folders, candidates=m)
            router.describe_experts(model, expert_samples, calibrate_for="task")
            row = f"{methods.GLIDER_AUTO.name} · M={m}"
            agreement[row] = {}

            def agree(task: str, info: RouteInfo, alpha: float) -> None:  # called within this iteration
                agreement[row][task] = self.selection_agreement(full, model, info, alpha, task, f"m{m}")

            self.score_auto_row(row, f"glider-m{m}", model, router, alphas, agree)
        return agreement

    def selection_agreement(self, full: Any, restricted: Any, info: RouteInfo, alpha: float, task: str,
                            key: str, examples: int = 10) -> float:
        """The share of (module, token) selections that `restricted` makes exactly as `full` (the same set of
        top-k experts), over the prompts of the task's first `examples` evaluation examples, routed with the
        same global scores and alpha. Cached like scores."""
        scores = info.scores
        pass_key = f"agreement-{key}@{scores_key(scores)}:alpha={alpha:g}"
        entry_key = f"{self.library_key}{pass_key}|{task}|{self.eval_keys[task]}"
        if entry_key not in self.store:
            equal = total = 0
            for example in self.splits[task].eval[:examples]:
                ids = torch.tensor([tokenize_options(example, self.tokenizer)[0]])
                traces = []
                for model in (full, restricted):
                    glider = model.base_model
                    with torch.no_grad(), glider.global_scores(scores, alpha=alpha), glider.routing_trace() as trace:
                        model(input_ids=ids)
                    traces.append(trace)
                for module in traces[0].modules:
                    chosen = [trace.selections[module][0].sort(dim=-1).values for trace in traces]  # (1, T, k)
                    equal += int((chosen[0] == chosen[1]).all(dim=-1).sum())
                    total += chosen[0].shape[1]
            self.store.put(entry_key, {"agreement": equal / total})
        return self.store[entry_key]["agreement"]


def scores_key(scores: torch.Tensor) -> str:
    """A short hash of a task's global scores (rounded to 1e-6): part of a GLIDER entry's key, so that a change of
    what routes the task (instructions, embedder, its handling of long texts, the experts' descriptions) scores it
    again rather than reusing an entry routed otherwise."""
    rounded = [round(value, 6) for value in scores.flatten().tolist()]
    return hashlib.sha256(json.dumps(rounded).encode()).hexdigest()[:8]


def routed_by(router: GlobalRouter, info: RouteInfo) -> str:
    """What routed a GLIDER entry: the writer's name and its global scores' `scores_key`."""
    return f"{router.writer.name}@{scores_key(info.scores)}"


def scoring_by_pass(seconds: dict[str, float]) -> dict[str, float]:
    """Scoring seconds summed per kind of pass (the entry key's method up to its first ':': base, expert, merge,
    arrow, phatgoose, glider, glider-m8, ...). Each scored entry counts once, however many rows share it."""
    by_pass: dict[str, float] = {}
    for key, value in seconds.items():
        kind = key.split("|")[0].split("/")[-1].split(":")[0]  # drop the library-only prefix "library-<hash>/"
        by_pass[kind] = by_pass.get(kind, 0.0) + value
    return by_pass


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    packages = ["torch", "transformers", "peft", "accelerate", "sentence-transformers", "peft-glider"]
    found = {name: metadata.version(name) for name in packages}
    return {"python": platform.python_version(), "cpus": str(os.cpu_count()), **found}


PARTS = {"held-in": "Held-in", "related": "Held-out, related", "unrelated": "Held-out, unrelated",
         "added": "Held-out, added (--held-out-dir)"}


def parts(results: dict) -> dict[str, list[str]]:
    """The evaluated tasks by part (`PARTS`, in that order; only parts with tasks): held-in, and held-out split by
    whether a held-in task of the same family exists. Results without a placement: held-in and held-out."""
    placement = results.get("placement")
    if placement is None:
        grouped = {"held-in": results["held_in"], "held-out": results["held_out"]}
    else:
        grouped = {part: [t for t in results["held_in"] + results["held_out"]
                          if t in placement and placement[t]["part"] == part] for part in PARTS}
    return {part: tasks for part, tasks in grouped.items() if tasks}


def part_average(results: dict, method: str, tasks: list[str]) -> Optional[float]:
    """A method's mean accuracy over `tasks` (those it was scored on), None if none."""
    values = [results["accuracy"][method][t] for t in tasks if t in results["accuracy"][method]]
    return statistics.mean(values) if values else None


def averages(results: dict, method: str) -> tuple[Optional[float], Optional[float]]:
    """(held-in average, held-out average) of a method, None where it has no task of that half."""
    return part_average(results, method, results["held_in"]), part_average(results, method, results["held_out"])
