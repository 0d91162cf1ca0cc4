"""The README's first command: the real quickstart (SmolLM2-135M-Instruct, three trained experts), offline.

The default suite runs it reduced (a few training steps: the same path end to end); the `slow` test runs it in
full from an empty cache within the budget (6 minutes on 2 CPU cores), then again from the cache (1 minute).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


def run_quickstart(cache: Path, *args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(QUICKSTART), *args], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PEFT_GLIDER_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, time.perf_counter() - start


def check_output(stdout: str) -> None:
    # prompts of different tasks go to different experts, the reload answers the same
    assert "The global router sent 3 of 3 prompts to their own task's expert" in stdout
    assert "the reload gives identical logits" in stdout
    for task in ("numbers", "capitals", "reverse"):
        assert f"{task:>10}: '" in stdout  # the instruction SmolLM2 wrote for each expert
    assert stdout.count("Glider model: ") == 3 and stdout.count("base model: ") == 3
    # each offline writer measured on prompts in the training format and on paraphrases, the better one routes
    table = re.search(r"training format +paraphrase +degenerate\n((?: +\S.*\n){2})", stdout)
    assert table, stdout
    counts = {line.strip().split("  ")[0]: [int(n) for n in re.findall(r"(\d+) / 6", line)]
              for line in table.group(1).splitlines()}
    assert set(counts) == {"SmolLM2 instructions", "samples"} and all(len(c) == 2 for c in counts.values())
    assert re.search(r"samples +\d+ / 6 +\d+ / 6 +0 / 15", stdout)  # the samples writer is never degenerate
    best = max(counts, key=lambda name: (sum(counts[name]), name == "samples"))
    assert f"routing with: {best}" in stdout


def test_quickstart_reduced(tmp_path):
    stdout, _ = run_quickstart(tmp_path, "--reduced")
    check_output(stdout)
    assert (tmp_path / "quickstart" / "out" / "global-scores.png").stat().st_size > 0


@pytest.mark.slow
def test_quickstart_full_within_budget(tmp_path):
    stdout, first = run_quickstart(tmp_path)
    check_output(stdout)
    # each expert learned its task: the Glider model answers each prompt right
    for answer in ("forty-seven", "THE RED CAR", "garden, window, apple"):
        assert f"Glider model: '{answer}'" in stdout
    _, second = run_quickstart(tmp_path)
    assert first < 360 and second < 60, (first, second)
