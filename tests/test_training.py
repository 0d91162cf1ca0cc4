"""The gradient contract: in train mode the gates learn through the routing weights; the experts stay frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import input_ids, random_gates, tiny_llama, tiny_t5
from peft import get_peft_model

from peft_glider import GliderConfig
from peft_glider import bank as bank_packing
from peft_glider import routing
from peft_glider.experts import LoraFactors


def snapshot(glider) -> tuple[dict, dict]:
    layers = glider.glider_layers()
    gates = {name: layer.glider_gates["default"].detach().clone() for name, layer in layers.items()}
    factors = {name: layer.glider_A["default"].clone() for name, layer in layers.items()}
    return gates, factors


def first_choices(model, ids) -> torch.Tensor:
    with torch.no_grad(), model.base_model.routing_trace() as trace:
        model(input_ids=ids)
    return torch.stack([trace.counts(module, first_choice_only=True) for module in trace.modules])


@pytest.mark.parametrize("local_router", ["phatgoose", "arrow"])
def test_a_plain_training_loop_trains_the_router(llama_experts, local_router):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2, local_router=local_router))
    glider = model.base_model
    if local_router == "phatgoose":
        glider.set_gates(random_gates(glider, seed=1))
    gates, factors = snapshot(glider)
    ids = input_ids(batch=4, length=9)
    routed_before = first_choices(model, ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == model.get_nb_trainable_parameters()[0]
    assert sum(p.numel() for p in trainable) == sum(g.numel() for g in gates.values())  # the gates, nothing else
    optimizer = torch.optim.AdamW(trainable, lr=0.5)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after, factors_after = snapshot(glider)
    assert any(not torch.equal(gates[m], after[m]) for m in gates)
    assert all(torch.equal(factors[m], factors_after[m]) for m in factors)  # experts frozen
    assert not torch.equal(first_choices(model, ids), routed_before)  # the routing itself changed


def test_t5_gates_receive_gradients(t5_experts):
    model = get_peft_model(tiny_t5(), GliderConfig(experts=t5_experts, top_k=2))
    model.base_model.set_gates(random_gates(model.base_model, seed=2))
    model.train()
    ids = input_ids(batch=2, length=6)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_trainer_steps_train_the_router(tmp_path, llama_experts):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=3))
    gates, _ = snapshot(glider)
    ids = input_ids(batch=8, length=8, seed=5)
    with torch.no_grad():  # base and experts are frozen: only the routing can change the outputs
        outputs_before = model(input_ids=ids).logits
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=0.5,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, remove_unused_columns=False, seed=0,
    )
    result = Trainer(model=model, args=args, train_dataset=dataset).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    model.eval()
    after, _ = snapshot(glider)
    assert any(not torch.equal(gates[m], after[m]) for m in gates)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - outputs_before).abs().max() > 1e-4


def test_routing_gradient_matches_finite_differences():
    """d(delta)/d(router rows) through the chosen experts' softmax weights, checked numerically (float64)."""
    generator = torch.Generator().manual_seed(0)
    experts = [LoraFactors(torch.randn(3, 6, generator=generator, dtype=torch.float64),
                           torch.randn(5, 3, generator=generator, dtype=torch.float64), 0.5) for _ in range(4)]
    bank = bank_packing.ExpertBank.from_factors(experts)  # packed as a Glider layer packs its experts
    u = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    gates = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, 4, generator=generator, dtype=torch.float64)

    def delta(gates: torch.Tensor) -> torch.Tensor:
        return routing.route(u, bank, routing.phatgoose_rows(gates), True, 2, bias)[1]

    assert torch.autograd.gradcheck(delta, (gates,), eps=1e-6, atol=1e-6)


def test_opting_in_trains_the_expert_factors_too_and_they_round_trip(tmp_path, llama_experts):
    from peft import PeftModel

    with pytest.raises(ValueError, match="train_expert_factors=True needs save_expert_weights=True"):
        GliderConfig(experts=llama_experts, train_expert_factors=True, save_expert_weights=False)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2, train_expert_factors=True))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("glider_A" in n for n in trainable) and any("glider_B" in n for n in trainable)
    assert any("glider_gates" in n for n in trainable)
    gates, factors = snapshot(glider)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = input_ids(batch=4, length=9)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    after, factors_after = snapshot(glider)
    assert any(not torch.equal(factors[m], factors_after[m]) for m in factors)
    expected = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path / "glider")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)  # other kernels
