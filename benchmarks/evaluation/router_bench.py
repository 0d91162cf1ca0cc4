"""The global router alone, per instruction source and alpha="auto" rule, on the evaluation's tasks and splits.

No expert is trained and no model is evaluated: only instructions are written and embedded. For each source, the
held-in tasks' experts are described from their expert samples; each task's query (its query samples, routed per
task as the pipeline does) is scored against them. Reported, with the same settings for every task:

- held-in top-1: how many held-in queries score their own expert highest;
- alpha="auto" decisions, per rule: held-in queries given alpha_held_in, held-out queries given alpha_held_out.

    python -m benchmarks.evaluation.router_bench --cache-dir /tmp/evalcache [--out router.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.nn.functional as F

from peft_glider.global_router import (
    AUTO_ALPHA_RULES,
    FEW_SHOT_SYSTEM_PROMPT,
    GlobalRouter,
    HybridWriter,
    LocalModelWriter,
    SamplesWriter,
)
from peft_glider.global_router.router import RouteInfo

from . import assets
from .run import DEFAULT_HELD_IN, DEFAULT_HELD_OUT, RunSettings
from .tasks import load_task, split_task


def writers(model_dir: str) -> dict:
    plain = LocalModelWriter(model_dir)
    few_shot = LocalModelWriter(model=plain.model, tokenizer=plain.tokenizer, system_prompt=FEW_SHOT_SYSTEM_PROMPT,
                                no_repeat_ngram_size=3)
    return {"samples": SamplesWriter(), "llm": plain, "llm-few-shot": few_shot,
            "hybrid": HybridWriter(plain), "hybrid-few-shot": HybridWriter(few_shot)}


def bench(cache: Path, held_in: list[str], held_out: list[str]) -> dict:
    settings = RunSettings(held_in=held_in, held_out=held_out)
    assets.setup(cache, held_in + held_out)
    splits = {t: split_task(load_task(cache, t), t, settings.num_eval, settings.num_train, settings.seed)
              for t in held_in + held_out}
    expert_samples = {t: [e.pair() for e in splits[t].expert_samples] for t in held_in}
    results = {}
    for source, writer in writers(str(assets.base_model_dir(cache))).items():
        router = GlobalRouter(writer, cache_dir=cache / "global")
        described = router.describe(expert_samples, held_in, calibrate=False)
        thresholds = {rule: router.calibrate_auto_alpha(expert_samples, held_in, described.embeddings, "task", rule)
                      for rule in AUTO_ALPHA_RULES}
        info = RouteInfo(instructions=[], scores=None)
        queries = [[e.pair() for e in splits[t].query_samples] for t in held_in + held_out]
        vectors = router.embed(router.write_instructions(queries, info), info)
        cosines = F.cosine_similarity(vectors[:, None], described.embeddings[None], dim=-1)  # (tasks, E)
        best = cosines.max(dim=1)
        per_task = {t: {"top": held_in[int(best.indices[i])], "best": float(best.values[i])}
                    for i, t in enumerate(held_in + held_out)}
        entry = {
            "top1_held_in": sum(per_task[t]["top"] == t for t in held_in),
            "thresholds": thresholds,
            "auto": {rule: {"held_in_as_held_in": sum(per_task[t]["best"] >= th for t in held_in),
                            "held_out_as_held_out": sum(per_task[t]["best"] < th for t in held_out)}
                     for rule, th in thresholds.items()},
            "tasks": per_task,
        }
        results[source] = entry
        auto = "  ".join(f"{rule}: in {a['held_in_as_held_in']}/{len(held_in)} out {a['held_out_as_held_out']}/"
                         f"{len(held_out)} (thr {thresholds[rule]:.3f})" for rule, a in entry["auto"].items())
        print(f"{source:>16}: top-1 {entry['top1_held_in']}/{len(held_in)}  {auto}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=assets.default_cache_dir())
    parser.add_argument("--held-in", nargs="+", default=DEFAULT_HELD_IN)
    parser.add_argument("--held-out", nargs="+", default=DEFAULT_HELD_OUT)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = bench(args.cache_dir, args.held_in, args.held_out)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
