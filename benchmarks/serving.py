"""Serving throughput and latency: vLLM (base model, one LoRA per request, Glider) and the transformers Glider model.

The quickstart's SmolLM2-135M-Instruct and its three experts (trained by `examples/quickstart.py`, cached); a Glider
adapter over them described with the samples writer and all-MiniLM-L6-v2 (so that vLLM's frontend routes each
request by its text). 24 requests (8 per task) of 32 new tokens, greedy, float32, arriving all at once or as a
Poisson process at a few rates. Rows:

- `vllm base`: the base model through vLLM's OpenAI server;
- `vllm oracle LoRA`: each request names its own task's expert (`model=<task>`), the best one LoRA can do;
- `vllm glider`: every request names the Glider adapter, routed by its own text, per token and per layer;
- `transformers glider`: the transformers Glider model, one thread per request (`route(prompt)` + `generate`).

Throughput: generated tokens over the time from the first arrival to the last answer; latency: from a request's
arrival to its answer (p50, p95). The run also checks that `vllm glider` answers each request (all at once) with
the tokens of `transformers glider` up to the answer's end: its first end-of-sequence token, which vLLM passes
(`ignore_eos`) and transformers' `min_new_tokens` forbids (both generate 32 tokens, for the same work). Needs the
vLLM venv (docs/serving.md) and the quickstart's cache:

    .venv/bin/python examples/quickstart.py                       # once: the base model and the experts
    .venv-vllm/bin/python benchmarks/serving.py --out serving.json # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/serving.py --from-json serving.json --plot serving.png
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

NEW_TOKENS = 32
PER_TASK = 8
RATES = [1.0, 2.0, 4.0]  # Poisson arrivals, requests per second
TASKS = ("numbers", "capitals", "reverse")


def quickstart_files() -> tuple[Path, dict[str, str]]:
    """The quickstart's converted base model folder and its experts' folders (it must have run once)."""
    from peft_glider.global_router import default_cache_dir

    cache = default_cache_dir() / "quickstart"
    models = sorted((cache / "models").glob("*"))
    experts = {task: str(cache / "experts" / task) for task in TASKS}
    if not models or not all(Path(folder, "adapter_model.safetensors").exists() for folder in experts.values()):
        raise SystemExit(f"No quickstart library under {cache}: run `.venv/bin/python examples/quickstart.py` first.")
    return models[0], experts


def workload(base_dir: Path) -> list[tuple[str, str]]:
    """(task, prompt) for 8 prompts per task, interleaved, from the quickstart's task generator."""
    from quickstart import task_pairs, task_words
    from transformers import AutoTokenizer

    words = task_words(AutoTokenizer.from_pretrained(base_dir))
    per_task = {task: [prompt for prompt, _ in task_pairs(task, words, PER_TASK, seed=3)] for task in TASKS}
    return [(task, per_task[task][i]) for i in range(PER_TASK) for task in TASKS]


def glider_adapter(base_dir: Path, experts: dict[str, str], out: Path) -> str:
    """A Glider adapter over the experts, described with the samples writer (routable by text in vLLM)."""
    folder = out / "glider-samples"
    if (folder / "adapter_config.json").exists():
        return str(folder)
    from peft import get_peft_model
    from quickstart import task_pairs, task_words
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_glider import GliderConfig, GlobalRouter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           GliderConfig(experts=[experts[task] for task in TASKS], top_k=1, alpha="auto"))
    words = task_words(AutoTokenizer.from_pretrained(base_dir))
    samples = {task: [prompt for prompt, _ in task_pairs(task, words, 6, seed=1)] for task in TASKS}
    GlobalRouter().describe_experts(model, samples)
    model.save_pretrained(folder)
    return str(folder)


def arrivals(count: int, rate: float | None, seed: int) -> list[float]:
    """Arrival offsets in seconds: all at 0, or a Poisson process of `rate` requests per second."""
    if rate is None:
        return [0.0] * count
    rng, offsets, now = random.Random(seed), [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


def run_arrivals(submit, requests: list, offsets: list[float]) -> dict:
    """Send each request at its offset (one thread each), `submit(request)` returning its generated token ids."""
    start = time.perf_counter()
    latencies, tokens = [None] * len(requests), [[] for _ in requests]

    def one(i: int) -> None:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        tokens[i] = submit(requests[i])
        latencies[i] = time.perf_counter() - (start + offsets[i])

    with ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(one, range(len(requests))))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"tokens_per_s": sum(map(len, tokens)) / wall, "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "wall_s": wall,
            "token_ids": tokens}


def start_server(base_dir: Path, loras: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
               "--served-model-name", "base", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
               "--lora-modules", *[f"{name}={path}" for name, path in loras.items()], "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1)
            return process, url
        except OSError:
            if process.poll() is not None:
                raise SystemExit("The vLLM server exited at start-up.")
            time.sleep(0.5)
    raise SystemExit("The vLLM server did not start in 5 minutes.")


def vllm_submitter(url: str, model_of):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)

    def submit(request: tuple[str, str]) -> list[int]:
        task, prompt = request
        response = client.completions.create(
            model=model_of(task), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        return [int(token.split(":")[1]) for token in response.choices[0].logprobs.tokens]

    return submit


def transformers_submitter(base_dir: Path, adapter: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    glider = model.base_model
    lock = threading.Lock()  # the router's embedder is loaded on first use: once

    def submit(request: tuple[str, str]) -> list[int]:
        _, prompt = request
        inputs = tokenizer(prompt, return_tensors="pt")
        with lock:
            context = glider.route(prompt)
            context.__enter__()
        try:
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False, pad_token_id=tokenizer.eos_token_id)
        finally:
            context.__exit__(None, None, None)
        return output[0, inputs["input_ids"].shape[1] :].tolist()

    return submit


def measure(out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    base_dir, experts = quickstart_files()
    adapter = glider_adapter(base_dir, experts, out_dir)
    requests = workload(base_dir)
    patterns = {"all at once": None, **{f"poisson {rate:g}/s": rate for rate in RATES}}
    process, url = start_server(base_dir, {**experts, "glider": adapter})
    rows = {"vllm base": vllm_submitter(url, lambda task: "base"),
            "vllm oracle LoRA": vllm_submitter(url, lambda task: task),
            "vllm glider": vllm_submitter(url, lambda task: "glider")}
    report = {"requests": len(requests), "new_tokens": NEW_TOKENS, "results": {}}
    try:
        for submit in rows.values():  # warm-up: every adapter loaded, the frontend's router loaded
            run_arrivals(submit, requests[:3], [0.0] * 3)
        for pattern, rate in patterns.items():
            offsets = arrivals(len(requests), rate, seed=11)
            for name, submit in rows.items():
                result = report["results"].setdefault(pattern, {})[name] = run_arrivals(submit, requests, offsets)
                print(f"{pattern}, {name}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    submit = transformers_submitter(base_dir, adapter)
    run_arrivals(submit, requests[:3], [0.0] * 3)
    for pattern, rate in patterns.items():
        result = run_arrivals(submit, requests, arrivals(len(requests), rate, seed=11))
        report["results"][pattern]["transformers glider"] = result
        print(f"{pattern}, transformers glider: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    for pattern, results in report["results"].items():
        results["glider / oracle throughput"] = (
            results["vllm glider"]["tokens_per_s"] / results["vllm oracle LoRA"]["tokens_per_s"]
        )
    at_once = report["results"]["all at once"]
    eos = AutoTokenizer.from_pretrained(base_dir).eos_token_id
    report["tokens equal"] = answers_equal(
        at_once["vllm glider"]["token_ids"], at_once["transformers glider"]["token_ids"], eos
    )
    for results in report["results"].values():
        for result in results.values():
            if isinstance(result, dict):
                del result["token_ids"]
    return report


def answers_equal(served: list[list[int]], reference: list[list[int]], eos: int) -> int:
    """How many answers are the same up to the served one's first end-of-sequence token (transformers may not give
    it there: `min_new_tokens` forbids it)."""
    same = 0
    for tokens, expected in zip(served, reference):
        cut = tokens.index(eos) if eos in tokens else len(tokens)
        same += tokens[:cut] == expected[:cut]
    return same


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(report["results"])
    rows = ["vllm base", "vllm oracle LoRA", "vllm glider", "transformers glider"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [p + i * width for p in range(len(patterns))]
        left.bar(xs, [report["results"][p][row]["tokens_per_s"] for p in patterns], width, label=row)
        right.bar(xs, [report["results"][p][row]["p95_s"] for p in patterns], width, label=row, alpha=0.5)
        right.bar(xs, [report["results"][p][row]["p50_s"] for p in patterns], width, color=f"C{i}")
    for axis, title in ((left, "throughput (generated tokens/s)"), (right, "latency p50 (solid) and p95 (s)")):
        axis.set_xticks([p + 0.4 - width / 2 for p in range(len(patterns))], patterns)
        axis.set_title(title)
    left.legend(fontsize=8)
    figure.suptitle(f"{report['requests']} requests x {report['new_tokens']} tokens, SmolLM2-135M, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--plot", help="draw throughput and latency into this PNG (needs matplotlib)")
    parser.add_argument("--from-json", help="plot a report written by --out instead of measuring")
    parser.add_argument("--work", help="where the Glider adapter over the quickstart's experts is kept (default: "
                        "the project's cache, `serving/`)")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        from peft_glider.global_router import default_cache_dir

        report = measure(Path(args.work) if args.work else default_cache_dir() / "serving")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"vllm glider answers {report['tokens equal']} of {report['requests']} requests with transformers' tokens "
          "(up to the end of the answer)")
    for pattern, results in report["results"].items():
        print(f"\n{pattern}:")
        for row, result in results.items():
            if isinstance(result, dict):
                print(f"  {row:>20}: {result['tokens_per_s']:7.1f} tokens/s  p50 {result['p50_s']:6.2f} s  "
                      f"p95 {result['p95_s']:6.2f} s")
            else:
                print(f"  {row:>20}: {result:.2f}")
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
