"""Glider on models dispatched by accelerate, with layers offloaded to disk."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_MODULES, input_ids, make_expert, random_gates, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_glider import GliderConfig, load_glider

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def plain_reference(base, experts: list[str]) -> tuple:
    """The undispatched Glider model over `experts` with random gates: (model, gates, its logits on input_ids())."""
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(base), GliderConfig(experts=experts))
    gates = random_gates(reference.base_model)
    reference.base_model.set_gates(gates)
    with torch.no_grad():
        return reference, gates, reference(input_ids()).logits


def test_disk_offloaded_model_matches_plain_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i, r=2 + i, target_modules=LLAMA_MODULES) for i in range(3)]
    reference, gates, expected = plain_reference(tmp_path / "base", experts)
    ids = input_ids()

    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    model = get_peft_model(offloaded, GliderConfig(experts=experts))
    model.base_model.set_gates(gates)
    layer = model.base_model.glider_layers()["model.layers.1.self_attn.q_proj"]
    assert layer.glider_A["default"].device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)

    # a saved adapter loads onto another offloaded model and gives the same logits
    reference.save_pretrained(tmp_path / "glider")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "o2"))
    loaded = load_glider(again, tmp_path / "glider")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)


def test_load_glider_rejects_other_adapters(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a Glider adapter"):
        load_glider(tiny_llama(), tmp_path / "lora")


def test_a_resident_budget_holds_on_a_disk_offloaded_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i, target_modules=LLAMA_MODULES) for i in range(4)]
    knobs = dict(experts=experts, candidates=2, save_expert_weights=False)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), GliderConfig(**knobs))
    gates = random_gates(reference.base_model)
    reference.base_model.set_gates(gates)
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    )
    model = get_peft_model(offloaded, GliderConfig(max_resident_experts=2, **knobs))
    model.base_model.set_gates(gates)
    library = model.base_model._libraries["default"]
    ids = input_ids(batch=1)
    for best in ([0, 1], [2, 3], [1, 3]):
        scores = torch.zeros(1, 4)
        scores[0, best] = 5.0
        with torch.no_grad(), reference.base_model.global_scores(scores):
            expected = reference(ids).logits
        with torch.no_grad(), model.base_model.global_scores(scores):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)
        assert sorted(library.residency.hot) == [f"e{i}" for i in best]
        layer = model.base_model.glider_layers()["model.layers.1.self_attn.q_proj"]  # an offloaded layer
        assert layer.glider_A["default"].device.type == "cpu" and layer.glider_A["default"].shape[0] == 2 * 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_and_biased_experts_on_a_disk_offloaded_model(tmp_path, arch):
    """A DoRA expert's norms read the base weight from accelerate's offload; its shift multiplies the base output
    without the (offloaded) base bias."""
    from test_lora_variants import FACTORIES, peft_expert

    modules = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}[arch]
    fan = {"fan_in_fan_out": arch == "gpt2"}
    FACTORIES[arch]().save_pretrained(tmp_path / "base")
    experts = [peft_expert(tmp_path / "dora", arch, seed=1, target_modules=modules, use_dora=True, **fan),
               peft_expert(tmp_path / "bias", arch, seed=2, target_modules=modules, lora_bias=True, **fan)]
    _, gates, expected = plain_reference(tmp_path / "base", experts)
    device_map = DEVICE_MAP if arch == "llama" else {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
        "transformer.ln_f": "cpu", "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    model = get_peft_model(offloaded, GliderConfig(experts=experts))
    model.base_model.set_gates(gates)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, expected, atol=1e-5, rtol=0)
