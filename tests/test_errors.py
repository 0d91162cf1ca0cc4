"""Bad input gets a clear error that names the culprit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import input_ids, make_expert, tiny_llama
from peft import IA3Config, get_peft_model

from peft_glider import GliderConfig


def test_empty_expert_list():
    with pytest.raises(ValueError, match="experts is empty"):
        GliderConfig(experts=[])


@pytest.mark.parametrize("top_k", [0, 3, -1, 1.5, True])
def test_top_k_out_of_range(top_k, llama_experts):
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, 2\\]"):
        GliderConfig(experts=llama_experts[:2], top_k=top_k)


def test_duplicate_expert_names(llama_experts):
    with pytest.raises(ValueError, match=r"Duplicate expert name\(s\) \['same'\]"):
        GliderConfig(experts=[{"source": llama_experts[0], "name": "same"}, {"source": llama_experts[1], "name": "same"}])


def test_unknown_entry_key_and_missing_source(llama_experts):
    with pytest.raises(ValueError, match=r"experts\[0\] has unknown key\(s\) \['branch'\]"):
        GliderConfig(experts=[{"source": llama_experts[0], "branch": "main"}])
    with pytest.raises(ValueError, match=r"experts\[1\] needs a non-empty 'source'"):
        GliderConfig(experts=[llama_experts[0], {"name": "x"}])
    with pytest.raises(TypeError, match=r"experts\[0\] must be"):
        GliderConfig(experts=[3])


def test_unknown_local_router(llama_experts):
    with pytest.raises(ValueError, match="local_router must be one of"):
        GliderConfig(experts=llama_experts, local_router="random")


def test_expert_shapes_that_do_not_fit_name_expert_and_module(tmp_path, llama_experts):
    from transformers import LlamaConfig, LlamaForCausalLM

    def wider_llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    wide = make_expert(wider_llama, tmp_path / "wide", seed=1, r=2)
    with pytest.raises(ValueError, match=r"Expert 'wide' does not fit module 'model.layers.0.self_attn.q_proj'"):
        get_peft_model(tiny_llama(), GliderConfig(experts=[llama_experts[0], wide]))


def test_expert_for_other_architecture_names_missing_module(t5_experts):
    with pytest.raises(ValueError, match=r"Expert 't5expert0' adapts module 'decoder.block.0.layer.0.SelfAttention.q'"):
        get_peft_model(tiny_llama(), GliderConfig(experts=[t5_experts[0]], top_k=1))


def test_non_lora_adapter_is_rejected(tmp_path, llama_experts):
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match=r"Expert 'ia3' is a PEFT adapter of type IA3; Glider routes among LoRA"):
        get_peft_model(tiny_llama(), GliderConfig(experts=[llama_experts[0], str(tmp_path / "ia3")]))


def test_a_config_that_does_not_match_its_checkpoint_is_refused(tmp_path, llama_experts):
    """A config claiming DoRA over plain LoRA weights (no magnitude vectors) would route as a plain LoRA."""
    folder = tmp_path / "dora"
    make_expert(tiny_llama, folder, seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Expert 'dora': its adapter_config.json says use_dora=True, but its weights "
                                         r"lack the DoRA magnitude vector"):
        get_peft_model(tiny_llama(), GliderConfig(experts=[str(folder)], top_k=1))


def test_missing_source_names_expert(tmp_path):
    with pytest.raises(OSError, match="Expert 'nowhere': 'someone/nowhere' is not in the local Hub cache and the Hub cannot be reached"):
        get_peft_model(tiny_llama(), GliderConfig(experts=["someone/nowhere"], top_k=1))


@pytest.mark.parametrize("name", ["0", "12", "a.b", "a/b"])
def test_bad_adapter_names(name, llama_experts):
    with pytest.raises(ValueError, match="Invalid Glider adapter name"):
        get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts), adapter_name=name)


def test_global_scores_of_wrong_shape_or_value(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    glider = model.base_model
    with pytest.raises(ValueError, match=r"shape \(batch, num_experts=4\), got \(2, 3\)"):
        with glider.global_scores(torch.zeros(2, 3)):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with glider.global_scores(torch.tensor([[0.0, float("nan"), 0.0, 0.0]])):
            pass
    with pytest.raises(ValueError, match="not a multiple"):
        with glider.global_scores(torch.zeros(2, 4)):
            model(input_ids=input_ids(batch=3))
    assert glider.routing_state().current_call() is None  # nothing left set after the error


def test_gates_of_wrong_shape_unknown_or_non_finite(llama_experts):
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts)).base_model
    module = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"gate of expert 'expert0' at 'model.layers.0.self_attn.q_proj' has shape \(5,\)"):
        glider.set_gates({"expert0": {module: torch.zeros(5)}})
    with pytest.raises(ValueError, match="is not finite"):
        glider.set_gates({"expert0": {module: torch.full((32,), float("inf"))}})
    with pytest.raises(KeyError, match="unknown expert 'nobody'"):
        glider.set_gates({"nobody": {module: torch.zeros(32)}})
    with pytest.raises(KeyError, match="no Glider layer at module 'model.layers.0.mlp.gate'"):
        glider.set_gates({"expert0": {"model.layers.0.mlp.gate": torch.zeros(32)}})
    with pytest.raises(ValueError, match="expert 'expert0' does not adapt module 'model.layers.0.self_attn.k_proj'"):
        glider.set_gates({"expert0": {"model.layers.0.self_attn.k_proj": torch.zeros(32)}})
    # a failing call changes nothing, even for the entries that were valid
    good = torch.ones(32)
    with pytest.raises(ValueError):
        glider.set_gates({"expert0": {module: good, "model.layers.1.self_attn.q_proj": torch.zeros(3)}})
    assert torch.equal(glider.get_gates()["expert0"][module], torch.zeros(32))


def test_instruction_embeddings_of_wrong_shape(llama_experts):
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts)).base_model
    with pytest.raises(ValueError, match=r"shape \(num_experts=4, dim\), got \(3, 8\)"):
        glider.set_instruction_embeddings(torch.zeros(3, 8))


def test_arrow_temperature_must_be_positive(llama_experts):
    with pytest.raises(ValueError, match="arrow_temperature must be a positive number"):
        GliderConfig(experts=llama_experts, local_router="arrow", arrow_temperature=0)
