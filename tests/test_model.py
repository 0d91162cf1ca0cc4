"""End-to-end behaviour of the Glider tuner on tiny Llama and T5 models."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, input_ids, make_expert, random_gates, tiny_llama, tiny_t5
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model

from peft_glider import GliderConfig, GliderModel


def forward_logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_single_expert_top1_equals_plain_peft(tmp_path, arch):
    factory = MODEL_FACTORIES[arch]
    modules = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["q", "v", "wo"]
    folder = make_expert(factory, tmp_path / "expert", seed=3, r=4, target_modules=modules, lora_alpha=12)
    ids = input_ids()
    expected = forward_logits(PeftModel.from_pretrained(factory(), folder), ids)
    glider = get_peft_model(factory(), GliderConfig(experts=[folder], top_k=1))
    assert isinstance(glider.base_model, GliderModel)
    got = forward_logits(glider, ids)
    base = forward_logits(factory(), ids)
    assert (expected - base).abs().max() > 1e-3  # the expert really changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_large_alpha_one_hot_global_scores_pick_that_expert_first(arch, llama_experts, t5_experts):
    factory = MODEL_FACTORIES[arch]
    folders = llama_experts if arch == "llama" else t5_experts
    model = get_peft_model(factory(), GliderConfig(experts=folders, top_k=2, alpha=1000.0))
    glider = model.base_model
    glider.set_gates(random_gates(glider, scale=5.0))
    ids = input_ids(batch=3)
    for target in range(len(folders)):
        scores = torch.zeros(3, len(folders))
        scores[:, target] = 1.0
        with glider.global_scores(scores), glider.routing_trace() as trace:
            forward_logits(model, ids)
        adapting = {m for m, layer in glider.glider_layers().items() if layer.glider_spans["default"][target]}
        assert set(trace.modules) == set(glider.glider_layers())
        for module in adapting:
            first = trace.counts(module, first_choice_only=True)
            assert first[target] == first.sum() > 0, (module, first)
        # modules the expert does not adapt never route to it
        for module in set(trace.modules) - adapting:
            assert trace.counts(module)[target] == 0


def test_without_global_scores_alpha_has_no_effect(llama_experts):
    ids = input_ids()
    outputs = []
    for alpha in (0.0, 100.0):
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, alpha=alpha))
        model.base_model.set_gates(random_gates(model.base_model))
        outputs.append(forward_logits(model, ids))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("save_expert_weights", [True, False])
def test_save_and_load_round_trip(tmp_path, arch, save_expert_weights, llama_experts, t5_experts):
    factory = MODEL_FACTORIES[arch]
    folders = llama_experts if arch == "llama" else t5_experts
    model = get_peft_model(factory(), GliderConfig(experts=folders, save_expert_weights=save_expert_weights))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=5))
    glider.set_instruction_embeddings(torch.randn(len(folders), 6))
    scores = torch.rand(2, len(folders))
    ids = input_ids()
    with glider.global_scores(scores):
        expected = forward_logits(model, ids)
    model.save_pretrained(tmp_path / "glider")

    config = PeftConfig.from_pretrained(tmp_path / "glider")
    assert isinstance(config, GliderConfig) and config.instruction_embedding_dim == 6
    loaded = PeftModel.from_pretrained(factory(), tmp_path / "glider")
    reloaded = loaded.base_model
    assert reloaded.expert_names == glider.expert_names
    torch.testing.assert_close(reloaded.get_instruction_embeddings(), glider.get_instruction_embeddings())
    with reloaded.global_scores(scores):
        got = forward_logits(loaded, ids)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_router_only_checkpoint_is_small_and_self_contained_one_is_not(tmp_path, llama_experts):
    sizes = {}
    for save in (True, False):
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, save_expert_weights=save))
        model.save_pretrained(tmp_path / str(save))
        sizes[save] = (tmp_path / str(save) / "adapter_model.safetensors").stat().st_size
        keys = model.base_model.state_dict().keys()
        assert any(k.endswith("glider_A.default") for k in keys) == save
    assert sizes[False] < sizes[True]


def test_router_only_checkpoint_refuses_changed_expert(tmp_path, llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, save_expert_weights=False))
    model.save_pretrained(tmp_path / "glider")
    make_expert(tiny_llama, llama_experts[0], seed=999, r=2)  # overwrite expert 0 with other tensors
    with pytest.raises(ValueError, match="changed since this Glider adapter was saved"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider")


def test_low_cpu_mem_usage_load(tmp_path, llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    model.base_model.set_gates(random_gates(model.base_model))
    ids = input_ids()
    expected = forward_logits(model, ids)
    model.save_pretrained(tmp_path / "glider")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider", low_cpu_mem_usage=True)
    torch.testing.assert_close(forward_logits(loaded, ids), expected, atol=0, rtol=0)


def test_auto_peft_model_loads_glider_adapter(tmp_path, llama_experts):
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), GliderConfig(experts=llama_experts))
    model.base_model.set_gates(random_gates(model.base_model))
    ids = input_ids()
    expected = forward_logits(model, ids)
    model.save_pretrained(tmp_path / "glider")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "glider")
    torch.testing.assert_close(forward_logits(auto, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generate_with_beams_routes_each_row_by_its_own_scores(arch, llama_experts, t5_experts):
    factory = MODEL_FACTORIES[arch]
    folders = llama_experts if arch == "llama" else t5_experts
    model = get_peft_model(factory(), GliderConfig(experts=folders, top_k=1, alpha=1000.0))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=2))
    ids = input_ids(batch=2, length=6)
    scores = torch.zeros(2, len(folders))
    scores[0, 0] = 1.0  # row 0 -> expert 0
    scores[1, 2] = 1.0  # row 1 -> expert 2
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=True)
    with torch.no_grad(), glider.global_scores(scores), glider.routing_trace() as trace:
        batched = model.generate(input_ids=ids, **kwargs)
    assert batched.shape[0] == 4
    checked = 0
    for module, calls in trace.selections.items():
        expected_row_expert = []
        for row_expert in (0, 2):
            if glider.glider_layers()[module].glider_spans["default"][row_expert] is not None:
                expected_row_expert.append(row_expert)
        if len(expected_row_expert) < 2:
            continue
        for indices in calls:  # (rows, tokens, 1); rows = 2 (encoder, prefill) or 6 (beams)
            half = indices.shape[0] // 2
            assert (indices[:half, :, 0] == 0).all() and (indices[half:, :, 0] == 2).all()
            checked += 1
    assert checked > 0
    # each row alone, with its own scores, generates exactly what it generated in the batch
    for row in range(2):
        with torch.no_grad(), glider.global_scores(scores[row : row + 1]):
            alone = model.generate(input_ids=ids[row : row + 1], **kwargs)
        assert torch.equal(alone, batched[2 * row : 2 * row + 2])


def test_generate_greedy_with_cache_equals_without_cache(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    model.base_model.set_gates(random_gates(model.base_model))
    ids = input_ids(batch=2)
    with torch.no_grad(), model.base_model.global_scores(torch.rand(2, 4)):
        cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_merge_raises_unload_and_disable_give_base(llama_experts):
    ids = input_ids()
    base_logits = forward_logits(tiny_llama(), ids)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    model.base_model.set_gates(random_gates(model.base_model))
    assert (forward_logits(model, ids) - base_logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(forward_logits(model, ids), base_logits, atol=0, rtol=0)
    unloaded = model.unload()
    assert not any("glider" in name for name, _ in unloaded.named_modules())
    torch.testing.assert_close(forward_logits(unloaded, ids), base_logits, atol=0, rtol=0)


def test_add_and_delete_adapter(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts[:2]))
    model.add_adapter("other", GliderConfig(experts=llama_experts[2:], top_k=1))
    glider = model.base_model
    assert glider.routing_state("other").top_k == 1
    model.set_adapter("other")
    assert glider.expert_names == [f"expert{i}" for i in (2, 3)]
    glider.set_instruction_embeddings(torch.randn(2, 3), adapter_name="other")
    model.delete_adapter("other")
    assert "other" not in glider.peft_config
    assert "other" not in glider.glider_instruction_embeddings
    with pytest.raises(ValueError, match="No Glider adapter named 'other'"):
        glider.routing_state("other")
    for layer in glider.glider_layers().values():
        assert "other" not in layer.glider_gates and "other" not in layer.glider_routing
    assert glider.expert_names == ["expert0", "expert1"]


def test_only_gates_are_trainable(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("glider_gates" in name for name in trainable)


def test_bfloat16_base_keeps_expert_dtype(llama_experts):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), GliderConfig(experts=llama_experts))
    layer = next(iter(model.base_model.glider_layers().values()))
    assert layer.glider_A["default"].dtype == torch.bfloat16
    assert layer.glider_gates["default"].dtype == torch.float32
    assert forward_logits(model, input_ids()).dtype == torch.bfloat16


def test_expert_metadata_is_pinned_in_config(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    entries = model.peft_config["default"].experts
    assert [e["layout"]["model.layers.0.self_attn.q_proj"][0] for e in entries] == [2, 4, 8, 3]
    assert entries[2]["layout"]["model.layers.0.self_attn.q_proj"][1] == pytest.approx(8 / 8**0.5)  # rsLoRA
    assert entries[1]["layout"]["model.layers.0.self_attn.q_proj"][1] == pytest.approx(16 / 4)
    assert all(len(e["sha256"]) == 64 for e in entries)
    assert "model.layers.1.mlp.up_proj" in model.peft_config["default"].target_modules


def test_pickle_checkpoint_experts_load_like_safetensors_ones(tmp_path):
    """Experts saved as adapter_model.bin go through PEFT's loader; safetensors ones are read lazily: same model."""
    from peft import LoraConfig

    torch.manual_seed(9)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "st")
    lora.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    ids = input_ids()
    outputs, hashes = [], []
    for folder in ("st", "bin"):
        model = get_peft_model(tiny_llama(), GliderConfig(experts=[str(tmp_path / folder)], top_k=1))
        outputs.append(forward_logits(model, ids))
        hashes.append(model.peft_config["default"].experts[0]["sha256"])
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert hashes[0] == hashes[1]
