"""Candidates (`GliderConfig(candidates=M)`): each row's local routing runs over its M experts of best global score."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_glider import GliderConfig, routing
from peft_glider.bank import ExpertBank
from peft_glider.experts import LoraFactors

from conftest import LLAMA_MODULES, input_ids, make_expert, random_gates, tiny_llama

NUM_EXPERTS = 6


@pytest.fixture
def uniform_experts(tmp_path) -> list[str]:
    """Six experts on the same modules: a row's candidates are then the same at every module."""
    return [make_expert(tiny_llama, tmp_path / f"e{i}", seed=300 + i, target_modules=["q_proj", "v_proj", "up_proj"])
            for i in range(NUM_EXPERTS)]


def glider_model(experts: list[str], alpha: float = 5.0, **config):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=2, alpha=alpha, **config))
    model.base_model.set_gates(random_gates(model.base_model, seed=1))
    return model


def scores(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))


def run(model, ids, row_scores):
    glider = model.base_model
    with torch.no_grad(), glider.global_scores(row_scores), glider.routing_trace() as trace:
        logits = model(input_ids=ids).logits
    return logits, trace


def test_candidates_covering_every_expert_route_exactly_as_full_routing(uniform_experts):
    full = glider_model(uniform_experts)
    covered = glider_model(uniform_experts, candidates=NUM_EXPERTS)
    ids, row_scores = input_ids(batch=3), scores(3)
    (logits, trace), (same, same_trace) = run(full, ids, row_scores), run(covered, ids, row_scores)
    assert torch.equal(logits, same)
    assert trace.as_dict() == same_trace.as_dict()


def test_candidates_route_as_full_routing_restricted_to_each_rows_best_global_scores(uniform_experts):
    m = 3
    # a weak global bias, so that the local router alone would often pick experts outside the candidates
    restricted = glider_model(uniform_experts, alpha=0.1, candidates=m)
    full = glider_model(uniform_experts, alpha=0.1)
    ids, row_scores = input_ids(batch=3, length=9), scores(3, seed=4)
    logits, trace = run(restricted, ids, row_scores)
    # The reference: full routing in which every non-candidate expert is pushed out of reach by its global bias.
    best = row_scores.topk(m, dim=-1).indices
    out_of_reach = torch.full_like(row_scores, -1e4).scatter(1, best, 0.0)
    alpha = restricted.peft_config["default"].alpha
    with torch.no_grad(), full.base_model.global_scores(row_scores + out_of_reach / alpha), \
            full.base_model.routing_trace() as reference_trace:
        reference = full(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert trace.as_dict() == reference_trace.as_dict()
    for module in trace.modules:  # every selected expert is one of its row's candidates
        chosen = torch.cat(trace.selections[module], dim=1)  # (B, T, k)
        assert all(set(chosen[b].unique().tolist()) <= set(best[b].tolist()) for b in range(3))
    # and the restriction is real: full routing picks experts outside the candidates for these tokens
    with torch.no_grad(), full.base_model.global_scores(row_scores), full.base_model.routing_trace() as free:
        full(input_ids=ids)
    assert free.as_dict() != trace.as_dict()


def test_generate_with_beams_keeps_each_querys_candidates(uniform_experts):
    restricted = glider_model(uniform_experts, candidates=2)
    ids, row_scores = input_ids(batch=2, length=5), scores(2, seed=7)
    glider = restricted.base_model
    with torch.no_grad(), glider.global_scores(row_scores), glider.routing_trace() as trace:
        restricted.generate(input_ids=ids, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    best = row_scores.topk(2, dim=-1).indices
    for module in trace.modules:
        for step in trace.selections[module]:  # (B * beams, T, k): rows in consecutive groups of 3 beams
            for row, chosen in enumerate(step):
                assert set(chosen.unique().tolist()) <= set(best[row // (step.shape[0] // 2)].tolist())


def test_candidates_follow_the_experts_present_at_each_module(tmp_path):
    """Experts on different modules: at each module a row's candidates are its best among those present there."""
    experts = [make_expert(tiny_llama, tmp_path / f"m{i}", seed=400 + i, target_modules=modules)
               for i, modules in enumerate([["q_proj"], ["q_proj", "v_proj"], LLAMA_MODULES, ["v_proj"], ["q_proj"],
                                            LLAMA_MODULES])]
    model = glider_model(experts, candidates=2)
    row_scores = torch.tensor([[9.0, 8.0, 1.0, 0.0, 0.5, 0.2]])  # experts 0 and 1 best, but 0 is absent at v_proj
    _, trace = run(model, input_ids(batch=1), row_scores)
    for module in trace.modules:
        chosen = set(torch.cat(trace.selections[module], dim=1).unique().tolist())
        layer = model.base_model.glider_layers()[module]
        present = [e for e in range(NUM_EXPERTS) if layer.adapts("default", e)]
        expected = set(sorted(present, key=lambda e: -row_scores[0, e])[:2])
        assert chosen <= expected and chosen, (module, chosen, expected)


def test_without_global_scores_every_expert_is_scored(uniform_experts):
    restricted, full = glider_model(uniform_experts, candidates=2), glider_model(uniform_experts)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(restricted(input_ids=ids).logits, full(input_ids=ids).logits)


@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
def test_selection_among_candidates_equals_top_k_with_the_others_masked(router):
    generator = torch.Generator().manual_seed(3)
    e, d, groups, tokens, m, k = 7, 8, 3, 4, 4, 2
    gates = torch.randn(e, d, generator=generator, dtype=torch.float64)
    rows = routing.phatgoose_rows(gates) if router == "phatgoose" else routing.arrow_rows(gates, 1.0)
    u = torch.randn(groups * tokens, d, generator=generator, dtype=torch.float64)
    bias = torch.randn(groups, e, generator=generator, dtype=torch.float64)
    present = torch.tensor([True, False, True, True, True, False, True])
    candidates = routing.gather_candidates(bias, bias, rows, present, m)
    assert all(present[c].sum() == m for c in candidates.indices)
    selection = routing.select_among_candidates(u, candidates, router == "phatgoose", k)
    local = routing.standardized_dots(u, rows) if router == "phatgoose" else routing.arrow_dots(u, rows)
    outside = torch.ones(groups, e, dtype=torch.bool).scatter(1, candidates.indices, False)
    logits = routing.combine_logits(local, bias.masked_fill(outside, float("-inf")))
    reference = routing.select_top_k(logits, present, k)
    assert torch.equal(selection.indices, reference.indices)
    torch.testing.assert_close(selection.weights, reference.weights)


def test_route_with_candidates_adds_the_selected_experts_products():
    generator = torch.Generator().manual_seed(5)
    factors = [LoraFactors(torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator), 1.5)
               for _ in range(5)]
    bank = ExpertBank.from_factors(factors)
    rows = routing.phatgoose_rows(torch.randn(5, 8, generator=generator))
    u, bias = torch.randn(6, 8, generator=generator), torch.randn(2, 5, generator=generator)
    candidates = routing.gather_candidates(bias, bias, rows, None, 3)
    selection, delta = routing.route(u, bank, rows, True, 2, bias, "native", candidates=candidates)
    torch.testing.assert_close(delta, routing.apply_experts(u, bank, selection, "concat"))


def test_candidates_are_checked_and_saved(uniform_experts, tmp_path):
    with pytest.raises(ValueError, match="candidates must be None or an integer >= top_k=2"):
        GliderConfig(experts=uniform_experts, top_k=2, candidates=1)
    model = glider_model(uniform_experts, candidates=3)
    model.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert reloaded.peft_config["default"].candidates == 3
    ids, row_scores = input_ids(), scores(2, seed=9)
    torch.testing.assert_close(run(reloaded, ids, row_scores)[0], run(model, ids, row_scores)[0])
