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


def test_under_a_budget_only_the_candidates_rows_are_computed_and_none_are_kept(llama_experts, tmp_path, count_rows, monkeypatch):
    """Router rows for all E experts grow with the library, not the budget: under a resident-experts budget a call
    computes its candidates' rows only (once per module), and no layer keeps rows for every expert."""
    from conftest import make_expert

    experts = llama_experts + [make_expert(tiny_llama, tmp_path / f"more{i}", seed=400 + i) for i in range(4)]
    sizes = []
    original = routing.phatgoose_rows
    monkeypatch.setattr(routing, "phatgoose_rows", lambda gates: sizes.append(gates.shape[0]) or original(gates))
    config = dict(experts=experts, top_k=2, candidates=2, alpha=5.0)
    budgeted = get_peft_model(tiny_llama(), GliderConfig(**config, max_resident_experts=6))
    full = get_peft_model(tiny_llama(), GliderConfig(**config))
    gates = random_gates(full.base_model, seed=3)
    budgeted.base_model.set_gates(gates)
    full.base_model.set_gates(gates)
    scores = torch.randn(2, len(experts), generator=torch.Generator().manual_seed(1))
    sizes.clear()
    with torch.no_grad(), budgeted.base_model.global_scores(scores):
        tokens = generate(budgeted)
    modules = len(budgeted.base_model.glider_layers())
    assert sizes and max(sizes) <= 2 * 2 and len(sizes) <= modules  # (B x M) rows per module, once per call
    layers = budgeted.base_model.glider_layers().values()
    assert all(layer.installed_snapshot("default")._rows is None for layer in layers)
    with torch.no_grad(), full.base_model.global_scores(scores):
        assert torch.equal(tokens, generate(full))
