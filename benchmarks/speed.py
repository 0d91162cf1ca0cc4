"""Speed of Glider against the base model, one LoRA, PEFT Arrow and PEFT X-LoRA, in one process.

Each (model, E) case: build every variant, check that outputs that must agree do agree (else stop), then time
the workloads round-robin for `--rounds` rounds and report medians, the median of per-round ratios to the base
model, the ratio predicted by counting multiply-adds, peak memory (median of fresh subprocesses), load time of
the E experts, the load average and the versions. Writes the same as JSON.

    python benchmarks/speed.py                    # the default matrix (see --help); 2 CPU threads
    python benchmarks/speed.py --quick            # a few minutes: hidden 512, E=8, 3 rounds

Notes: PEFT 0.21.2's X-LoRA needs its adapters named "0", "1", ... and runs with use_cache=False (it cannot use
the KV cache); PEFT's Arrow builds one LoRA adapter per expert and computes all of them for every token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration  # noqa: E402

import peft_glider  # noqa: E402
import peft_glider.native  # noqa: E402
from peft_glider import GliderConfig, GlobalRouter, SamplesWriter  # noqa: E402

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T5_MODULES = ["q", "k", "v", "o", "wi", "wo"]
MODELS = {
    "llama512": dict(kind="llama", hidden=512, layers=4),
    "llama2048": dict(kind="llama", hidden=2048, layers=2),
    "t5": dict(kind="t5", hidden=512, layers=2),
}
RANK, TOP_K, VOCAB = 8, 2, 1000


def build_base(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if spec["kind"] == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
                             num_hidden_layers=spec["layers"], num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=512)
        return LlamaForCausalLM(config).eval()
    config = T5Config(vocab_size=VOCAB, d_model=spec["hidden"], d_kv=64, d_ff=4 * spec["hidden"], num_layers=spec["layers"],
                      num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def make_experts(spec: dict, count: int, folder: Path, use_dora: bool = False) -> list[str]:
    modules = LLAMA_MODULES if spec["kind"] == "llama" else T5_MODULES
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=modules, init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(build_base(spec), config)
    paths = []
    generator = torch.Generator().manual_seed(1)
    for index in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        path = folder / str(index)  # names "0", "1", ...: what PEFT 0.21.2's X-LoRA requires
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def random_gates(glider) -> dict:
    generator = torch.Generator().manual_seed(2)
    return {e: {m: torch.randn(g.shape, generator=generator) for m, g in per.items()} for e, per in glider.get_gates().items()}


def macs_per_token(model: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def predicted_ratios(spec: dict, base: torch.nn.Module, experts: int) -> dict[str, float]:
    """Multiply-adds per token relative to the base model's linear layers (attention scores excluded)."""
    base_macs = macs_per_token(base)
    adapted = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LLAMA_MODULES + T5_MODULES]
    lora = sum(RANK * (m.in_features + m.out_features) for m in adapted)
    router = sum(experts * m.in_features for m in adapted)
    return {
        "lora_unmerged": 1 + lora / base_macs,
        "lora_merged": 1.0,
        "glider": 1 + (TOP_K * lora + router) / base_macs,
        "arrow": 1 + (experts * lora + router) / base_macs,
        "xlora": 2 + experts * lora / base_macs,  # a scaling pass plus the dense pass over all experts
    }


def workloads(spec: dict) -> dict[str, Callable]:
    generator = torch.Generator().manual_seed(3)
    prefill_ids = torch.randint(3, VOCAB, (4, 128), generator=generator)
    prompt = torch.randint(3, VOCAB, (1, 64), generator=generator)
    decoder_ids = torch.randint(3, VOCAB, (4, 16), generator=generator)

    def prefill(model):
        if spec["kind"] == "t5":
            return model(input_ids=prefill_ids, decoder_input_ids=decoder_ids).logits
        return model(input_ids=prefill_ids).logits

    def generate(model, use_cache=True):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                              min_new_tokens=32, do_sample=False, use_cache=use_cache, pad_token_id=0)

    return {"prefill": prefill, "generate": generate}


def build_variants(spec: dict, paths: list[str], args, dora_paths: list[str] | None = None) -> tuple[dict, dict]:
    """name -> callable(workload) and load times. With `dora_paths`, also PEFT's unmerged DoRA (the first DoRA
    expert) and Glider over the DoRA experts, routed like the LoRA ones."""
    variants, info = {}, {}
    base = build_base(spec)
    variants["base"] = (base, {})
    variants["lora_unmerged"] = (PeftModel.from_pretrained(build_base(spec), paths[0]), {})
    variants["lora_merged"] = (PeftModel.from_pretrained(build_base(spec), paths[0]).merge_and_unload(), {})
    start = time.perf_counter()
    glider_model = get_peft_model(build_base(spec), GliderConfig(experts=paths, top_k=TOP_K, alpha=3.0))
    info["glider_load_seconds"] = time.perf_counter() - start
    glider_model.base_model.set_gates(random_gates(glider_model.base_model))
    variants["glider"] = (glider_model, {"scores": torch.rand(1, len(paths))})
    if dora_paths:
        variants["dora_unmerged"] = (PeftModel.from_pretrained(build_base(spec), dora_paths[0]), {})
        dora_model = get_peft_model(build_base(spec), GliderConfig(experts=dora_paths, top_k=TOP_K, alpha=3.0))
        dora_model.base_model.set_gates(random_gates(dora_model.base_model))
        variants["glider_dora"] = (dora_model, {"scores": torch.rand(1, len(paths))})
    if "e2e" in args.variants:
        router = GlobalRouter(SamplesWriter(), cache_dir=None)
        names = glider_model.base_model.expert_names
        router.describe_experts(glider_model, {n: [(f"task {n} input {i}", f"output {i}") for i in range(4)] for n in names}, calibrate=False)
        variants["glider_e2e"] = (glider_model, {"router": router})
    if "arrow" in args.variants and spec["kind"] == "llama" and len(paths) <= args.max_dense_experts:
        variants["arrow"] = (create_arrow_model(build_base(spec), paths, ArrowConfig(top_k=TOP_K, rng_seed=0)), {})
    if "xlora" in args.variants and spec["kind"] == "llama" and len(paths) <= args.max_dense_experts:
        from peft import XLoraConfig

        base_model = build_base(spec)
        base_model.config.use_cache = False
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=spec["hidden"], adapters={str(i): p for i, p in enumerate(paths)},
                             top_k_lora=TOP_K, xlora_depth=1)
        variants["xlora"] = (get_peft_model(base_model, config), {"use_cache": False})
    return variants, info


def run_variant(name: str, model, extra: dict, workload: str, fn: Callable) -> dict:
    """Run one workload once; returns timing parts (seconds)."""
    timings = {}
    start = time.perf_counter()
    if name in ("glider", "glider_dora"):
        with model.base_model.global_scores(extra["scores"]):
            fn(model) if workload == "prefill" else fn(model)
    elif name == "glider_e2e":
        prompts = ["what is the answer for task 3 input 7"] * (4 if workload == "prefill" else 1)
        with model.base_model.route(prompts, router=extra["router"]) as info:
            routed = time.perf_counter()
            fn(model)
        timings["router"] = info.llm_seconds + info.embed_seconds
        timings["llm"] = info.llm_seconds
        start = routed
    elif workload == "generate" and "use_cache" in extra:
        fn(model, use_cache=False)
    else:
        fn(model)
    timings["model"] = time.perf_counter() - start
    return timings


def check_outputs(spec: dict, paths: list[str], run: dict, dora_paths: list[str] | None = None) -> None:
    """Refuse to time variants whose outputs disagree with their references."""
    prefill = run["prefill"]
    checks = []
    with torch.inference_mode():
        lora = prefill(PeftModel.from_pretrained(build_base(spec), paths[0]))
        merged = prefill(PeftModel.from_pretrained(build_base(spec), paths[0]).merge_and_unload())
        checks += [("lora_merged", merged, lora), ("glider (1 expert, k=1)", one_expert(spec, paths[0], prefill), lora)]
        if dora_paths:
            dora = prefill(PeftModel.from_pretrained(build_base(spec), dora_paths[0]))
            checks.append(("glider (1 DoRA expert, k=1)", one_expert(spec, dora_paths[0], prefill), dora))
    for name, got, want in checks:
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise SystemExit(f"{name} differs from PEFT's unmerged adapter by {(got - want).abs().max():.2e}: not timing.")


def one_expert(spec: dict, path: str, prefill: Callable) -> torch.Tensor:
    """The prefill logits of a Glider adapter of one expert at top_k=1 (PEFT's own adapter, routed)."""
    return prefill(get_peft_model(build_base(spec), GliderConfig(experts=[path], top_k=1, alpha=0.0)))


def peak_rss_mib(model_name: str, experts: int, folder: str, variant: str) -> float:
    """Peak RSS growth of a fresh process while it builds `variant` and runs one prefill, in MiB.

    The process's peak during imports (torch, transformers) is larger than these tiny models, so the growth is
    measured from the resident size after the imports to the peak afterwards, tracked by sampling
    /proc/self/statm from a thread every millisecond.
    """
    code = (
        "import sys, os, threading, time, warnings, torch; warnings.filterwarnings('ignore'); sys.path.insert(0, %r)\n"
        "import speed; from pathlib import Path\n"
        "page = os.sysconf('SC_PAGE_SIZE'); rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "peak = [rss()]; start = peak[0]; done = []\n"
        "def watch():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.001)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "spec = speed.MODELS[%r]; run = speed.workloads(spec)\n"
        "paths = [str(Path(%r) / str(i)) for i in range(%d)]\n"
        "model = speed.build_base(spec) if %r == 'base' else speed.get_peft_model(speed.build_base(spec), speed.GliderConfig(experts=paths, top_k=2))\n"
        "with torch.inference_mode(): run['prefill'](model)\n"
        "done.append(1); time.sleep(0.01); peak[0] = max(peak[0], rss())\n"
        "print((peak[0] - start) / 2**20)\n"
    ) % (str(Path(__file__).parent), model_name, folder, experts, variant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def expert_bytes(paths: list[str]) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * 4 for p in paths for t in load_file(str(Path(p) / "adapter_model.safetensors")).values())


def bench_case(model_name: str, experts: int, args) -> dict:
    spec = MODELS[model_name]
    folder = Path(tempfile.mkdtemp(prefix=f"glider-bench-{model_name}-{experts}-"))
    paths = make_experts(spec, experts, folder)
    dora_paths = make_experts(spec, experts, folder / "dora", use_dora=True) if "dora" in args.variants else None
    run = workloads(spec)
    check_outputs(spec, paths, run, dora_paths)
    variants, info = build_variants(spec, paths, args, dora_paths)
    times: dict[tuple[str, str], list[float]] = {}
    router_times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for workload in args.workloads:
            for name, (model, extra) in variants.items():  # warm-up
                run_variant(name, model, extra, workload, run[workload])
            for _ in range(args.rounds):
                for name, (model, extra) in variants.items():
                    parts = run_variant(name, model, extra, workload, run[workload])
                    times.setdefault((workload, name), []).append(parts["model"])
                    if "router" in parts:
                        router_times.setdefault(workload, []).append(parts["router"])
    predicted = predicted_ratios(spec, variants["base"][0], experts)
    rows = []
    for (workload, name), samples in times.items():
        base = times[(workload, "base")]
        ratios = [t / b for t, b in zip(samples, base)]
        rows.append({
            "model": model_name, "experts": experts, "workload": workload, "variant": name,
            "median_s": statistics.median(samples), "ratio_to_base": statistics.median(ratios),
            "predicted_ratio": predicted.get(name.replace("_e2e", "").replace("_dora", "").replace("dora_", "lora_"), 1.0),
            "router_s": statistics.median(router_times[workload]) if name == "glider_e2e" else None,
        })
    memory = {}
    if not args.no_memory:
        samples = {"base": [], "glider": []}
        for _ in range(args.memory_repeats):  # alternating fresh processes; one sample varies by ~10-20 MiB
            for variant in samples:
                samples[variant].append(peak_rss_mib(model_name, experts, str(folder), variant))
        memory = {variant: statistics.median(values) for variant, values in samples.items()}
        memory["expert_mib"] = expert_bytes(paths) / 2**20
    return {"rows": rows, "memory_mib": memory, **info}


def print_case(case: dict) -> None:
    for row in case["rows"]:
        extra = f"  router {row['router_s'] * 1000:.0f} ms (apart)" if row["router_s"] is not None else ""
        print(f"{row['model']:>9} E={row['experts']:<4} {row['workload']:<8} {row['variant']:<14} "
              f"{row['median_s'] * 1000:9.1f} ms  ratio {row['ratio_to_base']:6.2f}  (FLOP-predicted {row['predicted_ratio']:5.2f}){extra}")
    if case["memory_mib"]:
        m = case["memory_mib"]
        print(f"          peak RSS growth (model build + one prefill): base {m['base']:.0f} MiB, glider {m['glider']:.0f} MiB, "
              f"experts {m['expert_mib']:.0f} MiB; budget (base + experts) * 1.15 = {(m['base'] + m['expert_mib']) * 1.15:.0f} MiB")
    print(f"          load time of the experts: {case['glider_load_seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama512", "llama2048", "t5"], choices=list(MODELS))
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--workloads", nargs="+", default=["prefill", "generate"], choices=["prefill", "generate"])
    parser.add_argument("--variants", nargs="+", default=["arrow", "xlora", "e2e"],
                        help="optional variants: arrow, xlora, e2e, dora (DoRA experts: PEFT's and Glider's)")
    parser.add_argument("--max-dense-experts", type=int, default=32, help="largest E for Arrow and X-LoRA")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per variant (median)")
    parser.add_argument("--quick", action="store_true", help="hidden 512, E=8, 3 rounds")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.experts, args.rounds = ["llama512"], [8], 3
    torch.set_num_threads(args.threads)
    header = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "peft_glider": peft_glider.__version__, "threads": args.threads,
        "compiled_kernel": peft_glider.native.available(),
        "cpu": platform.processor() or platform.machine(), "load_average_start": os.getloadavg(),
    }
    print(json.dumps(header))
    cases = []
    for model_name in args.models:
        for experts in args.experts:
            case = bench_case(model_name, experts, args)
            print_case(case)
            cases.append(case)
    header["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {header['load_average_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "cases": cases}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
