"""Leave-one-expert-out: which alpha serves a task that has no expert, measured on held-in tasks only.

`alpha="auto"` decides whether a query's task is known (alpha_held_in) or unseen (alpha_held_out); this measures
what the unseen alpha should be without looking at any held-out task. For each held-in task: a Glider model over
the *other* experts (their shipped gates), the default global router described on their samples and calibrated as
the pipeline does, the task routed per task from its query samples, and its first `--num` training examples scored
at each alpha, with the uniform merge of the other experts as a reference. The removed expert was trained on those
examples; no remaining expert, gate or instruction has seen them, and no evaluated example is used.

    python -m benchmarks.evaluation.unseen_alpha --cache-dir /tmp/evalcache [--out unseen.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Sequence

from . import methods
from .assets import default_cache_dir
from .run import Pipeline, RunSettings
from .scoring import rank_classify

MERGE = "merge"  # the uniform merge of the remaining experts, a reference


def leave_one_expert_out(pipeline: Pipeline, alphas: Sequence[float], num: int) -> dict:
    """{task: {"top_expert", "auto_alpha", "n", "accuracy": {alpha or "merge": accuracy}}} for every held-in task."""
    folders, _ = pipeline.library()
    router = pipeline.default_router()  # the LLM writer is not needed: not loaded
    results = {}
    for task in pipeline.settings.held_in:
        others = {name: folder for name, folder in folders.items() if name != task}
        examples = pipeline.splits[task].train[:num]
        model = methods.glider_model(pipeline.load_base, others)
        glider = model.base_model
        router.describe_experts(model, pipeline.expert_samples(others), calibrate_for="task")
        info, auto_alpha = pipeline.route_task(router, glider, task)
        cosines = dict(zip(glider.expert_names, info.scores[0].tolist()))
        accuracy = {}
        for alpha in alphas:
            with glider.global_scores(info.scores, alpha=alpha):
                hits = rank_classify(model, pipeline.tokenizer, examples, desc=f"{task} without its expert, α={alpha:g}")
            accuracy[f"{alpha:g}"] = sum(hits) / len(hits)
        del model
        merged = methods.merged_model(pipeline.load_base, others)
        hits = rank_classify(merged, pipeline.tokenizer, examples, desc=f"{task} without its expert, merge")
        accuracy[MERGE] = sum(hits) / len(hits)
        del merged
        top = max(cosines, key=cosines.get)
        results[task] = {"top_expert": top, "cosine": cosines[top], "auto_alpha": auto_alpha, "n": len(examples),
                         "accuracy": accuracy}
        print(f"{task}: top {top} ({cosines[top]:.3f}), auto {auto_alpha:g}, "
              + ", ".join(f"{k} {100 * v:.1f}" for k, v in accuracy.items()), flush=True)
    return results


def summary(results: dict) -> str:
    """A Markdown table: per task, the accuracy at each alpha and of the merge, and the averages."""
    columns = list(next(iter(results.values()))["accuracy"])
    header = ["Task without its expert", "closest expert (cosine)", "α=auto gives"]
    header += [f"α={c}" if c != MERGE else "uniform merge" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for task, entry in results.items():
        cells = [task, f"{entry['top_expert']} ({entry['cosine']:.2f})", f"{entry['auto_alpha']:g}"]
        lines.append("| " + " | ".join(cells + [f"{100 * entry['accuracy'][c]:.1f}" for c in columns]) + " |")
    averages = [f"**{100 * statistics.mean(e['accuracy'][c] for e in results.values()):.1f}**" for c in columns]
    lines.append("| **Average** | | | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation.unseen_alpha",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="the evaluation's cache (experts reused)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 3.0, 100.0])
    parser.add_argument("--num", type=int, default=100, help="training examples scored per task")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    pipeline = Pipeline(RunSettings(), args.cache_dir or default_cache_dir())
    results = leave_one_expert_out(pipeline, args.alphas, args.num)
    print(summary(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
