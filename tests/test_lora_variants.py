"""Every LoRA that PEFT writes: a one-expert Glider adapter at top_k=1 gives PEFT's own logits (DoRA, B's bias,
GPT-2's Conv1D, a LoRA on a tied lm_head, rsLoRA, patterns), a library mixing them routes each row to the
expert its global scores pick exactly as PEFT computes that expert, and round-trips through save and load; what
cannot be mixed per token (modules_to_save, embedding LoRA, another base weight) is refused, saying why."""

from __future__ import annotations

import pytest
import torch
from conftest import input_ids, tiny_llama, tiny_t5
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from peft_glider import GliderConfig

ATOL = 1e-5


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}

VARIANTS = {
    "plain": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "all-linear-rslora": ("llama", dict(target_modules="all-linear", use_rslora=True)),
    "patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                               alpha_pattern={"down_proj": 3}, layers_to_transform=[1])),
    "dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "dora-all-linear": ("llama", dict(target_modules="all-linear", use_dora=True, use_rslora=True)),
    "lora-bias": ("llama", dict(target_modules=["q_proj", "o_proj", "up_proj"], lora_bias=True)),
    "lm-head-tied": ("llama", dict(target_modules=["q_proj", "lm_head"])),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
}


def peft_expert(folder, arch: str, seed: int, **options) -> str:
    """A PEFT LoRA of `arch` saved to `folder`, every trained tensor random (DoRA's magnitudes moved too)."""
    model = get_peft_model(FACTORIES[arch](), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return str(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_one_expert_glider_adapter_equals_peft(tmp_path, variant):
    arch, options = VARIANTS[variant]
    folder = peft_expert(tmp_path / variant, arch, seed=1, **options)
    ids = input_ids(batch=2, length=9)
    expected = logits(PeftModel.from_pretrained(FACTORIES[arch](), folder), ids)
    base = logits(FACTORIES[arch](), ids)
    assert (expected - base).abs().max() > 1e-3  # the expert changes the model
    glider = get_peft_model(FACTORIES[arch](), GliderConfig(experts=[folder], top_k=1))
    torch.testing.assert_close(logits(glider, ids), expected, atol=ATOL, rtol=0)


# A library on the tiny Llama: each kind of expert PEFT writes, on the same modules (a row routed to one expert by
# its global scores gets that expert at every module; where it does not adapt one, top-1 picks another there).
MODULES = ["q_proj", "v_proj", "down_proj"]
MIXED = {
    "plain": dict(target_modules=MODULES),
    "rslora": dict(target_modules=MODULES, use_rslora=True),
    "dora": dict(target_modules=MODULES, use_dora=True),
    "biased": dict(target_modules=MODULES, lora_bias=True),
    "patterned": dict(target_modules=MODULES, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 2}),
}


@pytest.fixture
def mixed(tmp_path) -> list[str]:
    return [peft_expert(tmp_path / name, "llama", seed=10 + i, **options) for i, (name, options) in enumerate(MIXED.items())]


def routed_rows(model, ids: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """Logits with each row's global scores putting all the weight on one expert (alpha 100, top_k=1)."""
    scores = torch.full((len(chosen), len(MIXED)), -1.0)
    scores[torch.arange(len(chosen)), chosen] = 1.0
    with torch.no_grad(), model.base_model.global_scores(scores):
        return model(input_ids=ids).logits


def test_a_mixed_library_routes_each_row_as_peft_computes_its_expert_and_round_trips(tmp_path, mixed, hub):
    ids = input_ids(batch=len(MIXED), length=6)
    chosen = list(range(len(MIXED)))
    expected = torch.stack([logits(PeftModel.from_pretrained(tiny_llama(), folder), ids[i:i + 1])[0]
                            for i, folder in enumerate(mixed)])
    model = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0))
    torch.testing.assert_close(routed_rows(model, ids, chosen), expected, atol=ATOL, rtol=0)

    model.save_pretrained(tmp_path / "self-contained")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "self-contained")
    torch.testing.assert_close(routed_rows(loaded, ids, chosen), expected, atol=ATOL, rtol=0)
    two = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=2, alpha=100.0))
    two.save_pretrained(tmp_path / "top2")
    torch.testing.assert_close(routed_rows(PeftModel.from_pretrained(tiny_llama(), tmp_path / "top2"), ids, chosen),
                               routed_rows(two, ids, chosen), atol=0, rtol=0)

    router_only = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0, save_expert_weights=False))
    router_only.save_pretrained(tmp_path / "router-only")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "router-only")
    torch.testing.assert_close(routed_rows(reloaded, ids, chosen), expected, atol=ATOL, rtol=0)

    model.push_to_hub("me/mixed-glider")  # through the loopback Hub, and back
    from_hub = PeftModel.from_pretrained(tiny_llama(), "me/mixed-glider")
    torch.testing.assert_close(routed_rows(from_hub, ids, chosen), expected, atol=ATOL, rtol=0)


def test_dora_experts_on_every_kernel_path(mixed):
    """The low-rank products run in whichever kernel; the DoRA and bias terms are added the same way on each."""
    from peft_glider.kernels import KERNEL_FUNCTIONS, triton_available

    ids = input_ids(batch=len(MIXED), length=6)
    chosen = [2, 3, 2, 0, 1]  # the DoRA and the biased expert on several rows
    model = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0))
    reference = None
    for kernel in sorted(KERNEL_FUNCTIONS):
        if kernel == "triton" and not triton_available(torch.device("cpu")):  # under TRITON_INTERPRET=1 only
            continue
        model.base_model.set_kernel(kernel)
        got = routed_rows(model, ids, chosen)
        reference = got if reference is None else reference
        torch.testing.assert_close(got, reference, atol=ATOL, rtol=0, msg=kernel)


def test_expert_edits_keep_dora_and_bias_terms(mixed):
    """add_expert and remove_expert move the per-expert output terms with the experts."""
    ids = input_ids(batch=3, length=6)
    full = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0))
    edited = get_peft_model(tiny_llama(), GliderConfig(experts=mixed[:2], top_k=1, alpha=100.0))
    for folder in mixed[2:]:
        edited.base_model.add_expert(folder)
    torch.testing.assert_close(routed_rows(edited, ids, [2, 3, 4]), routed_rows(full, ids, [2, 3, 4]), atol=0, rtol=0)
    edited.base_model.remove_expert("plain")
    scores = torch.tensor([[-1.0, 1.0, -1, -1], [-1, -1, 1.0, -1], [-1, -1, -1, 1.0]])  # dora, biased, patterned
    with torch.no_grad(), edited.base_model.global_scores(scores):
        after = edited(input_ids=ids).logits
    torch.testing.assert_close(after, routed_rows(full, ids, [2, 3, 4]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "replaces whole modules"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "LoRA on an embedding"),
])
def test_what_cannot_be_mixed_per_token_is_refused_saying_why(tmp_path, options, message):
    folder = peft_expert(tmp_path / "expert", "llama", seed=3, **options)
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), GliderConfig(experts=[folder], top_k=1))


def test_an_lm_head_expert_trained_on_another_base_weight_is_refused(tmp_path):
    folder = peft_expert(tmp_path / "expert", "llama", seed=3, target_modules=["lm_head"])
    other = tiny_llama(seed=5)  # other embeddings, tied to lm_head
    with pytest.raises(ValueError, match="saved with its own base weight at module 'lm_head'"):
        get_peft_model(other, GliderConfig(experts=[folder], top_k=1))


def test_a_mixed_library_under_a_resident_budget_reads_dora_experts_when_they_become_resident(mixed):
    ids = input_ids(batch=len(MIXED), length=6)
    expected = routed_rows(get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0)), ids, [0, 1, 2, 3, 4])
    budgeted = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0, candidates=1,
                                                          max_resident_experts=2))
    for row, chosen in enumerate([2, 3, 2, 4, 0]):  # one row a call: its expert made resident, the LRU evicted
        got = routed_rows(budgeted, ids[row:row + 1], [chosen])
        want = routed_rows(get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=1, alpha=100.0)),
                           ids[row:row + 1], [chosen])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(routed_rows(budgeted, ids[:1], [0]), expected[:1], atol=ATOL, rtol=0)


def test_output_terms_mixed_densely_or_gathered_agree(mixed, monkeypatch):
    """Small banks mix the DoRA and bias terms through a dense (N, E) matrix, large ones gather (N, k, o)."""
    from peft_glider import kernels

    ids = input_ids(batch=len(MIXED), length=6)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=mixed, top_k=2, alpha=100.0))
    dense = routed_rows(model, ids, [2, 3, 2, 0, 1])
    monkeypatch.setattr(kernels, "_DENSE_TERMS_MAX_EXPERTS", 0)
    torch.testing.assert_close(routed_rows(model, ids, [2, 3, 2, 0, 1]), dense, atol=ATOL, rtol=0)
