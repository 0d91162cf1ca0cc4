"""Quickstart: route a tiny Llama among three LoRA experts with GLIDER (offline, CPU, a few seconds).

Builds a tiny model from a config, creates three LoRA experts on the fly, wraps them in a Glider adapter, and
prints which experts the tokens of two prompts are routed to: first by the local routers alone, then with
per-row global scores that point each prompt at a different expert.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_glider  # noqa: F401  registers the GLIDER method with PEFT
from peft_glider import GliderConfig


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def make_expert(folder: Path, seed: int, rank: int) -> str:
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    get_peft_model(tiny_llama(), lora).save_pretrained(folder)
    return str(folder)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="glider-quickstart-"))
    experts = [make_expert(workdir / name, seed, rank) for seed, (name, rank) in
               enumerate([("math", 4), ("code", 8), ("chat", 2)])]
    with warnings.catch_warnings():  # these demo experts carry no trained gates: stand-ins are set below
        warnings.filterwarnings("ignore", message=r"Experts .* carry no trained gates")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=2, alpha=100.0))
    glider = model.base_model
    print(f"experts: {glider.expert_names}; adapted modules: {len(glider.glider_layers())}")

    # stand-in gate vectors (the local-router training fills these from each expert's data)
    generator = torch.Generator().manual_seed(0)
    glider.set_gates({expert: {module: torch.randn(gate.shape, generator=generator) for module, gate in gates.items()}
                      for expert, gates in glider.get_gates().items()})

    prompts = torch.randint(3, 128, (2, 12), generator=generator)
    mask = torch.ones_like(prompts)
    with torch.no_grad(), glider.routing_trace() as trace:
        model(input_ids=prompts, attention_mask=mask)
    print("local routing only, first-choice tokens per expert:", dict(zip(glider.expert_names,
          trace.counts(first_choice_only=True).tolist())))

    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # row 0 looks like "math", row 1 like "chat"
    with torch.no_grad(), glider.global_scores(scores), glider.routing_trace() as trace:
        output = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    print("with global scores, first-choice tokens per expert:", dict(zip(glider.expert_names,
          trace.counts(first_choice_only=True).tolist())))
    print("generated:", output[:, prompts.shape[1]:].tolist())

    model.save_pretrained(workdir / "glider")
    reloaded = PeftModel.from_pretrained(tiny_llama(), workdir / "glider")
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=prompts).logits, model(input_ids=prompts).logits)
    print(f"saved to {workdir / 'glider'}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
