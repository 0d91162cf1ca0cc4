"""Router rows (the standardized gates) are computed once per module and library version, however the gates were
made: outside or inside `torch.inference_mode()`, set by `set_gates` or loaded from a checkpoint there; an edit
is still seen."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import input_ids, random_gates, tiny_llama
from peft import PeftModel, get_peft_model

from peft_glider import GliderConfig, routing


@pytest.fixture
def count_rows(monkeypatch):
    """How many times the Phatgoose rows were computed (one module's (E, in) standardized gates each)."""
    calls = [0]
    original = routing.phatgoose_rows

    def counting(gates):
        calls[0] += 1
        return original(gates)

    monkeypatch.setattr(routing, "phatgoose_rows", counting)
    return calls


def generate(model) -> torch.Tensor:
    return model.generate(input_ids=input_ids(), max_new_tokens=6, do_sample=False, min_new_tokens=6)


MODES = {"outside": contextlib.nullcontext, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("made_in", sorted(MODES))
@pytest.mark.parametrize("run_in", sorted(MODES))
def test_gates_set_in_either_mode_are_standardized_once_per_module_in_a_generate(llama_experts, count_rows, made_in, run_in):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    glider = model.base_model
    modules = len(glider.glider_layers())
    with MODES[made_in]():
        glider.set_gates(random_gates(glider, seed=1))
    count_rows[0] = 0
    with MODES[run_in](), torch.no_grad():
        first = generate(model)
        assert count_rows[0] == modules  # 7 forwards, each module's rows computed once
        generate(model)
        assert count_rows[0] == modules
        with MODES[made_in]():  # an edit in the same mode is seen: one more computation per module, new tokens
            glider.set_gates(random_gates(glider, seed=2, scale=3.0))
        edited = generate(model)
        assert count_rows[0] == 2 * modules
    reference = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    reference.base_model.set_gates(glider.get_gates())
    with torch.no_grad():
        assert torch.equal(edited, generate(reference))
        assert not torch.equal(first, edited)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_an_adapter_loaded_under_inference_mode_is_standardized_once_per_module(tmp_path, llama_experts, count_rows, low_cpu_mem_usage):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    model.base_model.set_gates(random_gates(model.base_model, seed=1))
    model.save_pretrained(tmp_path / "glider")
    with torch.inference_mode():
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider", low_cpu_mem_usage=low_cpu_mem_usage)
        modules = len(loaded.base_model.glider_layers())
        count_rows[0] = 0
        tokens = generate(loaded)
        generate(loaded)
    assert count_rows[0] == modules
    with torch.no_grad():
        assert torch.equal(tokens, generate(model))
