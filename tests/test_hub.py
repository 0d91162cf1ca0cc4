"""Hub ids resolve through a hand-laid local Hub cache (HF_HUB_OFFLINE=1): the same path as a real download."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import input_ids, make_expert, random_gates, tiny_llama
from peft import PeftModel, get_peft_model

from peft_glider import GliderConfig

COMMIT_MAIN = "a" * 40
COMMIT_OLD = "b" * 40


def lay_hub_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    for ref, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    return cache


def test_hub_ids_revisions_and_subfolders(tmp_path, hub_cache):
    new = Path(make_expert(tiny_llama, tmp_path / "new", seed=1, r=4))
    old = Path(make_expert(tiny_llama, tmp_path / "old", seed=2, r=2))
    lay_hub_repo(hub_cache, "team/math-lora", {COMMIT_MAIN: new, COMMIT_OLD: old}, {"main": COMMIT_MAIN})
    nested = tmp_path / "nested"
    make_expert(tiny_llama, nested / "adapters" / "code", seed=3, r=3)
    lay_hub_repo(hub_cache, "team/library", {COMMIT_MAIN: nested}, {"main": COMMIT_MAIN})

    config = GliderConfig(
        experts=[
            "team/math-lora",
            {"source": "team/math-lora", "revision": COMMIT_OLD, "name": "math-old"},
            {"source": "team/library", "subfolder": "adapters/code"},
        ],
        top_k=2,
    )
    model = get_peft_model(tiny_llama(), config)
    glider = model.base_model
    assert glider.expert_names == ["math-lora", "math-old", "code"]
    entries = model.peft_config["default"].experts
    assert [e["commit"] for e in entries] == [COMMIT_MAIN, COMMIT_OLD, COMMIT_MAIN]
    ranks = [e["layout"]["model.layers.0.self_attn.q_proj"][0] for e in entries]
    assert ranks == [4, 2, 3]

    # the Hub expert alone equals plain PEFT loading of the same local files
    single = get_peft_model(tiny_llama(), GliderConfig(experts=["team/math-lora"], top_k=1))
    expected = PeftModel.from_pretrained(tiny_llama(), str(new))
    with torch.no_grad():
        torch.testing.assert_close(single(input_ids()).logits, expected(input_ids()).logits, atol=1e-5, rtol=0)


def test_router_only_adapter_refetches_pinned_hub_experts(tmp_path, hub_cache):
    lay_hub_repo(hub_cache, "team/a", {COMMIT_MAIN: Path(make_expert(tiny_llama, tmp_path / "a", seed=1))}, {"main": COMMIT_MAIN})
    lay_hub_repo(hub_cache, "team/b", {COMMIT_MAIN: Path(make_expert(tiny_llama, tmp_path / "b", seed=2))}, {"main": COMMIT_MAIN})
    model = get_peft_model(tiny_llama(), GliderConfig(experts=["team/a", "team/b"], save_expert_weights=False))
    model.base_model.set_gates(random_gates(model.base_model))
    with torch.no_grad():
        expected = model(input_ids()).logits
    model.save_pretrained(tmp_path / "glider")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, expected, atol=0, rtol=0)


def test_gates_shipped_in_a_hub_repo_are_picked_up(tmp_path, hub_cache):
    from peft_glider import save_gates

    folder = Path(make_expert(tiny_llama, tmp_path / "gated", seed=5))
    gates = {f"model.layers.{i}.self_attn.{m}": torch.randn(32) for i in range(2) for m in ("q_proj", "v_proj")}
    save_gates(gates, folder)
    lay_hub_repo(hub_cache, "team/gated", {COMMIT_MAIN: folder}, {"main": COMMIT_MAIN})
    model = get_peft_model(tiny_llama(), GliderConfig(experts=["team/gated"], top_k=1))
    for module, gate in gates.items():
        torch.testing.assert_close(model.base_model.get_gates()["gated"][module], gate, atol=0, rtol=0)
