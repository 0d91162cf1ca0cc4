"""The Glider layer against an independent, per-token reference of algorithm.md §3 (alpha = 0)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_MODULES, make_expert, random_gates, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file

from peft_glider import GliderConfig, native, routing
from peft_glider import bank as bank_packing
from peft_glider import kernel_choice
from peft_glider import kernels

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


def reference_layer(x, weight, experts, gates, k, global_bias=None):
    """Loop over tokens: LN scores (plus the sequence's global bias), mask absent experts, top-k, softmax, add
    the chosen experts' deltas."""

    def ln(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    out = []
    for u in x:
        candidates = []
        for e, factors in enumerate(experts):
            if factors is None:
                continue
            score = float(torch.dot(ln(u), ln(gates[e])) / math.sqrt(u.shape[0]))
            score += 0.0 if global_bias is None else float(global_bias[e])
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
@pytest.mark.parametrize("kernel", ["concat", "gather", "sparse", "native", "auto"])
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


@pytest.mark.parametrize("kernel", ["concat", "gather", "sparse", "native", "auto"])
@pytest.mark.parametrize("tokens", [3, 1100])  # few tokens: layer-norm scores; many: the two-reduction form
def test_layer_with_shared_rank_matches_per_token_reference(tmp_path, kernel, tokens):
    """A shared rank and scaling (every kernel runs, scaling applied once) and absent experts (slots), in place
    into the base output, with a global bias: the full layer path against the per-token reference."""
    folders = [
        make_expert(tiny_llama, tmp_path / f"e{i}", seed=i, r=4, target_modules=["q_proj", "v_proj"] if i % 2 else LLAMA_MODULES)
        for i in range(6)
    ]
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2, alpha=0.0)).base_model
    glider.set_gates(random_gates(glider, seed=tokens))
    glider.set_kernel(kernel)
    for module in (MODULE, "model.layers.1.mlp.down_proj"):  # all experts present, then only half of them
        layer = glider.glider_layers()[module]
        x = torch.randn(1, tokens, layer.in_features, generator=torch.Generator().manual_seed(1))
        bias = torch.randn(1, 6, generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), glider.global_scores(bias, alpha=1.0):
            got = layer(x)
        experts = [read_expert_at(folder, module) for folder in folders]
        gates = layer.glider_gates["default"].detach()
        expected = reference_layer(x[0], layer.base_layer.weight.detach(), experts, gates, 2, bias[0])
        torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_routing_is_invariant_to_token_scale(tmp_path):
    folders = build_library(tmp_path, 4)
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2, alpha=0.0)).base_model
    glider.set_gates(random_gates(glider))
    layer = glider.glider_layers()[MODULE]
    x = torch.randn(5, layer.in_features)
    gates = layer.glider_gates["default"]
    present = layer.expert_bank("default").present
    small = routing.select_top_k(routing.local_scores(x, gates), present, 2)
    large = routing.select_top_k(routing.local_scores(37.0 * x + 0.0, gates), present, 2)
    assert torch.equal(small.indices, large.indices)
    torch.testing.assert_close(small.weights, large.weights)


# Both forms of the standardized dot product: the fused layer norm (few tokens) and the two reductions.
SCORE_FORMS = {"layer norm": 10**9, "reductions": 0}


@pytest.mark.parametrize("form", list(SCORE_FORMS))
def test_local_scores_equal_standardized_dot_product(monkeypatch, form):
    monkeypatch.setattr(routing, "_LAYER_NORM_MAX_FEATURES", SCORE_FORMS[form])
    u, gates = torch.randn(6, 20) * 3 + 5, torch.randn(4, 20)
    expected = routing.standardize(u) @ routing.standardize(gates).T / math.sqrt(20)
    torch.testing.assert_close(routing.local_scores(u, gates), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", list(SCORE_FORMS))
def test_local_scores_have_exact_gradients(monkeypatch, form):
    """Gate training through the full router differentiates either form of LN(u) . rows."""
    monkeypatch.setattr(routing, "_LAYER_NORM_MAX_FEATURES", SCORE_FORMS[form])
    u = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(routing.local_scores, (u, gates))


def test_local_scores_form_follows_token_count():
    """Decoding-sized inputs take the fused layer norm, prefill-sized ones the reductions; both agree."""
    gates = torch.randn(4, 512)
    for tokens in (1, 64, 65, 512):
        u = torch.randn(tokens, 512) * 2 - 1
        expected = routing.standardize(u) @ routing.phatgoose_rows(gates).T
        torch.testing.assert_close(routing.local_scores(u, gates), expected, atol=1e-5, rtol=1e-5)
    assert 64 * 512 <= routing._LAYER_NORM_MAX_FEATURES < 65 * 512


def test_absent_experts_are_never_selected():
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 9.0, 1.0]])
    present = torch.tensor([False, True, True])
    selection = routing.select_top_k(logits, present, 2)
    assert selection.indices.tolist() == [[2, 1], [1, 2]]
    torch.testing.assert_close(selection.weights.sum(-1), torch.ones(2))


def make_bank(ranks, scalings, present, generator, d=24, o=20, dtype=torch.float64):
    """An ExpertBank of random factors; experts with `present[e]` False take no rows."""
    spans, rank_expert, rank_scaling, offset = [], [], [], 0
    for expert, (rank, scaling, here) in enumerate(zip(ranks, scalings, present)):
        spans.append((offset, offset + rank) if here else None)
        offset += rank if here else 0
        rank_expert += [expert] * (rank if here else 0)
        rank_scaling += [scaling] * (rank if here else 0)
    present = torch.tensor(present)
    return bank_packing.ExpertBank(
        A=torch.randn(offset, d, generator=generator, dtype=dtype),
        BT=torch.randn(offset, o, generator=generator, dtype=dtype),
        rank_expert=torch.tensor(rank_expert),
        rank_scaling=torch.tensor(rank_scaling, dtype=dtype),
        spans=spans,
        expert_slot=torch.where(present, present.long().cumsum(0) - 1, -1),
    )


def per_pair_reference(x, bank, selection):
    """sum_j w_j s_j B_j A_j x, one (token, choice) pair at a time."""
    out = torch.zeros(x.shape[0], bank.BT.shape[1], dtype=x.dtype)
    for token in range(x.shape[0]):
        for expert, weight in zip(selection.indices[token].tolist(), selection.weights[token]):
            start, end = bank.spans[expert]
            out[token] += weight * bank.rank_scaling[start] * (bank.BT[start:end].T @ (bank.A[start:end] @ x[token]))
    return out


BANKS = {  # ranks, scalings, present
    "shared rank and scaling": ([4] * 6, [2.0] * 6, [True] * 6),
    "shared rank, mixed scalings, absent experts": ([4] * 6, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [True, False] * 3),
    "mixed ranks": ([1, 2, 3, 4, 5, 6], [2.0] * 6, [True] * 5 + [False]),
}


@pytest.mark.parametrize("bank_name", list(BANKS))
@pytest.mark.parametrize("kernel", ["concat", "gather", "sparse"])
def test_kernels_match_per_pair_reference_with_gradients(bank_name, kernel):
    """Every kernel computes the same deltas, adding into `out` in place, without gradients; with gradients
    (where `sparse` falls back to concat), the same gradients with respect to the tokens and routing weights."""
    generator = torch.Generator().manual_seed(0)
    bank = make_bank(*BANKS[bank_name], generator)
    x = torch.randn(7, 24, generator=generator, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(7, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    present = bank.expert_slot >= 0
    selection = routing.select_top_k(logits, None if present.all() else present, 2)
    start = torch.randn(7, 20, generator=generator, dtype=torch.float64)

    expected = start + per_pair_reference(x, bank, selection)
    with torch.no_grad():
        torch.testing.assert_close(routing.apply_experts(x, bank, selection, kernel, out=start.clone()), expected)
    got = routing.apply_experts(x, bank, selection, kernel, out=start.clone())
    torch.testing.assert_close(got, expected)
    direction = torch.randn(7, 20, generator=generator, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * direction).sum(), (x, logits), retain_graph=True)
    expected_grads = torch.autograd.grad((expected * direction).sum(), (x, logits))
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad)


NATIVE_BANKS = {  # ranks, scalings, present: the banks above, and ranks past the kernel's 256-row chunk
    **BANKS,
    "ranks over one chunk": ([300, 3, 260], [0.5, 2.0, 1.0], [True, True, True]),
}


@pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")
@pytest.mark.parametrize("bank_name", list(NATIVE_BANKS))
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 100])  # 100: split across threads
def test_native_kernel_matches_per_pair_reference(bank_name, simd, tokens):
    """The compiled kernel against the per-pair reference (computed in float64), adding into `out` in place,
    with its AVX2 and portable loops, one thread or several, rows with a stride, and a non-contiguous `out`."""
    generator = torch.Generator().manual_seed(tokens)
    ranks, scalings, present = NATIVE_BANKS[bank_name]
    bank = make_bank(ranks, scalings, present, generator, d=37, o=29, dtype=torch.float32)
    assert "native" in kernel_choice.runnable_kernels(bank, torch.float32)
    x = torch.randn(tokens, 40, generator=generator)[:, :37]  # rows with a stride of 40
    logits = torch.randn(tokens, len(ranks), generator=generator)
    mask = torch.tensor(present)
    selection = routing.select_top_k(logits, None if mask.all() else mask, 2)
    start = torch.randn(tokens, 29, generator=generator)
    expected = start.double() + per_pair_reference(x.double(), make_bank_double(bank), selection)

    out = start.clone()
    native.add_selected_experts(
        x, bank.A, bank.BT, bank.expert_row_start, bank.expert_rank, bank.expert_scaling,
        selection.indices, selection.weights, out, simd=simd,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    transposed_out = start.T.clone().T  # the same values with columns contiguous: computed apart, then added
    got = routing.apply_experts(x, bank, selection, "native", out=transposed_out)
    assert got is transposed_out
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")
@pytest.mark.parametrize("bank_name", list(BANKS))
@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("tokens, groups, k", [(1, 1, 1), (6, 2, 2), (100, 4, 3)])
def test_fused_routing_matches_the_torch_path(bank_name, router, simd, tokens, groups, k):
    """Scores, global bias per group of tokens, absent experts, top-k and softmax in the compiled call: the same
    experts and weights as the torch functions, and the same deltas as the per-pair reference."""
    generator = torch.Generator().manual_seed(tokens + k)
    ranks, scalings, present = BANKS[bank_name]
    bank = make_bank(ranks, scalings, present, generator, d=37, o=29, dtype=torch.float32)
    gates = torch.randn(len(ranks), 37, generator=generator)
    rows = routing.phatgoose_rows(gates) if router == "phatgoose" else routing.arrow_rows(gates, 0.5)
    x = 3.0 + 2.0 * torch.randn(tokens, 37, generator=generator)  # a mean and scale the scores must ignore
    bias = torch.randn(groups, len(ranks), generator=generator)
    start = torch.randn(tokens, 29, generator=generator)
    assert kernels.can_fuse_routing(rows, bank)

    dots = routing.standardized_dots if router == "phatgoose" else routing.arrow_dots
    mask = torch.tensor(present)
    expected_selection = routing.select_top_k(
        routing.combine_logits(dots(x, rows), bias), None if mask.all() else mask, k
    )
    expected = start.double() + per_pair_reference(x.double(), make_bank_double(bank), expected_selection)
    out = start.clone()
    indices, weights = native.route_and_add(
        x, rows, router == "phatgoose", bank_packing.LN_EPS, bias, k, bank.A, bank.BT,
        bank.expert_row_start, bank.expert_rank, bank.expert_scaling, out, simd=simd,
    )  # fmt: skip
    assert indices.tolist() == expected_selection.indices.tolist()
    torch.testing.assert_close(weights, expected_selection.weights, atol=1e-5, rtol=1e-4)  # float32 logits
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-4)  # deltas of about 100
    bound = kernels.bind_native_routing(rows, router == "phatgoose", bias, k, bank)
    selection, got = kernels.route_and_apply_native(x, bound, bank, start.clone())
    assert selection.indices.tolist() == indices.tolist()
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-4)  # (with SIMD)


@pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")
def test_a_generate_call_binds_each_module_once_per_token_bucket_and_decodes_as_the_torch_path(tmp_path, monkeypatch):
    """A call keeps its compiled routing decisions: the prompt binds each module once, the first decoding step
    once more (another token bucket), the later steps reuse them; the tokens and scores equal the torch kernels'."""
    folders = build_library(tmp_path, 4)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=3))
    bindings = []
    real_init = native.RouteAndAdd.__init__

    def counted_init(self, *args, **kwargs):
        bindings.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(native.RouteAndAdd, "__init__", counted_init)
    prompt, scores = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0)), torch.rand(2, 4)

    def generate(kernel):
        glider.set_kernel(kernel)
        with torch.no_grad(), glider.global_scores(scores, alpha=2.0):
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)

    fused = generate("native")
    assert len(bindings) == 2 * len(glider.glider_layers())  # 5 prompt tokens per row, then 1 per row, 5 times
    reference = generate("concat")
    assert fused.sequences.tolist() == reference.sequences.tolist()
    torch.testing.assert_close(torch.stack(fused.scores), torch.stack(reference.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")
def test_a_kept_routing_decision_never_serves_after_its_gates_or_kernel_change_within_the_call(tmp_path):
    """Inside one routing context the layer's gates change in place (what an optimizer step does) and the kernel
    is switched: each forward routes with the gates and kernel of its own moment, as the per-token reference."""
    folders = build_library(tmp_path, 4)
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2)).base_model
    glider.set_gates(random_gates(glider, seed=4))
    glider.set_kernel("native")
    layer = glider.glider_layers()[MODULE]
    gates = layer.glider_gates["default"]
    experts = [read_expert_at(folder, MODULE) for folder in folders]
    x = torch.randn(1, 3, layer.in_features, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(1, 4, generator=torch.Generator().manual_seed(6))

    def expected():
        return reference_layer(x[0], layer.base_layer.weight.detach(), experts, gates.detach(), 2, bias[0])

    with torch.no_grad(), glider.global_scores(bias, alpha=1.0):
        before = layer(x)
        torch.testing.assert_close(before[0].double(), expected(), atol=1e-5, rtol=1e-5)
        gates.mul_(-1.0)  # in place: the same tensor, another version
        after = layer(x)
        assert not torch.allclose(after, before)  # other experts chosen: a kept decision would repeat `before`
        torch.testing.assert_close(after[0].double(), expected(), atol=1e-5, rtol=1e-5)
        glider.set_kernel("concat")
        torch.testing.assert_close(layer(x), after, atol=1e-5, rtol=1e-5)
        glider.set_kernel("native")
        torch.testing.assert_close(layer(x), after, atol=1e-5, rtol=1e-5)


def make_bank_double(bank):
    return bank_packing.ExpertBank(
        A=bank.A.double(), BT=bank.BT.double(), rank_expert=bank.rank_expert,
        rank_scaling=bank.rank_scaling.double(), spans=bank.spans, expert_slot=bank.expert_slot,
    )  # fmt: skip


def test_native_kernel_is_built_where_a_compiler_is():
    """The package builds its compiled kernel at install where a C compiler is found (`setup.py`)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the pure-torch kernels run")
    assert native.available(), "reinstall with `pip install -e .`: the compiled kernel was not built"


def test_native_kernel_steps_aside_where_it_cannot_run():
    """Gradients, half precision and float64 take a torch kernel, also when `native` is forced."""
    generator = torch.Generator().manual_seed(0)
    bank = make_bank([4] * 6, [2.0] * 6, [True] * 6, generator, dtype=torch.float32)
    assert "native" not in kernel_choice.runnable_kernels(bank, torch.float32, needs_grad=True)
    assert "native" not in kernel_choice.runnable_kernels(bank, torch.bfloat16)
    assert "native" not in kernel_choice.runnable_kernels(make_bank([4] * 6, [2.0] * 6, [True] * 6, generator), torch.float64)
    x = torch.randn(5, 24, generator=generator, requires_grad=True)
    selection = routing.select_top_k(torch.randn(5, 6, generator=generator), None, 2)
    got = routing.apply_experts(x, bank, selection, "native")
    assert got.grad_fn is not None  # computed by a differentiable torch kernel
    expected = per_pair_reference(x.double(), make_bank_double(bank), selection)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


def test_auto_kernel_follows_the_shapes():
    """With the compiled kernel: it, wherever it can run. Without it (or where it cannot): few experts, the dense
    concat; a few tokens among many experts, gather; many tokens and experts, sparse; half precision and
    gradients never take the sparse kernel, mixed ranks always take concat."""
    generator = torch.Generator().manual_seed(0)
    few = make_bank([8] * 8, [2.0] * 8, [True] * 8, generator, d=512, o=512, dtype=torch.float32)
    many = make_bank([8] * 128, [2.0] * 128, [True] * 128, generator, d=512, o=512, dtype=torch.float32)
    mixed = make_bank([4, 8] * 64, [2.0] * 128, [True] * 128, generator, d=512, o=512, dtype=torch.float32)
    if native.available():
        for bank in (few, many, mixed):
            for tokens in (1, 512):
                assert kernel_choice.choose_kernel(tokens, bank, 2, torch.float32) == "native"
            assert kernel_choice.choose_kernel(512, bank, 2, torch.float32, needs_grad=True) != "native"
            bank.native_ready = False  # as without the compiled kernel
            kernel_choice.choices_for(bank).clear()
    assert kernel_choice.choose_kernel(512, few, 2, torch.float32) == "concat"
    assert kernel_choice.choose_kernel(1, few, 2, torch.float32) == "concat"
    assert kernel_choice.choose_kernel(1, many, 2, torch.float32) == "gather"
    assert kernel_choice.choose_kernel(512, many, 2, torch.float32) == "sparse"
    assert kernel_choice.choose_kernel(512, many, 2, torch.float32, needs_grad=True) != "sparse"
    assert kernel_choice.choose_kernel(512, many, 2, torch.bfloat16) != "sparse"
    assert kernel_choice.choose_kernel(512, mixed, 2, torch.float32) == "concat"


def test_unknown_kernel_is_refused():
    generator = torch.Generator().manual_seed(0)
    bank = make_bank([4] * 3, [1.0] * 3, [True] * 3, generator)
    selection = routing.select_top_k(torch.randn(2, 3, dtype=torch.float64), None, 2)
    with pytest.raises(ValueError, match="grouped"):
        routing.apply_experts(torch.randn(2, 24, dtype=torch.float64), bank, selection, "grouped")


@pytest.mark.parametrize("kernel", ["concat", "gather", "sparse", "native"])
def test_empty_batch_passes_through(tmp_path, kernel):
    folders = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(3)]
    glider = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2)).base_model
    glider.set_kernel(kernel)
    layer = glider.glider_layers()[MODULE]
    with torch.no_grad(), glider.global_scores(torch.rand(2, 3), alpha=1.0):
        assert layer(torch.randn(0, 5, layer.in_features)).shape == (0, 5, layer.out_features)
    assert layer(torch.randn(0, layer.in_features)).shape == (0, layer.out_features)  # with gradients
