"""Adding and removing experts on a built Glider model equals building from scratch."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import LLAMA_MODULES, input_ids, make_expert, random_gates, tiny_llama
from peft import get_peft_model

from peft_glider import GliderConfig, save_gates


def build(folders, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), GliderConfig(experts=folders, **kwargs))


def assert_same_model(a, b):
    state_a, state_b = a.base_model.state_dict(), b.base_model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], atol=0, rtol=0, msg=key)
    assert a.peft_config["default"].experts == b.peft_config["default"].experts
    assert a.peft_config["default"].target_modules == b.peft_config["default"].target_modules
    ids = input_ids()
    scores = torch.rand(2, len(a.base_model.expert_names))
    with torch.no_grad(), a.base_model.global_scores(scores), b.base_model.global_scores(scores):
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
def test_add_expert_equals_build_from_scratch(tmp_path, llama_experts, router):
    # the new expert adapts modules (gate_proj, up_proj) that no expert of the small library adapts
    new = make_expert(tiny_llama, tmp_path / "newcomer", seed=77, r=5, target_modules=["q_proj", "gate_proj", "up_proj"])
    save_gates({m: torch.randn(32) for m in [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")]}, new)
    small = build(llama_experts[:3], local_router=router)
    gates = random_gates(small.base_model, seed=3)
    if router == "phatgoose":
        small.base_model.set_gates(gates)
    embeddings = torch.randn(4, 5)
    small.base_model.set_instruction_embeddings(embeddings[:3])
    before = {k: v.clone() for k, v in small.base_model.state_dict().items()}
    assert small.base_model.add_expert(new, instruction_embedding=embeddings[3]) == "newcomer"

    full = build(llama_experts[:3] + [new], local_router=router)
    if router == "phatgoose":
        full.base_model.set_gates(gates)
    full.base_model.set_instruction_embeddings(embeddings)
    assert_same_model(small, full)
    assert "model.layers.0.mlp.gate_proj" in small.peft_config["default"].target_modules
    # the other experts' tensors are untouched
    after = small.base_model.state_dict()
    layer_key = "model.model.layers.0.self_attn.v_proj.glider_A.default"
    torch.testing.assert_close(after[layer_key], before[layer_key], atol=0, rtol=0)


def test_remove_expert_equals_build_from_scratch(llama_experts):
    library = build(llama_experts)
    gates = random_gates(library.base_model, seed=4)
    library.base_model.set_gates(gates)
    embeddings = torch.randn(4, 5)
    library.base_model.set_instruction_embeddings(embeddings)
    library.base_model.remove_expert("expert3")  # the only expert adapting gate_proj and up_proj
    library.base_model.remove_expert("expert1")

    rebuilt = build([llama_experts[0], llama_experts[2]])
    rebuilt.base_model.set_gates({name: gates[name] for name in ("expert0", "expert2")})
    rebuilt.base_model.set_instruction_embeddings(embeddings[[0, 2]])
    assert_same_model(library, rebuilt)
    assert not hasattr(library.base_model.model.model.layers[0].mlp.up_proj, "glider_gates")  # unwrapped


def test_add_and_remove_errors(tmp_path, llama_experts):
    library = build(llama_experts[:2], top_k=2)
    with pytest.raises(ValueError, match="an expert named 'expert0' exists already"):
        library.base_model.add_expert(llama_experts[0])
    with pytest.raises(ValueError, match="top_k=2 would exceed the 1 experts left"):
        library.base_model.remove_expert("expert0")
    with pytest.raises(KeyError, match="unknown expert 'nobody'"):
        library.base_model.remove_expert("nobody")
    library.base_model.set_instruction_embeddings(torch.randn(2, 3))
    with pytest.raises(ValueError, match="pass an instruction_embedding exactly when"):
        library.base_model.add_expert(llama_experts[2])
    assert library.base_model.expert_names == ["expert0", "expert1"]
