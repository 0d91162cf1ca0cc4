"""Properties of the routing maths (hypothesis): what must hold for any tokens, gates, experts and scores."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_glider import bank as bank_packing
from peft_glider import routing
from peft_glider.experts import LoraFactors

D, O = 8, 6
cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "experts": st.integers(2, 5),
    "tokens": st.integers(1, 9),
    "router": st.sampled_from(["phatgoose", "arrow"]),
    "kernel": st.sampled_from(["concat", "gather", "sparse"]),
})
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def build(case: dict, permutation: list[int] | None = None):
    """A bank of random experts (float64), router rows, tokens and a global bias; experts optionally permuted."""
    generator = torch.Generator().manual_seed(case["seed"])
    n, e = case["tokens"], case["experts"]
    factors = [LoraFactors(torch.randn(3, D, generator=generator, dtype=torch.float64),
                           torch.randn(O, 3, generator=generator, dtype=torch.float64),
                           float(1 + i)) for i in range(e)]
    gates = torch.randn(e, D, generator=generator, dtype=torch.float64)
    u = torch.randn(n, D, generator=generator, dtype=torch.float64)
    bias = torch.randn(1, e, generator=generator, dtype=torch.float64)
    if permutation is not None:
        factors, gates, bias = [factors[i] for i in permutation], gates[permutation], bias[:, permutation]
    rows = routing.phatgoose_rows(gates) if case["router"] == "phatgoose" else routing.arrow_rows(gates, 1.0)
    return bank_packing.ExpertBank.from_factors(factors), rows, u, bias


def route(case: dict, bank, rows, u, bias, k: int = 2):
    return routing.route(u, bank, rows, case["router"] == "phatgoose", k, bias, case["kernel"])


@PROPERTY_SETTINGS
@given(case=cases, scale=st.floats(0.3, 100.0))
def test_phatgoose_routing_is_invariant_to_the_activation_scale(case, scale):
    """Exact up to LN's epsilon (1e-5 against a variance of about 1 here)."""
    case["router"] = "phatgoose"
    bank, rows, u, bias = build(case)
    selection, _ = route(case, bank, rows, u, bias)
    scaled, _ = route(case, bank, rows, u * scale, bias)
    torch.testing.assert_close(scaled.weights, selection.weights, atol=1e-3, rtol=0)
    assert torch.equal(scaled.indices, selection.indices)


@PROPERTY_SETTINGS
@given(case=cases, order=st.randoms(use_true_random=False))
def test_permuting_the_experts_permutes_the_routing(case, order):
    permutation = list(range(case["experts"]))
    order.shuffle(permutation)
    selection, delta = route(case, *build(case))
    permuted, permuted_delta = route(case, *build(case, permutation))
    assert torch.equal(torch.tensor(permutation)[permuted.indices], selection.indices)
    torch.testing.assert_close(permuted.weights, selection.weights)
    torch.testing.assert_close(permuted_delta, delta)


@PROPERTY_SETTINGS
@given(case=cases)
def test_selected_weights_are_positive_and_sum_to_one(case):
    selection, _ = route(case, *build(case))
    assert (selection.weights > 0).all()
    torch.testing.assert_close(selection.weights.sum(-1), torch.ones(case["tokens"], dtype=torch.float64))
    assert all(len(set(row.tolist())) == 2 for row in selection.indices)  # k distinct experts


@PROPERTY_SETTINGS
@given(case=cases)
def test_all_experts_with_alpha_zero_is_the_dense_softmax_mixture(case):
    bank, rows, u, _ = build(case)
    e = case["experts"]
    _, delta = route(case, bank, rows, u, None, k=e)
    dots = routing.standardized_dots(u, rows) if case["router"] == "phatgoose" else routing.arrow_dots(u, rows)
    weights = torch.softmax(dots, dim=-1)  # (N, E)
    expected = torch.zeros(case["tokens"], O, dtype=torch.float64)
    for index, span in enumerate(bank.spans):
        start, end = span
        expert = (u @ bank.A[start:end].T) @ bank.BT[start:end] * bank.expert_scaling[index]
        expected += weights[:, index : index + 1] * expert
    torch.testing.assert_close(delta, expected)


@PROPERTY_SETTINGS
@given(case=cases, row=st.integers(0, 3), batch=st.integers(1, 4))
def test_a_row_routed_alone_equals_the_same_row_in_any_batch(case, row, batch):
    bank, rows, _, _ = build(case)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    row = row % batch
    tokens = torch.randn(batch, case["tokens"], D, generator=generator, dtype=torch.float64)
    bias = torch.randn(batch, case["experts"], generator=generator, dtype=torch.float64)
    together, delta = route(case, bank, rows, tokens.reshape(-1, D), bias)
    alone, alone_delta = route(case, bank, rows, tokens[row], bias[row : row + 1])
    part = slice(row * case["tokens"], (row + 1) * case["tokens"])
    assert torch.equal(together.indices[part], alone.indices)
    torch.testing.assert_close(delta[part], alone_delta)
