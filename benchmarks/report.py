"""Render benchmark JSON files (from speed.py) as the Markdown tables of docs/benchmarks.md.

    python benchmarks/report.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(paths: list[str]) -> str:
    lines = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        header = data["header"]
        lines.append(f"### {Path(path).stem}")
        lines.append("")
        lines.append(
            f"torch {header['torch']}, transformers {header['transformers']}, peft {header['peft']}, "
            f"peft-glider {header['peft_glider']}, Python {header['python']}, {header['threads']} threads, "
            f"compiled kernel {'built' if header.get('compiled_kernel') else 'not built'}; "
            f"load average {header['load_average_start'][0]:.2f} at the start, {header['load_average_end'][0]:.2f} at the end."
        )
        lines.append("")
        lines.append("| model | E | workload | variant | median | ratio to base | FLOP-predicted | router (apart) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for case in data["cases"]:
            for row in case["rows"]:
                router = f"{row['router_s'] * 1000:.0f} ms" if row["router_s"] is not None else ""
                lines.append(
                    f"| {row['model']} | {row['experts']} | {row['workload']} | {row['variant']} | "
                    f"{row['median_s'] * 1000:.1f} ms | {row['ratio_to_base']:.2f} | {row['predicted_ratio']:.2f} | {router} |"
                )
        lines.append("")
        for case in data["cases"]:
            experts = case["rows"][0]["experts"]
            model = case["rows"][0]["model"]
            memory = case["memory_mib"]
            text = f"- {model}, E={experts}: experts load in {case['glider_load_seconds']:.2f} s"
            if memory:
                text += (
                    f"; peak RSS growth base {memory['base']:.0f} MiB, Glider {memory['glider']:.0f} MiB, experts "
                    f"{memory['expert_mib']:.0f} MiB (budget {(memory['base'] + memory['expert_mib']) * 1.15:.0f} MiB)"
                )
            lines.append(text)
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1:]))
