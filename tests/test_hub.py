"""Hub sharing end to end, through the real `huggingface_hub` client and a loopback server speaking the Hub's API.

Experts by Hub id (latest, pinned after `main` moved, subfolders, repositories with unrelated files), pushing a
Glider adapter with its card, loading it back (PeftModel, AutoPeftModel, router-only re-fetch), portable
router-only adapters, and the errors for bad repositories, revisions and files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LetterEmbedder, input_ids, make_expert, random_gates, tiny_llama
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_glider import GliderConfig, GlobalRouter, SamplesWriter, save_gates

ADAPTER_ONLY = {"adapter_config.json", "adapter_model.safetensors"}


def upload_expert(hub, tmp_path: Path, repo_id: str, seed: int, prefix: str = "", gates: bool = False, **kwargs) -> str:
    """Make a tiny Llama LoRA expert and commit it to `repo_id` (under `prefix`); return the commit."""
    folder = Path(make_expert(tiny_llama, tmp_path / f"{repo_id.replace('/', '_')}-{seed}", seed=seed, **kwargs))
    if gates:
        generator = torch.Generator().manual_seed(seed)
        modules = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
        save_gates({m: torch.randn(32, generator=generator) for m in modules}, folder)
    return hub.commit_folder(repo_id, folder, prefix=prefix)


def upload_base(hub, tmp_path: Path, repo_id: str = "team/tiny-llama") -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    hub.commit_folder(repo_id, tmp_path / "base")


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids if ids is not None else input_ids()).logits


def incomplete_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".incomplete") or p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------------------- experts


def test_experts_by_hub_id_latest_pinned_subfolder_and_adapter_files_only(tmp_path, hub):
    old = upload_expert(hub, tmp_path, "team/math-lora", seed=2, r=2)
    new = upload_expert(hub, tmp_path, "team/math-lora", seed=1, r=4, gates=True)  # main moves on
    hub.commit("team/math-lora", {"checkpoint-500/optimizer.pt": b"x" * 200_000, "merged/model.safetensors": b"y" * 100})
    upload_expert(hub, tmp_path, "team/library", seed=3, r=3, prefix="adapters/code/")
    upload_expert(hub, tmp_path, "team/library", seed=4, r=5, prefix="adapters/chat/")
    hub.commit("team/library", {"adapters/code/training_args.bin": b"z" * 50_000, "README.md": b"# lib"})

    config = GliderConfig(
        experts=[
            "team/math-lora",
            {"source": "team/math-lora", "revision": old, "name": "math-old"},
            {"source": "team/library", "subfolder": "adapters/code"},
        ],
        top_k=2,
    )
    model = get_peft_model(tiny_llama(), config)
    entries = model.peft_config["default"].experts
    assert model.base_model.expert_names == ["math-lora", "math-old", "code"]
    assert [e["commit"] for e in entries] == [hub.repos["team/math-lora"].refs["main"], old,
                                             hub.repos["team/library"].refs["main"]]
    assert new != hub.repos["team/math-lora"].refs["main"]  # the unrelated commit moved main past the adapter
    assert [e["layout"]["model.layers.0.self_attn.q_proj"][0] for e in entries] == [4, 2, 3]
    assert entries[0]["gates"] == "shipped with the expert" and "gates" not in entries[1]  # the old commit ships no gates

    # only what a LoRA expert needs was transferred: no checkpoint, merged weights, README or other adapter
    assert hub.downloaded("team/math-lora") == sorted(ADAPTER_ONLY | {"glider_gates.safetensors"})
    assert hub.downloaded("team/library") == ["adapters/code/adapter_config.json", "adapters/code/adapter_model.safetensors"]

    # the Hub expert alone equals plain PEFT loading of the same files
    single = get_peft_model(tiny_llama(), GliderConfig(experts=["team/math-lora"], top_k=1))
    expected = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "team_math-lora-1"))
    torch.testing.assert_close(logits(single), logits(expected), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------- push / load


def described_glider(hub, tmp_path, save_expert_weights: bool = True):
    """A Glider model on the Hub base `team/tiny-llama` from two Hub experts, with gates and instructions."""
    upload_base(hub, tmp_path)
    upload_expert(hub, tmp_path, "team/a", seed=1, gates=True)
    upload_expert(hub, tmp_path, "team/b", seed=2, r=2)
    base = AutoModelForCausalLM.from_pretrained("team/tiny-llama")
    config = GliderConfig(experts=["team/a", "team/b"], top_k=1, save_expert_weights=save_expert_weights)
    model = get_peft_model(base, config)
    glider = model.base_model
    glider.set_gates({"b": random_gates(glider, seed=5)["b"]}, how="trained by hand")
    router = GlobalRouter(writer=SamplesWriter(), embedder=LetterEmbedder(), cache_dir=None)
    router.describe_experts(model, {"a": ["add two numbers", "sum 3 and 4"], "b": ["translate to French", "bonjour"]})
    return model


def test_push_uploads_config_weights_and_glider_card_then_loads_identically(tmp_path, hub):
    model = described_glider(hub, tmp_path)
    expected = logits(model)
    model.push_to_hub("owner/my-glider")

    received = hub.files("owner/my-glider")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(received)
    card = ModelCard(received["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == "team/tiny-llama"
    assert {"peft", "glider", "lora", "base_model:adapter:team/tiny-llama"} <= set(card.data.tags)
    rows = [line for line in card.text.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    commit_a = hub.repos["team/a"].refs["main"][:12]
    assert rows[0].split(" | ")[1:7] == ["a", "team/a", f"`{commit_a}`", "4", "q_proj, v_proj (4 modules)", "shipped with the expert"]
    assert rows[1].split(" | ")[1:7][:2] == ["b", "team/b"] and "trained by hand" in rows[1]
    assert "add two numbers" in rows[0] and "translate to French" in rows[1]  # the instructions (samples writer)
    assert "**Top-k**: 1" in card.text and "test/letters" in card.text
    assert 'PeftModel.from_pretrained(base, "owner/my-glider")' in card.text
    snippet = card.text.split("```python")[1].split("```")[0]
    assert snippet.lstrip().startswith("import peft_glider") and 'SentenceTransformerEmbedder("test/letters")' in snippet

    hub.log.clear()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("team/tiny-llama"), "owner/my-glider")
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)
    assert set(hub.downloaded("owner/my-glider")) <= ADAPTER_ONLY  # the card is not needed to load
    auto = AutoPeftModelForCausalLM.from_pretrained("owner/my-glider")
    torch.testing.assert_close(logits(auto), expected, atol=0, rtol=0)
    assert auto.base_model.get_instruction_embeddings() is not None


def test_router_only_adapter_refetches_experts_at_pinned_commits(tmp_path, hub, monkeypatch):
    model = described_glider(hub, tmp_path, save_expert_weights=False)
    expected = logits(model)
    model.push_to_hub("owner/router-only")
    received = hub.files("owner/router-only")
    assert "factors" not in str(sorted(received))
    upload_expert(hub, tmp_path, "team/a", seed=9)  # main moves: the adapter must still get the pinned expert
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "another-machine"))
    hub.log.clear()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("team/tiny-llama"), "owner/router-only")
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)
    assert hub.downloaded("team/a") == sorted(ADAPTER_ONLY | {"glider_gates.safetensors"})
    assert "not saved: fetched from their sources" in ModelCard(received["README.md"].decode()).text


def test_push_keeps_a_card_the_user_wrote(tmp_path, hub):
    model = described_glider(hub, tmp_path)
    user_card = "---\nlicense: apache-2.0\ntags:\n- my-tag\n---\n\n# My router\n\nHand-written notes.\n"
    hub.commit("owner/my-glider", {"README.md": user_card.encode()})
    model.push_to_hub("owner/my-glider", tags=["extra"])
    model.push_to_hub("owner/my-glider")  # twice: the Glider section is replaced, not repeated
    card = ModelCard(hub.files("owner/my-glider")["README.md"].decode())
    assert card.data.license == "apache-2.0"
    assert {"my-tag", "extra", "glider", "peft"} <= set(card.data.tags)
    assert "Hand-written notes." in card.text and "# My router" in card.text
    assert card.text.count("<!-- peft-glider:start") == 1 and "## Experts" in card.text


def test_save_pretrained_writes_the_glider_card_and_updates_an_existing_one(tmp_path, hub):
    model = described_glider(hub, tmp_path)
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "peft" and "glider" in card.data.tags
    assert card.data.base_model == "team/tiny-llama"
    assert "## Experts" in card.text and "| 1 | b | team/b |" in card.text
    (tmp_path / "out" / "README.md").write_text(card.content.replace("## Experts", "## Experts") + "\nMy notes.\n")
    model.save_pretrained(tmp_path / "out")
    again = (tmp_path / "out" / "README.md").read_text()
    assert "My notes." in again and again.count("## Experts") == 1
    assert not incomplete_files(tmp_path / "out")


def test_glider_adapter_by_hub_id_downloads_adapter_files_only(tmp_path, hub):
    model = described_glider(hub, tmp_path)
    model.push_to_hub("owner/my-glider")
    hub.commit("owner/my-glider", {"checkpoint-100/optimizer.pt": b"o" * 300_000, "tokenizer.json": b"{}"})
    hub.log.clear()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("team/tiny-llama"), "owner/my-glider")
    assert set(hub.downloaded("owner/my-glider")) <= ADAPTER_ONLY


# ---------------------------------------------------------------------------------------------------------- portability


def test_router_only_with_local_experts_warns_on_save_and_refuses_to_push(tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_expert(tiny_llama, tmp_path / "experts" / "math", seed=1)
    upload_expert(hub, tmp_path, "team/b", seed=2)
    config = GliderConfig(experts=["experts/math", "team/b"], save_expert_weights=False)
    model = get_peft_model(tiny_llama(), config)
    assert model.peft_config["default"].experts[0]["source"] == "experts/math"  # kept relative, as given
    with pytest.warns(UserWarning, match=r"router-only.*\['math'\].*save_expert_weights=True") as caught:
        model.save_pretrained("saved")
    assert caught[0].filename == __file__  # points at the user's line
    saved = GliderConfig.from_pretrained("saved")
    assert saved.experts[0]["source"] == "experts/math"
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), "saved")), logits(model), atol=0, rtol=0)

    hub.log.clear()
    with pytest.raises(ValueError, match=r"router-only.*\['math'\].*save_expert_weights=True"):
        model.push_to_hub("owner/not-portable")
    assert not [entry for entry in hub.log if entry[0] == "POST"]  # refused before anything reached the Hub

    self_contained = get_peft_model(tiny_llama(), GliderConfig(experts=["experts/math", "team/b"]))
    self_contained.push_to_hub("owner/portable")  # a self-contained adapter of local experts is fine to share
    assert "adapter_model.safetensors" in hub.files("owner/portable")


# ---------------------------------------------------------------------------------------------------------- bad input


def _ia3_adapter(path: Path) -> Path:
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    model.save_pretrained(path)
    return path


BAD_SOURCES = {
    "missing": ({"source": "team/nope"}, r"Expert 'nope': no repository 'team/nope' on the Hub \(404\)"),
    "private": ({"source": "team/private"}, r"Expert 'private': 'team/private' is private or does not exist \(401"),
    "gated": ({"source": "team/gated"}, r"Expert 'gated': 'team/gated' is a gated repository"),
    "revision": ({"source": "team/ok", "revision": "v9", "name": "ok-v9"}, r"Expert 'ok-v9': revision 'v9' does not exist in 'team/ok'"),
    "no-config": ({"source": "team/weights-only"}, r"Expert 'weights-only': 'team/weights-only' .* has no adapter_config.json"),
    "ia3": ({"source": "team/ia3"}, r"Expert 'ia3' is a PEFT adapter of type IA3; Glider routes among LoRA adapters only"),
    "truncated": ({"source": "team/cut"}, r"Expert 'cut': .*adapter_model.safetensors is truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_hub_experts_name_the_expert_and_the_cause(case, tmp_path, hub, monkeypatch):
    upload_expert(hub, tmp_path, "team/ok", seed=1)
    folder = Path(make_expert(tiny_llama, tmp_path / "lora", seed=1))
    hub.commit_folder("team/private", folder, private=True)
    hub.commit_folder("team/gated", folder, gated=True)
    hub.commit("team/weights-only", {"adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()})
    hub.commit_folder("team/ia3", _ia3_adapter(tmp_path / "ia3"))
    weights = (folder / "adapter_model.safetensors").read_bytes()
    hub.commit("team/cut", {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
                            "adapter_model.safetensors": weights[: len(weights) - 100]})
    if case == "private":
        monkeypatch.delenv("HF_TOKEN")
    entry, message = BAD_SOURCES[case]
    with pytest.raises((OSError, ValueError), match=message):
        get_peft_model(tiny_llama(), GliderConfig(experts=[entry, "team/ok"], top_k=1))
    cache = tmp_path / "hub-cache"
    assert not incomplete_files(cache)
    if case in ("missing", "private", "gated"):
        assert not list(cache.glob(f"models--team--{entry['source'].split('/')[1]}/snapshots/*/*"))
    if case == "revision":  # the other expert, team/ok at main, may be downloaded meanwhile (experts open concurrently)
        assert not (cache / "models--team--ok" / "refs" / "v9").exists()


def test_a_local_base_model_is_named_in_the_card_text_not_in_its_metadata(tmp_path):
    from peft_glider.card import glider_card

    tiny_llama().save_pretrained(tmp_path / "base")
    expert = make_expert(tiny_llama, tmp_path / "e", seed=1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), GliderConfig(experts=[expert], top_k=1))
    card = glider_card(model, repo_id="me/glider")  # for the Hub: model ids only
    assert card.data.base_model is None and not [t for t in card.data.tags if t.startswith("base_model:")]
    assert str(tmp_path / "base") in card.text
    assert glider_card(model).data.base_model == str(tmp_path / "base")  # saved locally: as PEFT's own cards
