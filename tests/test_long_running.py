"""What a service running for weeks meets: a corrupted expert is refused at load, and the query cache stays bounded.

- A NaN or an inf in any factor of an expert (a folder with safetensors or a pickle checkpoint, or a Hub id) is
  refused with an error naming the expert, the tensor and its file, before any layer holds it.
- Thousands of distinct queries leave at most the cap of query entries in memory and on disk; with the samples
  writer (no LLM) nothing of a query is written to disk at all; expert descriptions are cached as before; several
  processes sharing one cache folder keep it consistent while they evict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import LetterEmbedder, make_expert, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from peft_glider import GliderConfig, GlobalRouter, SamplesWriter
from peft_glider.global_router import InstructionWriter

LORA_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def corrupt(folder: Path, key: str, value: float, pickle: bool = False) -> Path:
    """Write one non-finite value into tensor `key` of the expert in `folder` (as safetensors or a pickle)."""
    weights = load_file(folder / "adapter_model.safetensors")
    weights[key][0, 1] = value
    if pickle:
        (folder / "adapter_model.safetensors").unlink()
        torch.save(weights, folder / "adapter_model.bin")
        return folder / "adapter_model.bin"
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "key, value, pickle",
    [(LORA_B, float("nan"), False), (LORA_A, float("inf"), False), (LORA_B, float("-inf"), True)],
    ids=["nan-in-B", "inf-in-A", "pickle-checkpoint"],
)
def test_a_folder_expert_with_non_finite_weights_is_refused_by_name(tmp_path, llama_experts, key, value, pickle):
    bad = Path(make_expert(tiny_llama, tmp_path / "broken", seed=7))
    path = corrupt(bad, key, value, pickle)
    with pytest.raises(ValueError) as error:
        get_peft_model(tiny_llama(), GliderConfig(experts=[llama_experts[0], str(bad)], top_k=1))
    message = str(error.value)
    assert "Expert 'broken'" in message and key in message and str(path) in message and "non-finite" in message

    healthy = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts[:2], top_k=1))
    with pytest.raises(ValueError, match=r"Expert 'broken'.*non-finite"):  # and by add_expert, nothing changed
        healthy.base_model.add_expert(str(bad))
    assert healthy.base_model.expert_names == ["expert0", "expert1"]


def test_a_hub_expert_with_non_finite_weights_is_refused_by_name(tmp_path, hub):
    bad = Path(make_expert(tiny_llama, tmp_path / "broken", seed=7))
    corrupt(bad, LORA_B, float("nan"))
    hub.commit_folder("team/broken-lora", bad)
    with pytest.raises(ValueError) as error:
        get_peft_model(tiny_llama(), GliderConfig(experts=["team/broken-lora"], top_k=1))
    message = str(error.value)
    assert "Expert 'broken-lora'" in message and LORA_B in message and "adapter_model.safetensors" in message


class CountingWriter(InstructionWriter):
    """A stand-in for an LLM writer (instructions worth keeping): deterministic, counts its calls."""

    name = "counting-llm"

    def __init__(self) -> None:
        self.calls = 0

    def write(self, samples) -> str:
        self.calls += 1
        return "Task: " + " ".join(str(s if isinstance(s, str) else s[0]) for s in samples)


EXPERT_TASKS = {"expert0": ["add one and two", "sum four"], "expert1": ["translate merci", "translate chat"]}


def files_under(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.json"))


def build_routed(tmp_path, llama_experts, router):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts[:2], top_k=1, alpha=1.0))
    router.describe_experts(model, EXPERT_TASKS, calibrate=False)
    return model.base_model


def test_thousands_of_distinct_queries_with_the_samples_writer_write_nothing_and_stay_bounded(tmp_path, llama_experts):
    cache = tmp_path / "cache"
    router = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=cache, query_cache_size=64)
    glider = build_routed(tmp_path, llama_experts, router)
    experts_only = files_under(cache)
    assert experts_only == 4  # two expert instructions, two embeddings: kept for ever, as before
    first = None
    for n in range(3000):
        with glider.route(f"query number {n} about {'add' if n % 2 else 'translate'} things") as info:
            first = info.scores.clone() if n == 0 else first
    assert files_under(cache) == experts_only  # nothing of a query was written
    assert len(router.query_cache) <= 64
    with glider.route("query number 0 about translate things") as info:  # evicted long ago: recomputed, the same
        torch.testing.assert_close(info.scores, first, atol=0, rtol=0)


def test_an_llm_writers_query_instructions_are_cached_on_disk_up_to_the_cap(tmp_path, llama_experts):
    cache = tmp_path / "cache"
    writer = CountingWriter()
    router = GlobalRouter(writer, LetterEmbedder(), cache_dir=cache, query_cache_size=50)
    glider = build_routed(tmp_path, llama_experts, router)
    expert_files = files_under(cache)
    for n in range(400):
        with glider.route(f"distinct query {n}"):
            pass
    assert writer.calls == 2 + 400
    query_files = files_under(cache / "queries")
    assert 0 < query_files <= 50 and files_under(cache) - query_files == expert_files
    assert len(router.query_cache) <= 50
    # the most recent queries are served from memory, then (after a restart) from disk: no LLM call
    with glider.route("distinct query 399"):
        pass
    fresh = GlobalRouter(writer, LetterEmbedder(), cache_dir=cache, query_cache_size=50)
    with glider.route("distinct query 398", router=fresh):
        pass
    assert writer.calls == 2 + 400
    # an old one was evicted from both: written again
    with glider.route("distinct query 0", router=fresh):
        pass
    assert writer.calls == 2 + 401


SHARED_CACHE_WRITER = r"""
import json, sys
from peft_glider.global_router.cache import BoundedJsonCache
cache = BoundedJsonCache(sys.argv[1], max_entries=40)
for n in range(600):
    key = f"{sys.argv[2]}-{n:04d}"
    cache.put("queries", key, {"text": key})
    back = cache.get("queries", f"{sys.argv[2]}-{max(0, n - 3):04d}")  # recent entries of its own are readable
    assert back is None or back == {"text": f"{sys.argv[2]}-{max(0, n - 3):04d}"}, back
print("ok")
"""


def test_processes_sharing_a_bounded_cache_folder_keep_it_consistent(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}  # a warning (e.g. a corrupt file) fails a writer
    writers = [
        subprocess.Popen([sys.executable, "-c", SHARED_CACHE_WRITER, str(tmp_path), name], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("first", "second", "third")
    ]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0 and out.strip() == "ok", err[-2000:]
    files = list((tmp_path / "queries").glob("*"))
    assert 0 < len(files) <= 40
    assert all(json.loads(f.read_text())["value"]["text"] for f in files)  # whole entries only, no partial file
