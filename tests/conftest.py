"""Fixtures: tiny Llama-like and T5 models built from configs, LoRA experts created on the fly."""

from __future__ import annotations

import os

from hub_server import TOKEN, HubServer

# Before any Hugging Face import: the Hub is never contacted by the tests. Offline by default; the `hub` fixture
# goes online against a loopback server speaking the Hub's API, named here since huggingface_hub reads
# HF_ENDPOINT once, when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
HUB = HubServer()
os.environ["HF_ENDPOINT"] = HUB.start()
os.environ["HF_HUB_DISABLE_XET"] = "1"

from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

import peft_glider  # noqa: F401  (registers GLIDER)
from peft_glider.global_router import Embedder

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T5_MODULES = ["q", "k", "v", "o", "wi", "wo"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=97,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


MODEL_FACTORIES: dict[str, Callable[..., torch.nn.Module]] = {"llama": tiny_llama, "t5": tiny_t5}


def make_expert(
    factory: Callable[..., torch.nn.Module],
    path: Path,
    seed: int,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    lora_alpha: int = 8,
    use_rslora: bool = False,
    scale: float = 1.0,
    dominant: float = 1.0,
) -> str:
    """Save a LoRA adapter with random, non-zero A and B (scaled by `scale`) to `path`; return the path.

    `dominant` > 1 multiplies the first rank component, which gives `B A` a clear top singular value.
    """
    model = factory()
    lora = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), use_rslora=use_rslora,
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale / (param.shape[-1] ** 0.5))
                if "lora_A" in name:
                    param[0] *= dominant
                elif "lora_B" in name:
                    param[:, 0] *= dominant
    peft_model.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def llama_experts(tmp_path: Path) -> list[str]:
    """Four Llama experts with mixed ranks, rsLoRA, different lora_alpha and different module sets."""
    specs = [
        dict(r=2, target_modules=["q_proj", "v_proj"]),
        dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=16),
        dict(r=8, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
        dict(r=3, target_modules=LLAMA_MODULES),
    ]
    return [make_expert(tiny_llama, tmp_path / f"expert{i}", seed=100 + i, **spec) for i, spec in enumerate(specs)]


@pytest.fixture
def t5_experts(tmp_path: Path) -> list[str]:
    specs = [dict(r=2, target_modules=["q", "v"]), dict(r=4, target_modules=["q", "v", "wo"]), dict(r=3, target_modules=T5_MODULES)]
    return [make_expert(tiny_t5, tmp_path / f"t5expert{i}", seed=200 + i, **spec) for i, spec in enumerate(specs)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def random_gates(glider, seed: int = 0, scale: float = 1.0) -> dict:
    """Random gate vectors for every (expert, module) the experts adapt."""
    generator = torch.Generator().manual_seed(seed)
    return {
        expert: {module: torch.randn(gate.shape, generator=generator) * scale for module, gate in per_module.items()}
        for expert, per_module in glider.get_gates().items()
    }


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, length), generator=generator)


def tiny_chat_model():
    """A one-layer Llama with a word-level tokenizer (words `w0`..`w59`) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config), tokenizer


class LetterEmbedder(Embedder):
    """A deterministic, dependency-free embedder: normalized letter counts (enough to tell tasks apart)."""

    name = "test/letters"
    dim = 26

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for char in text.lower():
                if "a" <= char <= "z":
                    vectors[row, ord(char) - 97] += 1
        return torch.nn.functional.normalize(vectors + 1e-3, dim=-1)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubServer:
    """The loopback Hub, emptied, with the client online, authenticated and caching under `tmp_path/hub-cache`."""
    import huggingface_hub.constants as hub_constants

    HUB.reset()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return HUB
