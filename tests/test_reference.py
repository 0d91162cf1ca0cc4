"""The Glider layer against an independent, per-token reference of algorithm.md §3 (alpha = 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_MODULES, make_expert, random_gates, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file

from peft_glider import GliderConfig, routing

MODULE = "model.layers.1.self_attn.q_proj"


def read_expert_at(folder: str, module: str):
    """(A, B, scaling) of a saved LoRA adapter at `module`, read straight from its files, or None."""
    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in weights:
        return None
    A, B = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
    r = A.shape[0]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config["use_rslora"] else r)
    return A, B, scaling


def reference_layer(x, weight, experts, gates, k):
    """Loop over tokens: LN scores, mask absent experts, top-k, softmax, add the chosen experts' deltas."""

    def ln(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    out = []
    for u in x:
        candidates = []
        for e, factors in enumerate(experts):
            if factors is None:
                continue
            score = float(torch.dot(ln(u), ln(gates[e])) / math.sqrt(u.shape[0]))
            candidates.append((score, e))
        chosen = sorted(candidates, reverse=True)[: min(k, len(candidates))]
        logits = torch.tensor([score for score, _ in chosen], dtype=torch.float64)
        weights = torch.softmax(logits, dim=0)
        y = weight.double() @ u.double()
        for w, (_, e) in zip(weights, chosen):
            A, B, s = experts[e]
            y = y + w * s * (B.double() @ (A.double() @ u.double()))
        out.append(y)
    return torch.stack(out)


def build_library(tmp_path: Path, num_experts: int):
    ranks = [1, 2, 3, 4, 6, 8, 2, 5]
    module_sets = [["q_proj", "v_proj"], ["q_proj", "down_proj"], LLAMA_MODULES, ["k_proj", "v_proj"]]
    return [
        make_expert(
            tiny_llama, tmp_path / f"e{i}", seed=i, r=ranks[i % len(ranks)],
            target_modules=module_sets[i % len(module_sets)], lora_alpha=4 + i, use_rslora=(i % 3 == 2),
        )
        for i in range(num_experts)
    ]


@pytest.mark.parametrize("num_experts", [3, 8])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["grouped", "concat", "auto"])
def test_layer_matches_per_token_reference(tmp_path, num_experts, top_k, kernel):
    folders = build_library(tmp_path, num_experts)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=top_k, alpha=0.0))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=num_experts * 10 + top_k))
    glider.set_kernel(kernel)
    layer = glider.glider_layers()[MODULE]
    x = torch.randn(2, 9, layer.in_features, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        got = layer(x)
    experts = [read_expert_at(folder, MODULE) for folder in folders]
    gates = layer.glider_gates["default"].detach()
    expected = reference_layer(x.reshape(-1, x.shape[-1]), layer.base_layer.weight.detach(), experts, gates, top_k)
    assert sum(e is not None for e in experts) >= 2  # the module is shared by several experts
    torch.testing.assert_close(got.reshape(-1, got.shape[-1]).double(), expected, atol=1e-5, rtol=1e-5)


def test_routing_is_invariant_to_token_scale(tmp_path):
    folders = build_library(tmp_path, 4)
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2, alpha=0.0)).base_model
    glider.set_gates(random_gates(glider))
    layer = glider.glider_layers()[MODULE]
    x = torch.randn(5, layer.in_features)
    gates = layer.glider_gates["default"]
    present = layer.glider_present["default"]
    small = routing.select_top_k(routing.local_scores(x, gates), present, 2)
    large = routing.select_top_k(routing.local_scores(37.0 * x + 0.0, gates), present, 2)
    assert torch.equal(small.indices, large.indices)
    torch.testing.assert_close(small.weights, large.weights)


def test_local_scores_equal_standardized_dot_product():
    u, gates = torch.randn(6, 20), torch.randn(4, 20)
    expected = routing.standardize(u) @ routing.standardize(gates).T / math.sqrt(20)
    torch.testing.assert_close(routing.local_scores(u, gates), expected, atol=1e-5, rtol=1e-5)


def test_absent_experts_are_never_selected():
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 9.0, 1.0]])
    present = torch.tensor([False, True, True])
    selection = routing.select_top_k(logits, present, 2)
    assert selection.indices.tolist() == [[2, 1], [1, 2]]
    torch.testing.assert_close(selection.weights.sum(-1), torch.ones(2))


def test_grouped_kernel_paths_agree_with_concat():
    """The padded batched path (shared rank), its unbalanced fallback and the mixed-rank loop all equal concat."""
    generator = torch.Generator().manual_seed(0)
    d, o, E = 24, 20, 6
    for ranks, skew in (([4] * E, False), ([4] * E, True), ([1, 2, 3, 4, 5, 6], False)):
        A = torch.randn(sum(ranks), d, generator=generator)
        B = torch.randn(o, sum(ranks), generator=generator)
        starts = [sum(ranks[:e]) for e in range(E)]
        bank = routing.ExpertBank(
            A=A, B=B,
            rank_expert=torch.repeat_interleave(torch.arange(E), torch.tensor(ranks)),
            rank_scaling=torch.repeat_interleave(torch.linspace(0.5, 2.0, E), torch.tensor(ranks)),
            spans=[(s, s + r) for s, r in zip(starts, ranks)],
            expert_slot=torch.arange(E),
        )
        x = torch.randn(40, d, generator=generator)
        logits = torch.randn(40, E, generator=generator) + (torch.tensor([9.0, 8.0, 0, 0, 0, 0]) if skew else 0)
        selection = routing.select_top_k(logits, torch.ones(E, dtype=torch.bool), 2)
        expected = routing.delta_concat(x, bank, selection)
        torch.testing.assert_close(routing.delta_grouped(x, bank, selection), expected, atol=1e-4, rtol=1e-4)
