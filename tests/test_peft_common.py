"""PEFT's own generic checks (`PeftCommonTester`, from the installed peft version's source distribution) run
against Glider adapters: tiny Llama and tiny T5, each with the Phatgoose and the Arrow local router.

The source distribution is fetched from the package registry once and cached (`$PEFT_GLIDER_CACHE/upstream-tests`,
default `~/.cache/peft_glider`); only if the registry cannot be reached is the module skipped, saying so.

Checks of `PeftCommonTester` that do not apply to Glider, and why:
- merging (`_test_merge_layers`, `_test_merge_layers_multi`, `_test_merge_layers_fp16`, `_test_merge_layers_nan`,
  `_test_merge_layers_is_idempotent`, `_test_safe_merge`): every token picks its own experts, so there is no weight
  delta to merge; Glider raises a clear error instead (tested in test_model.py).
- `_test_mixed_adapter_batches`, `_test_generate_with_mixed_adapter_batches_and_beam_search`: PEFT's per-sample
  `adapter_names` exists for LoRA-family layers only (upstream skips them for other methods); Glider routes each
  row by its own global scores instead.
- `_test_weighted_combination_of_adapters`, `_test_lora_conversion`, `_test_adding_multiple_adapters_with_bias_raises`:
  LoRA/IA3 operations (adapter arithmetic, conversion to LoRA, LoRA bias).
- `_test_training_prompt_learning_tasks`: prompt learning only.
- `_test_training_layer_indexing`: needs `layers_to_transform` (upstream skips methods without it); Glider adapts
  the modules its experts adapt.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_expert, tiny_llama, tiny_t5
from test_lora_variants import peft_expert
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peft_glider import GliderConfig, save_gates

PEFT_VERSION = importlib.metadata.version("peft")
UPSTREAM_FILES = ("testing_common.py", "testing_utils.py")

#: The checks that apply: test id -> (PeftCommonTester method, its arguments beyond model_id, config_cls, kwargs).
CHECKS = {
    name: (name, {})
    for name in (
        "_test_model_attr", "_test_adapter_name", "_test_prepare_for_training", "_test_save_pretrained",
        "_test_save_pretrained_selected_adapters", "_test_save_pretrained_adapter_name_substring",
        "_test_from_pretrained_config_construction", "_test_load_multiple_adapters",
        "_test_load_model_low_cpu_mem_usage", "_test_generate", "_test_generate_half_prec", "_test_inference_safetensors",
        "_test_unload_adapter", "_test_get_base_model_state_dict", "_test_training", "_test_training_gradient_checkpointing",
        "_test_disable_adapter", "_test_delete_adapter", "_test_delete_inactive_adapter", "_test_peft_model_device_map",
    )
}
CHECKS.update({
    "_test_save_pretrained[pickle]": ("_test_save_pretrained", {"safe_serialization": False}),
    "_test_save_pretrained_selected_adapters[pickle]": ("_test_save_pretrained_selected_adapters", {"safe_serialization": False}),
    "_test_add_adapter_no_autocast_adapter_dtype[bf16]": ("_test_add_adapter_no_autocast_adapter_dtype", {"dtype": torch.bfloat16}),
    "_test_add_adapter_no_autocast_adapter_dtype[fp16]": ("_test_add_adapter_no_autocast_adapter_dtype", {"dtype": torch.float16}),
    "_test_generate_pos_args": ("_test_generate_pos_args", {"raises_err": False}),
})


def _upstream_cache() -> Path:
    root = Path(os.environ.get("PEFT_GLIDER_CACHE", Path.home() / ".cache" / "peft_glider"))
    return root / "upstream-tests" / f"peft-{PEFT_VERSION}"


def _fetch_upstream_tests(cache: Path) -> None:
    """Download peft's source distribution and keep its generic test helpers as the package `peft_upstream_tests`."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--disable-pip-version-check", "-d", download, f"peft=={PEFT_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        archives = list(Path(download).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not archives:
            pytest.skip(f"peft {PEFT_VERSION}'s source distribution could not be fetched from the package registry "
                        f"(PeftCommonTester lives there): {result.stderr.strip()[-300:]}")
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        package = partial / "peft_upstream_tests"
        package.mkdir(parents=True)
        with tarfile.open(archives[0]) as archive:
            for name in UPSTREAM_FILES:
                member = archive.getmember(f"peft-{PEFT_VERSION}/tests/{name}")
                (package / name).write_bytes(archive.extractfile(member).read())
        (package / "__init__.py").write_text("")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(partial, cache)  # all or nothing


@pytest.fixture(scope="module")
def common_tester() -> type:
    cache = _upstream_cache()
    if not all((cache / "peft_upstream_tests" / name).exists() for name in UPSTREAM_FILES):
        _fetch_upstream_tests(cache)
    if importlib.util.find_spec("diffusers") is None:  # imported at the top of testing_common, used by SD tests only
        sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
    sys.path.insert(0, str(cache))
    try:
        return importlib.import_module("peft_upstream_tests.testing_common").PeftCommonTester
    finally:
        sys.path.remove(str(cache))


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """Saved tiny base models (loaded by path, as upstream loads Hub ids) and LoRA experts for them."""
    root = tmp_path_factory.mktemp("peft-common")
    made = {}
    for arch, factory, auto, modules in [("llama", tiny_llama, AutoModelForCausalLM, [["q_proj", "v_proj"], ["q_proj", "down_proj"], ["v_proj", "up_proj"]]),
                                         ("t5", tiny_t5, AutoModelForSeq2SeqLM, [["q", "v"], ["q", "wo"], ["v", "wi"]])]:
        factory().save_pretrained(root / arch)
        experts = [make_expert(factory, root / f"{arch}-expert{i}", seed=300 + i, target_modules=m) for i, m in enumerate(modules)]
        shipping = [shutil.copytree(folder, f"{folder}-gated") for folder in experts]
        for folder in shipping[::2]:  # a mixed library: experts 0 and 2 ship trained gates, expert 1 none
            gates = {name: torch.randn(factors.shape[1]) for name, factors in load_file(f"{folder}/adapter_model.safetensors").items()
                     if "lora_A" in name}
            save_gates({name.removeprefix("base_model.model.").split(".lora_A")[0]: gate for name, gate in gates.items()}, folder)
        made[arch] = (str(root / arch), auto, experts)
        made[f"{arch}-gated"] = (str(root / arch), auto, shipping)
        made[f"{arch}-dora"] = (str(root / arch), auto, [  # DoRA and a biased B beside a plain LoRA
            peft_expert(root / f"{arch}-dora", arch, seed=310, target_modules=modules[0], use_dora=True),
            experts[1],
            peft_expert(root / f"{arch}-bias", arch, seed=311, target_modules=modules[2], lora_bias=True),
        ])
    return made


#: Config variants: each local router with every expert resident, and Phatgoose under a resident-experts budget
#: (a router-only adapter whose layers start empty and read every expert on the first call: the suite's calls carry
#: no global scores, so the budget holds the whole library).
VARIANTS = {
    "phatgoose": {"local_router": "phatgoose"},
    "arrow": {"local_router": "arrow"},
    "phatgoose-budget": {"local_router": "phatgoose", "max_resident_experts": 3},
    "phatgoose-shipped": {"local_router": "phatgoose"},  # experts that ship gates beside ones that do not
    "phatgoose-dora": {"local_router": "phatgoose"},  # a DoRA expert and a biased one beside a plain LoRA
}
#: The variants whose experts are not the plain ones: the suffix of their case in `cases`.
VARIANT_EXPERTS = {"phatgoose-shipped": "gated", "phatgoose-dora": "dora"}


def variant_case(cases: dict, arch: str, variant: str) -> tuple:
    return cases[f"{arch}-{VARIANT_EXPERTS[variant]}" if variant in VARIANT_EXPERTS else arch]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_peft_generic_check(common_tester, cases, arch, variant, check):
    model_id, auto_class, experts = variant_case(cases, arch, variant)

    class GliderCommonTester(common_tester):
        transformers_class = auto_class
        torch_device = "cpu"

        def prepare_inputs_for_testing(self):
            inputs = {"input_ids": torch.tensor([[3, 4, 5], [3, 6, 5]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}
            if arch == "t5":
                inputs["decoder_input_ids"] = torch.tensor([[0, 4, 7], [0, 8, 9]])
            return inputs

    config_kwargs = {"experts": experts, "top_k": 2, **VARIANTS[variant]}
    method, arguments = CHECKS[check]
    getattr(GliderCommonTester(), method)(model_id, GliderConfig, config_kwargs, **arguments)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_one_config_reused_builds_what_a_fresh_config_builds(cases, arch, variant):
    """PEFT's tuners tolerate a config object used again (for another base model, or another adapter); the
    generic checks always make a new one, so the reuse is checked here, for every variant."""
    model_id, auto_class, experts = variant_case(cases, arch, variant)
    inputs = {"input_ids": torch.tensor([[3, 4, 5], [3, 6, 5]])}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 4, 7], [0, 8, 9]])

    def logits(model):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(**inputs).logits

    def build(config):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(auto_class.from_pretrained(model_id), config)

    kwargs = {"experts": experts, "top_k": 2, **VARIANTS[variant]}
    expected = logits(build(GliderConfig(**kwargs)))
    config = GliderConfig(**kwargs)
    first = build(config)
    assert torch.equal(logits(first), expected)
    assert torch.equal(logits(build(config)), expected)
    first.add_adapter("again", config)
    first.set_adapter("again")
    assert torch.equal(logits(first), expected)
