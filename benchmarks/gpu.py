"""The GPU check, sized for a short loan of one GPU: one command, at most about 8 minutes.

1. The kernel and model tests on CUDA (`tests/test_triton_kernel.py`: the grouped Triton kernel against the
   float64 reference in float32/bfloat16/float16, and a Glider model through it against `concat`).
2. bf16 timings, round-robin in one process: the base model, one LoRA (unmerged), PEFT Arrow (E=8) and Glider
   with E in {8, 32, 128}, on Llama-shaped random models of hidden 2048 and 4096 (2 layers, r=16 on all 7 linear
   modules); prefill B=8 x T=512 and greedy decode B=8, +64 tokens with the KV cache. Medians of per-round
   ratios to the base model, peak GPU memory per variant, and the issue's targets checked; JSON out.

    python benchmarks/gpu.py --out gpu.json            # on the GPU machine
    python benchmarks/gpu.py --quick --out gpu.json    # hidden 2048 only, E in {8, 32}, 2 rounds

Cases that would not finish within `--budget-seconds` are skipped and listed as such, never estimated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {2048: dict(intermediate=5632, heads=16), 4096: dict(intermediate=11008, heads=32)}
RANK, TOP_K, VOCAB, LAYERS = 16, 2, 32000, 2
BATCH, PREFILL_TOKENS, PROMPT_TOKENS, NEW_TOKENS = 8, 512, 32, 64
TARGETS = {  # (hidden, variant, workload) -> the most a ratio to base may be
    (4096, "glider_e8", "prefill"): 1.10, (4096, "glider_e32", "prefill"): 1.15, (4096, "glider_e128", "prefill"): 1.3,
    (4096, "glider_e8", "decode"): 1.3, (4096, "glider_e32", "decode"): 1.3,
}


def run_cuda_tests() -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_triton_kernel.py",
                             "tests/test_reference.py"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    print(f"tests on CUDA: {tail} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"returncode": result.returncode, "summary": tail}


def build_base(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = SHAPES[hidden]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=shape["intermediate"],
                         num_hidden_layers=LAYERS, num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=PREFILL_TOKENS + NEW_TOKENS)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def make_experts(hidden: int, count: int, folder: Path) -> list[str]:
    """`count` random rank-16 LoRA experts on all 7 modules, saved as PEFT adapters."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_base(hidden), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLAMA_MODULES,
                                                          init_lora_weights=False))
    generator = torch.Generator(device="cuda").manual_seed(1)
    paths = []
    for index in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator, device="cuda") * 0.02)
        path = folder / f"expert{index}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def variants(hidden: int, paths: list[str], sizes: list[int]) -> dict:
    """name -> (model, how to enter its routing)."""
    import contextlib

    from peft import ArrowConfig, PeftModel, create_arrow_model, get_peft_model

    import peft_glider  # noqa: F401
    from peft_glider import GliderConfig

    built = {"base": (build_base(hidden), contextlib.nullcontext),
             "lora": (PeftModel.from_pretrained(build_base(hidden), paths[0]).eval(), contextlib.nullcontext),
             "arrow_e8": (create_arrow_model(build_base(hidden), paths[:8], ArrowConfig(top_k=TOP_K, rng_seed=0)).eval(),
                          contextlib.nullcontext)}
    for size in sizes:
        model = get_peft_model(build_base(hidden), GliderConfig(experts=paths[:size], top_k=TOP_K, alpha=3.0)).eval()
        glider = model.base_model
        generator = torch.Generator().manual_seed(2)
        glider.set_gates({e: {m: torch.randn(g.shape, generator=generator) for m, g in per.items()}
                          for e, per in glider.get_gates().items()})
        scores = torch.rand(BATCH, size, generator=generator)
        built[f"glider_e{size}"] = (model, lambda glider=glider, scores=scores: glider.global_scores(scores))
    return built


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_hidden(hidden: int, sizes: list[int], rounds: int, deadline: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = make_experts(hidden, max(sizes), Path(folder))
        built = variants(hidden, paths, sizes)
        setup_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(3)
    prefill_ids = torch.randint(3, VOCAB, (BATCH, PREFILL_TOKENS), generator=generator).cuda()
    prompt = torch.randint(3, VOCAB, (BATCH, PROMPT_TOKENS), generator=generator).cuda()
    workloads = {
        "prefill": lambda model: model(input_ids=prefill_ids),
        "decode": lambda model: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                               pad_token_id=0),
    }
    times = {(name, w): [] for name in built for w in workloads}
    peaks = {name: 0 for name in built}
    completed = 0
    with torch.inference_mode():
        for name, (model, routing) in built.items():  # warm-up (Triton compiles its kernels here)
            with routing():
                for fn in workloads.values():
                    fn(model)
        for _ in range(rounds):
            if time.perf_counter() > deadline:
                break
            for name, (model, routing) in built.items():
                torch.cuda.reset_peak_memory_stats()
                with routing():
                    for workload, fn in workloads.items():
                        times[(name, workload)].append(timed(lambda: fn(model)))
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
            completed += 1
    result = {"hidden": hidden, "rounds": completed, "setup_seconds": setup_seconds, "variants": {}}
    for name in built:
        entry = {"peak_memory_mib": peaks[name] / 2**20}
        for workload in workloads:
            samples, base = times[(name, workload)], times[("base", workload)]
            entry[f"{workload}_median_ms"] = 1e3 * statistics.median(samples) if samples else None
            entry[f"{workload}_ratio_to_base"] = (
                statistics.median(s / b for s, b in zip(samples, base)) if samples else None
            )
        result["variants"][name] = entry
        print(f"  hidden {hidden} {name:>12}: " + "  ".join(
            f"{w} {entry[f'{w}_median_ms']:.1f} ms ({entry[f'{w}_ratio_to_base']:.2f}x)" for w in workloads
            if entry[f"{w}_median_ms"] is not None) + f"  peak {entry['peak_memory_mib']:.0f} MiB", flush=True)
    return result


def check_targets(results: list[dict]) -> dict:
    checks = {}
    for result in results:
        variants_ = result["variants"]
        for (hidden, name, workload), limit in TARGETS.items():
            if hidden == result["hidden"] and name in variants_:
                ratio = variants_[name][f"{workload}_ratio_to_base"]
                checks[f"{name} {workload} (hidden {hidden}) <= {limit}x"] = ratio is not None and ratio <= limit
        for workload in ("prefill", "decode"):
            if {"glider_e8", "arrow_e8"} <= set(variants_):
                glider = variants_["glider_e8"][f"{workload}_median_ms"]
                arrow = variants_["arrow_e8"][f"{workload}_median_ms"]
                checks[f"glider_e8 <= 0.3x arrow_e8, {workload} (hidden {result['hidden']})"] = bool(
                    glider and arrow and glider <= 0.3 * arrow)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-benchmark.json")
    parser.add_argument("--quick", action="store_true", help="hidden 2048 only, E in {8, 32}, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU.")
    start = time.perf_counter()
    deadline = start + args.budget_seconds
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16"}
    report["tests"] = None if args.skip_tests else run_cuda_tests()
    hiddens, sizes, rounds = ([2048], [8, 32], 2) if args.quick else ([2048, 4096], [8, 32, 128], args.rounds)
    report["results"], report["skipped"] = [], []
    for hidden in hiddens:
        if time.perf_counter() > deadline:
            report["skipped"].append(f"hidden {hidden}: out of time budget")
            continue
        report["results"].append(bench_hidden(hidden, sizes, rounds, deadline))
        torch.cuda.empty_cache()
    report["targets"] = check_targets(report["results"])
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2))
    for check, met in report["targets"].items():
        print(f"{'met' if met else 'MISSED'}: {check}")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
