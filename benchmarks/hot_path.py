"""Where a decoding step's time goes, E=8, on benchmarks/speed.py's tiny Llama (hidden 512, 4 layers, LoRA r=8 on
all linear modules), global scores set, one row of one token, 2 threads.

Per adapted module (q_proj 512 -> 512 and up_proj 512 -> 2048 of the first layer), best of 5 x 5000 calls: the
base layer; the Glider layer; the compiled routing call alone (bound once, as a call's later forwards use it), and
the same call right after the base layer, whose weights have just streamed through the caches; what Glider adds
beyond that call is Python. Then one decoding step of the whole model (KV cache of a 64-token prompt) for the base
model, one unmerged LoRA and Glider, interleaved, with ratios to the base model (median of 5 rounds).

    python benchmarks/hot_path.py        # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402
from compile import best_ms  # noqa: E402

from peft_glider import kernels  # noqa: E402
from peft_glider.layer import GliderLinear  # noqa: E402

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")


def best_us(fn: Callable[[], object], calls: int = 5000) -> float:
    """Best of 5 rounds of `calls` calls, microseconds per call."""
    return best_ms(fn, calls) * 1e3


def module_costs(model, scores: torch.Tensor) -> None:
    glider = model.base_model
    layers = {name: layer for name, layer in glider.glider_layers().items() if name in MODULES}
    header = ("base", "glider", "added", "C alone", "C after base", "Python")
    print(f"{'module':34s} " + " ".join(f"{name:>12s}" for name in header))
    with torch.no_grad(), glider.global_scores(scores):
        for name, layer in layers.items():
            state = layer.glider_routing["default"]
            call = state.current_call()
            snapshot = layer.snapshot_in(call.version, "default")
            bias = call.global_bias(1, torch.device("cpu"))
            bound = kernels.bind_native_routing(snapshot.router_rows(state), True, bias, snapshot.k, snapshot.bank)
            x = torch.randn(1, 1, layer.in_features)
            u, out = x.view(1, -1), torch.zeros(1, layer.out_features)
            base = best_us(lambda: layer.base_layer(x))
            routed = best_us(lambda: layer(x))
            alone = best_us(lambda: bound(u, out, selection=False))
            after_base = best_us(lambda: (layer.base_layer(x), bound(u, out, selection=False))) - base
            added = routed - base
            values = (base, routed, added, alone, after_base, added - after_base)
            print(f"{name:34s} " + " ".join(f"{value:12.1f}" for value in values))


def decode_step_ratios(variants: dict, scores: torch.Tensor, prompt: torch.Tensor) -> None:
    token = torch.tensor([[5]])

    def routing(name: str) -> contextlib.AbstractContextManager:
        return variants[name].base_model.global_scores(scores) if name == "glider" else contextlib.nullcontext()

    with torch.no_grad():
        caches = {}
        for name, model in variants.items():
            with routing(name):
                caches[name] = model(input_ids=prompt, use_cache=True).cache

        def step_us(name: str) -> float:
            model, cache = variants[name], caches[name]
            with routing(name):
                start = time.perf_counter()
                for _ in range(200):
                    model(input_ids=token, cache=cache, use_cache=True)
                    cache.crop(-1)  # back to the prompt: every step sees the same cache length
                return (time.perf_counter() - start) / 200 * 1e6

        rounds = [{name: step_us(name) for name in variants} for _ in range(5)]
    for name in variants:
        median = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["base"] for r in rounds)
        print(f"one decoding step, {name:14s} {median:8.0f} us  ratio {ratio:.3f}")


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = speed.MODELS["llama512"]
    paths = speed.make_experts(spec, 8, Path(tempfile.mkdtemp()))
    glider_model = speed.get_peft_model(speed.build_base(spec), speed.GliderConfig(experts=paths, top_k=2, alpha=3.0))
    glider_model.base_model.set_gates(speed.random_gates(glider_model.base_model))
    scores = torch.rand(1, 8, generator=torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, E=8, one token\n")
    module_costs(glider_model, scores)
    print()
    variants = {
        "base": speed.build_base(spec),
        "lora_unmerged": speed.PeftModel.from_pretrained(speed.build_base(spec), paths[0]),
        "glider": glider_model,
    }
    prompt = torch.randint(3, speed.VOCAB, (1, 64), generator=torch.Generator().manual_seed(3))
    decode_step_ratios(variants, scores, prompt)


if __name__ == "__main__":
    main()
