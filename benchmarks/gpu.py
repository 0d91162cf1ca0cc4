"""The GPU check, sized for a short loan of one GPU: one command, at most about 8 minutes.

1. The kernel and model tests on CUDA (`tests/test_triton_kernel.py`: the grouped Triton kernel against the
   float64 reference in float32/bfloat16/float16, and a Glider model through it against `concat`).
2. bf16 timings, round-robin in one process: the base model, one LoRA (unmerged), PEFT Arrow (E=8) and Glider
   with E in {8, 32, 128}, on Llama-shaped random models of hidden 2048 and 4096 (2 layers, r=16 on all 7 linear
   modules); prefill B=8 x T=512 and greedy decode B=8, +64 tokens with the KV cache. Medians of per-round
   ratios to the base model, peak GPU memory per variant, and the issue's targets checked; JSON out.

    python benchmarks/gpu.py --out gpu.json            # on the GPU machine
    python benchmarks/gpu.py --quick --out gpu.json    # hidden 2048 only, E in {8, 32}, 2 rounds
    python benchmarks/gpu.py --dry-run --out dry.json  # anywhere, in seconds: the whole script on tiny shapes

Cases that would not finish within `--budget-seconds` are skipped and listed as such, never estimated.

vLLM serving (docs/serving.md) is not measured here: the GPU machine reaches no package registry and has no vLLM.
The report's `vllm` entry says whether vLLM is importable there and what would run if it were: the vLLM tests
(`tests/test_vllm.py`) on CUDA, where the plugin moves the experts to the worker's GPU (untested: no vLLM here).

It runs from the working tree without installing the package (the repository root goes first on `sys.path`, and
the tests step gets it as PYTHONPATH), prints the versions it runs on first, and needs no compiled CPU kernel.
`--dry-run` runs every step (tests, every variant, both workloads, the JSON) on tiny shapes in float32: on CUDA
if there is one, else on CPU with the Triton kernel under Triton's interpreter (`TRITON_INTERPRET=1`, set here
before triton is imported), so a typo or an API difference of the GPU machine's versions shows here, not there.

The GPU machine reaches no package registry. If its peft is not the version this project pins, carry the pinned
wheel in the call (the wheel folder `.whl` listed in `.git/info/exclude` and in the run's `carry`):

    pip download --no-deps --only-binary=:all: --python-version 3.12 "peft==0.22.0" -d .whl   # here

and the script installs it into a scratch folder there and runs again on it (`ensure_pinned_peft`).
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
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's peft_glider, installed or not

if "--dry-run" in sys.argv and os.environ.get("TRITON_INTERPRET") is None:
    import torch  # noqa: E402 - only to ask for CUDA before triton is imported

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # run the Triton kernel on CPU, read when triton is first imported

import torch  # noqa: E402

VERSIONED = ("torch", "triton", "transformers", "accelerate", "safetensors", "sentence-transformers",
             "huggingface_hub", "peft", "numpy")

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {2048: dict(intermediate=5632, heads=16), 4096: dict(intermediate=11008, heads=32), 64: dict(intermediate=128, heads=4)}
TOP_K, LAYERS = 2, 2


class Setup:
    """Sizes, device and dtype of one run: the GPU measurement, or the dry run's tiny shapes."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bfloat16 on the GPU; the dry run in float32 (Triton's interpreter mis-multiplies bfloat16 tiles)
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        self.rank, self.vocab = (4, 128) if dry_run else (16, 32000)
        self.batch, self.prefill_tokens, self.prompt_tokens, self.new_tokens = (2, 8, 4, 2) if dry_run else (8, 512, 32, 64)
        self.arrow_experts = 4 if dry_run else 8

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def versions() -> dict:
    """What the script runs on: Python and each package's installed version (None where missing)."""
    found = {"python": sys.version.split()[0]}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def pinned_peft() -> str:
    """pyproject.toml's bound on peft (`>=0.21.2,<0.23`): the script runs from the working tree, beside it."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(str(r.specifier) for r in map(Requirement, project["dependencies"]) if r.name == "peft")


def ensure_pinned_peft() -> None:
    """If the installed peft is not within the project's bound and a pinned wheel was carried in `.whl/`, install it
    into a scratch folder and run this script again on it; else say what to carry and go on."""
    from packaging.specifiers import SpecifierSet

    installed, pinned = versions()["peft"], pinned_peft()
    if installed is not None and installed in SpecifierSet(pinned):
        return
    wheels = sorted((ROOT / ".whl").glob("peft-*.whl"))
    if not wheels or os.environ.get("PEFT_GLIDER_PINNED_PEFT"):
        print(f"peft {installed} is not the pinned peft{pinned}, and no pinned wheel was carried in .whl/ "
              "(see this script's docstring); going on with it.", flush=True)
        return
    site = Path(tempfile.mkdtemp(prefix="pinned-peft-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheels[-1])], check=True)
    env = {**os.environ, "PEFT_GLIDER_PINNED_PEFT": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"peft {installed} is not the pinned peft{pinned}: running again on {wheels[-1].name}", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
TARGETS = {  # (hidden, variant, workload) -> the most a ratio to base may be
    (4096, "glider_e8", "prefill"): 1.10, (4096, "glider_e32", "prefill"): 1.15, (4096, "glider_e128", "prefill"): 1.3,
    (4096, "glider_e8", "decode"): 1.3, (4096, "glider_e32", "decode"): 1.3,
}


def run_tests(setup: Setup) -> dict:
    """The Triton kernel's and the routing reference's tests, from the working tree (on CUDA where there is one;
    the dry run only the kernel's, whose CPU checks run under Triton's interpreter)."""
    start = time.perf_counter()
    files = ["tests/test_triton_kernel.py"] + ([] if setup.dry_run else ["tests/test_reference.py"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *files],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    print(f"tests on {setup.device}: {tail} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"returncode": result.returncode, "summary": tail}


def build_base(hidden: int, setup: Setup):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = SHAPES[hidden]
    config = LlamaConfig(vocab_size=setup.vocab, hidden_size=hidden, intermediate_size=shape["intermediate"],
                         num_hidden_layers=LAYERS, num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         max_position_embeddings=setup.prefill_tokens + setup.new_tokens)
    return LlamaForCausalLM(config).to(setup.device, setup.dtype).eval()


def make_experts(hidden: int, count: int, folder: Path, setup: Setup) -> list[str]:
    """`count` random LoRA experts on all 7 modules, saved as PEFT adapters."""
    from peft import LoraConfig, get_peft_model

    rank = setup.rank
    model = get_peft_model(build_base(hidden, setup), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                 target_modules=LLAMA_MODULES, init_lora_weights=False))
    generator = torch.Generator(device=setup.device).manual_seed(1)
    paths = []
    for index in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator, device=setup.device) * 0.02)
        path = folder / f"expert{index}"
        model.save_pretrained(path)
        paths.append(str(path))
    return paths


def variants(hidden: int, paths: list[str], sizes: list[int], setup: Setup) -> dict:
    """name -> (model, how to enter its routing). The dry run routes Glider through the Triton kernel (on CPU under
    the interpreter), which `auto` picks on a GPU for these shapes."""
    import contextlib

    from peft import ArrowConfig, PeftModel, create_arrow_model, get_peft_model

    import peft_glider  # noqa: F401
    from peft_glider import GliderConfig

    arrow = create_arrow_model(build_base(hidden, setup), paths[: setup.arrow_experts], ArrowConfig(top_k=TOP_K, rng_seed=0))
    built = {"base": (build_base(hidden, setup), contextlib.nullcontext),
             "lora": (PeftModel.from_pretrained(build_base(hidden, setup), paths[0]).eval(), contextlib.nullcontext),
             f"arrow_e{setup.arrow_experts}": (arrow.eval(), contextlib.nullcontext)}
    for size in sizes:
        config = GliderConfig(experts=paths[:size], top_k=TOP_K, alpha=3.0)
        model = get_peft_model(build_base(hidden, setup), config).eval()
        glider = model.base_model
        if setup.dry_run:
            glider.set_kernel("triton")
        generator = torch.Generator().manual_seed(2)
        glider.set_gates({e: {m: torch.randn(g.shape, generator=generator) for m, g in per.items()}
                          for e, per in glider.get_gates().items()})
        scores = torch.rand(setup.batch, size, generator=generator)
        built[f"glider_e{size}"] = (model, lambda glider=glider, scores=scores: glider.global_scores(scores))
    return built


def timed(fn, setup: Setup) -> float:
    setup.synchronize()
    start = time.perf_counter()
    fn()
    setup.synchronize()
    return time.perf_counter() - start


def peak_memory(setup: Setup) -> int:
    return torch.cuda.max_memory_allocated() if setup.device == "cuda" else 0


def bench_hidden(hidden: int, sizes: list[int], rounds: int, deadline: float, setup: Setup) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = make_experts(hidden, max(max(sizes), setup.arrow_experts), Path(folder), setup)
        built = variants(hidden, paths, sizes, setup)
        setup_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(3)
    prefill_ids = torch.randint(3, setup.vocab, (setup.batch, setup.prefill_tokens), generator=generator).to(setup.device)
    prompt = torch.randint(3, setup.vocab, (setup.batch, setup.prompt_tokens), generator=generator).to(setup.device)
    workloads = {
        "prefill": lambda model: model(input_ids=prefill_ids),
        "decode": lambda model: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                               max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens,
                                               do_sample=False, pad_token_id=0),
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
                if setup.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with routing():
                    for workload, fn in workloads.items():
                        times[(name, workload)].append(timed(lambda: fn(model), setup))
                peaks[name] = max(peaks[name], peak_memory(setup))
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


def vllm_status() -> dict:
    """Whether vLLM is installed here, and what this project would run on it (nothing is run: see the docstring)."""
    try:
        version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        version = None
    return {"installed": version, "would_run": "python -m pytest tests/test_vllm.py (Glider adapters served by vLLM "
            "on CUDA)", "ran": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-benchmark.json")
    parser.add_argument("--quick", action="store_true", help="hidden 2048 only, E in {8, 32}, 2 rounds")
    parser.add_argument("--dry-run", action="store_true", help="every step on tiny shapes, CPU or GPU, in seconds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    found = versions()
    print("versions: " + ", ".join(f"{name} {version}" for name, version in found.items()), flush=True)
    ensure_pinned_peft()
    setup = Setup(args.dry_run)
    if setup.device != "cuda" and not args.dry_run:
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (or --dry-run).")
    start = time.perf_counter()
    deadline = start + args.budget_seconds
    device_name = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu (Triton interpreter)"
    report = {"device": device_name, "versions": found, "dtype": str(setup.dtype).removeprefix("torch."),
              "dry_run": args.dry_run}
    if setup.device != "cuda":
        from peft_glider.kernels import triton_interpreter_usable

        if not triton_interpreter_usable():
            report["notes"] = ("Triton's interpreter cannot run here (Triton < 3.7 with NumPy >= 2.4): the Glider "
                               "variants fell back to the concat kernel; the kernel's tests are skipped.")
            print("note: " + report["notes"], flush=True)
    report["vllm"] = vllm_status()
    report["tests"] = None if args.skip_tests else run_tests(setup)
    if args.dry_run:
        hiddens, sizes, rounds = [64], [2, 4], 1
    elif args.quick:
        hiddens, sizes, rounds = [2048], [8, 32], 2
    else:
        hiddens, sizes, rounds = [2048, 4096], [8, 32, 128], args.rounds
    report["results"], report["skipped"] = [], []
    for hidden in hiddens:
        if time.perf_counter() > deadline:
            report["skipped"].append(f"hidden {hidden}: out of time budget")
            continue
        report["results"].append(bench_hidden(hidden, sizes, rounds, deadline, setup))
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    report["targets"] = check_targets(report["results"])
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2))
    for check, met in report["targets"].items():
        print(f"{'met' if met else 'MISSED'}: {check}")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    if report["tests"] is not None and report["tests"]["returncode"] != 0:
        raise SystemExit("the tests step failed: " + report["tests"]["summary"])


if __name__ == "__main__":
    main()
