"""CLI: `python -m benchmarks.evaluation [--quick] [--held-in ...] [--held-out ...] [--held-out-dir DIR]
[--tasks-dir DIR] [--out DIR]`.

Runs the whole pipeline (set-up, experts, gates, instructions, evaluation) with everything cached under
`--cache-dir` (default `$GLIDER_EVAL_CACHE` or `~/.cache/peft_glider_eval`, outside the repository), and writes
`results.md`, `results.json` and `results.svg` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .assets import default_cache_dir
from .library import ExpertSettings
from .run import Pipeline, RunSettings, write_text_atomically
from .sources import TaskSourceError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 held-in, 2 held-out tasks, fewer steps (~7 min)")
    parser.add_argument("--held-out-dir", type=Path, metavar="DIR",
                        help="evaluate DIR/<task>.jsonl files as held-out tasks against the library an earlier run "
                             "with the same settings built (nothing is trained), every baseline included")
    parser.add_argument("--library", choices=("standard", "large"), default="standard",
                        help="large: add 31 library-only experts on more MMLU subjects (12 with --quick), never "
                             "evaluated, and candidates rows at M = 8 and 16")
    parser.add_argument("--compare", type=Path, metavar="RESULTS_JSON",
                        help="a results.json of the standard library: the report adds what changed, row by row")
    parser.add_argument("--held-in", nargs="+", help="task names that get an expert (registry tasks, your --tasks-dir "
                                                      "tasks, BIG-bench names, 'bbc')")
    parser.add_argument("--held-out", nargs="*", help="task names without an expert")
    parser.add_argument("--num-eval", type=int, help="evaluation examples per held-in task")
    parser.add_argument("--num-eval-held-out", type=int, help="evaluation examples per held-out task")
    parser.add_argument("--num-train", type=int, help="training examples per held-in task")
    parser.add_argument("--steps", type=int, help="LoRA training steps per expert")
    parser.add_argument("--gate-steps", type=int, help="gate training steps per expert")
    parser.add_argument("--top-layers", type=int, help="experts adapt the top N layers (0: all)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--candidates", nargs="+", type=int, default=[],
                        help="rows of GLIDER alpha=auto with candidates=M, for each M given (default: 8)")
    parser.add_argument("--llm-writer", action="store_true",
                        help="add the row whose instructions SmolLM2 writes (GLIDER α=auto · llm)")
    parser.add_argument("--arrow-local", action="store_true",
                        help="add the row over Arrow prototypes instead of trained gates (GLIDER α=auto · Arrow local)")
    parser.add_argument("--endpoint-url", help="an OpenAI-compatible endpoint as an extra instruction source")
    parser.add_argument("--endpoint-model", help="the model the endpoint serves")
    parser.add_argument("--bigbench-dir", help="a local BIG-bench checkout or a folder of <task>/task.json folders")
    parser.add_argument("--tasks-dir", help="your own tasks: <task>.jsonl files of {input, choices, target} rows")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where data, models and experts are kept")
    parser.add_argument("--out", type=Path, default=Path("evaluation-results"), help="report folder")
    parser.add_argument("--setup-only", action="store_true", help="only fetch and extract the offline parts")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> RunSettings:
    settings = RunSettings.quick() if args.quick else RunSettings()
    overrides = {name: getattr(args, name) for name in
                 ("held_in", "held_out", "num_eval", "num_eval_held_out", "num_train", "seed", "endpoint_url",
                  "endpoint_model", "bigbench_dir", "tasks_dir")
                 if getattr(args, name) is not None}
    overrides.update({name: True for name in ("arrow_local",) if getattr(args, name)})
    if args.llm_writer:
        overrides["llm_source"] = True
    expert_overrides = {name: getattr(args, name) for name in ("steps", "gate_steps") if getattr(args, name) is not None}
    if args.top_layers is not None:
        expert_overrides["top_layers"] = args.top_layers or None
    experts: ExpertSettings = replace(settings.experts, **expert_overrides)
    settings = replace(settings, **overrides, experts=experts)
    settings = settings.with_large_library(quick=args.quick) if args.library == "large" else settings
    if args.candidates:  # given: they replace the default rows
        settings = replace(settings, candidates=tuple(args.candidates))
    return settings.with_held_out_dir(args.held_out_dir) if args.held_out_dir else settings


def standard_library_accuracy(path: Path) -> dict[str, dict[str, float]]:
    """The accuracies of a standard-library run's results.json, to set beside a large-library run's."""
    try:
        standard = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--compare {path}: not a readable results.json ({error}).") from error
    if standard.get("library"):
        raise SystemExit(f"--compare {path}: that run had library-only experts; compare with a standard run.")
    return standard["accuracy"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        settings = settings_from(args)
    except TaskSourceError as error:
        print(f"python -m benchmarks.evaluation: {error}", file=sys.stderr)
        return 2
    cache = args.cache_dir or default_cache_dir()
    start = time.perf_counter()
    try:
        if args.setup_only:
            from .assets import setup

            setup(cache, settings.evaluated + settings.library, settings.task_sources())
            print(f"Set-up done in {cache}")
            return 0
        from .report import markdown, svg_plot

        standard = standard_library_accuracy(args.compare) if args.compare else None  # checked before the long run
        results = Pipeline(settings, cache).run()
    except TaskSourceError as error:
        print(f"python -m benchmarks.evaluation: {error}", file=sys.stderr)
        return 2
    results["timings"]["total_seconds"] = time.perf_counter() - start
    results["command"] = "python -m benchmarks.evaluation " + " ".join(sys.argv[1:] if argv is None else argv)
    if standard is not None:
        results["standard_library"] = standard
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(results)
    for name, text in (("results.md", report), ("results.json", json.dumps(results, indent=1)),
                       ("results.svg", svg_plot(results))):
        write_text_atomically(args.out / name, text)
    print(report)
    print(f"Wrote {args.out}/results.md, results.json and results.svg in {results['timings']['total_seconds']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
