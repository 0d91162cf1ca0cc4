"""Glider under `torch.compile` against eager: a one-token forward of 4 rows and a 4 x 128 prefill, E=8, tiny
Llama hidden 512 with LoRA r=8 on all linear modules (benchmarks/speed.py's model), global scores set; the base
model eager and compiled for scale. Prints best-of-5 times, the first compiled call's time and the largest logit
difference between compiled and eager.

    python benchmarks/compile.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402


def best_ms(fn, calls: int) -> float:
    """Best of 5 rounds of `calls` calls, in milliseconds per call (after one warm-up call)."""
    fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return min(rounds)


def main() -> None:
    torch.set_num_threads(2)
    spec = speed.MODELS["llama512"]
    folder = Path(tempfile.mkdtemp())
    paths = speed.make_experts(spec, 8, folder)
    base = speed.build_base(spec)
    model = speed.get_peft_model(speed.build_base(spec), speed.GliderConfig(experts=paths, top_k=2, alpha=3.0))
    model.base_model.set_gates(speed.random_gates(model.base_model))
    generator = torch.Generator().manual_seed(0)
    step = torch.randint(3, speed.VOCAB, (4, 1), generator=generator)
    prefill = torch.randint(3, speed.VOCAB, (4, 128), generator=generator)
    scores = torch.rand(4, 8, generator=generator)
    results = {}
    with torch.inference_mode():
        results["base eager, one-token forward ms"] = best_ms(lambda: base(input_ids=step, use_cache=False), 30)
        compiled_base = torch.compile(base)
        results["base compiled, one-token forward ms"] = best_ms(lambda: compiled_base(input_ids=step, use_cache=False), 30)
        with model.base_model.global_scores(scores):
            results["glider eager, one-token forward ms"] = best_ms(lambda: model(input_ids=step, use_cache=False), 30)
            results["glider eager, prefill ms"] = best_ms(lambda: model(input_ids=prefill, use_cache=False), 3)
            compiled = torch.compile(model)
            start = time.perf_counter()
            compiled(input_ids=step, use_cache=False)
            results["glider compiled, first call s"] = time.perf_counter() - start
            results["glider compiled, one-token forward ms"] = best_ms(lambda: compiled(input_ids=step, use_cache=False), 30)
            results["glider compiled, prefill ms"] = best_ms(lambda: compiled(input_ids=prefill, use_cache=False), 3)
            difference = compiled(input_ids=prefill, use_cache=False).logits - model(input_ids=prefill, use_cache=False).logits
            results["max |compiled - eager| logit"] = float(difference.abs().max())
    for name, value in results.items():
        print(f"{name:>40}: {value:.4g}")


if __name__ == "__main__":
    main()
