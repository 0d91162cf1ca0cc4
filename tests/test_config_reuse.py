"""Configs are inputs: building twice from one config, from a saved adapter's config, or adding an adapter with a
used config gives the experts of a fresh build (or a clear refusal); and PEFT's conventions hold."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import input_ids, random_gates, tiny_llama
from peft import PeftConfig, PeftModel, get_peft_model

from peft_glider import GliderConfig, save_gates


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def test_one_config_builds_identical_models_and_only_gains_its_pins(llama_experts):
    config = GliderConfig(experts=llama_experts, top_k=2)
    first = get_peft_model(tiny_llama(), config)
    assert first.peft_config["default"] is config  # PEFT's convention: the model keeps the config it was given
    pinned = [dict(entry) for entry in config.experts]
    assert all({"commit", "sha256", "layout"} <= set(entry) for entry in pinned)
    second = get_peft_model(tiny_llama(), config)  # a pinned config: the same experts, from their sources
    assert [dict(entry) for entry in config.experts] == pinned
    fresh = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    torch.testing.assert_close(logits(second), logits(fresh), atol=0, rtol=0)
    torch.testing.assert_close(logits(first), logits(fresh), atol=0, rtol=0)
    assert (logits(fresh) - logits(tiny_llama())).abs().max() > 1e-4  # the experts are really there


def test_a_used_config_on_another_base_equals_a_fresh_build(llama_experts):
    config = GliderConfig(experts=llama_experts)
    get_peft_model(tiny_llama(), config)
    other = get_peft_model(tiny_llama(seed=1), config)
    fresh = get_peft_model(tiny_llama(seed=1), GliderConfig(experts=llama_experts))
    torch.testing.assert_close(logits(other), logits(fresh), atol=0, rtol=0)


def test_add_adapter_with_a_used_config_equals_the_first_adapter(llama_experts):
    config = GliderConfig(experts=llama_experts)
    model = get_peft_model(tiny_llama(), config)
    expected = logits(model)
    model.add_adapter("b", config)
    model.set_adapter("b")
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    assert model.peft_config["b"] is not model.peft_config["default"]


def test_a_saved_self_contained_config_without_its_checkpoint_loads_its_experts_from_their_sources(tmp_path, llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    model.save_pretrained(tmp_path / "glider")
    rebuilt = get_peft_model(tiny_llama(), PeftConfig.from_pretrained(tmp_path / "glider"))
    torch.testing.assert_close(logits(rebuilt), logits(model), atol=0, rtol=0)
    with torch.no_grad():  # generate goes through the same PEFT hook
        get_peft_model(tiny_llama(), PeftConfig.from_pretrained(tmp_path / "glider")).generate(
            input_ids=input_ids(), max_new_tokens=2, do_sample=False
        )
    # the normal path fills the placeholders from the checkpoint, without the sources
    for folder in llama_experts:
        shutil.rmtree(folder)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider")
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    orphan = get_peft_model(tiny_llama(), PeftConfig.from_pretrained(tmp_path / "glider"))
    with pytest.raises(RuntimeError, match="checkpoint was never loaded and its experts could not be loaded"):
        logits(orphan)


def test_a_saved_router_only_config_rebuilds_the_fresh_model_with_shipped_gates(tmp_path, llama_experts):
    probe = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    for expert, (folder, gates) in zip(probe.base_model.expert_names, zip(llama_experts, random_gates(probe.base_model, seed=7).values())):
        save_gates(gates, folder)  # each expert ships its trained gates
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, save_expert_weights=False))
    model.save_pretrained(tmp_path / "glider")
    rebuilt = get_peft_model(tiny_llama(), PeftConfig.from_pretrained(tmp_path / "glider"))
    torch.testing.assert_close(logits(rebuilt), logits(model), atol=0, rtol=0)
    assert (logits(model) - logits(probe)).abs().max() > 1e-4  # the shipped gates change the routing


def test_autocast_adapter_dtype_decides_the_gates_dtype(llama_experts, tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    default = get_peft_model(base, GliderConfig(experts=llama_experts))
    layer = next(iter(default.base_model.glider_layers().values()))
    assert layer.glider_gates["default"].dtype == torch.float32 and layer.glider_A["default"].dtype == torch.bfloat16
    kept = get_peft_model(tiny_llama().to(torch.bfloat16), GliderConfig(experts=llama_experts), autocast_adapter_dtype=False)
    layer = next(iter(kept.base_model.glider_layers().values()))
    assert layer.glider_gates["default"].dtype == torch.bfloat16 and layer.glider_A["default"].dtype == torch.bfloat16
    assert logits(kept).dtype == torch.bfloat16
    kept.save_pretrained(tmp_path / "glider")
    loaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path / "glider", autocast_adapter_dtype=False)
    assert next(iter(loaded.base_model.glider_layers().values())).glider_gates["default"].dtype == torch.bfloat16


def test_loading_a_second_glider_adapter_warns_about_nothing_peft_does_not(tmp_path, llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts[:2]))
    model.base_model.set_gates(random_gates(model.base_model, seed=1))
    model.save_pretrained(tmp_path / "glider")
    target = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts[2:]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_adapter(str(tmp_path / "glider"), adapter_name="second")
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    target.set_adapter("second")
    torch.testing.assert_close(logits(target), logits(model), atol=0, rtol=0)


def ship_gates(glider, folders, which, seed: int = 7) -> None:
    """Save random trained gates beside the experts at the positions in `which`."""
    gates = list(random_gates(glider, seed=seed).values())
    for index in which:
        save_gates(gates[index], folders[index])


@pytest.mark.parametrize("shipped", ["all", "some", "none"])
@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
def test_a_config_reused_for_another_model_and_another_adapter_builds_what_a_fresh_config_builds(
    llama_experts, router, shipped
):
    """The user's config is completed when a model is built from it; a second `get_peft_model` or `add_adapter`
    with it must still install the experts' shipped gates (it installed zeros: the pinned entries were taken for
    a saved adapter's, whose checkpoint would bring the gates)."""
    probe = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    ship_gates(probe.base_model, llama_experts, {"all": [0, 1, 2, 3], "some": [1, 3], "none": []}[shipped])
    config = GliderConfig(experts=llama_experts, top_k=2, local_router=router)
    first = get_peft_model(tiny_llama(), config)
    expected = logits(get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2, local_router=router)))
    torch.testing.assert_close(logits(first), expected, atol=0, rtol=0)
    second = get_peft_model(tiny_llama(), config)
    torch.testing.assert_close(logits(second), expected, atol=0, rtol=0)
    torch.testing.assert_close(second.base_model.get_gates(), first.base_model.get_gates(), atol=0, rtol=0)
    first.add_adapter("again", config)
    first.set_adapter("again")
    torch.testing.assert_close(logits(first), expected, atol=0, rtol=0)
    if router == "phatgoose" and shipped != "none":
        assert (expected - logits(probe)).abs().max() > 1e-4  # the shipped gates change the routing
