"""`benchmarks/gpu.py --dry-run`: the GPU check end to end on CPU (tests step, every variant, both workloads, the
JSON), on tiny shapes with the Triton kernel under Triton's interpreter, run as the GPU machine will run it: from
the working tree, without relying on the package being installed or on the current folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_end_to_end_as_a_dry_run(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = tmp_path / "dry.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("versions: python ") and " torch " in first and " peft " in first and " triton " in first
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu (Triton interpreter)"
    assert report["tests"]["returncode"] == 0 and " passed" in report["tests"]["summary"]
    assert report["versions"]["torch"] and report["versions"]["peft"]
    (result_,) = report["results"]
    assert set(result_["variants"]) == {"base", "lora", "arrow_e4", "glider_e2", "glider_e4"}
    for name, entry in result_["variants"].items():
        for workload in ("prefill", "decode"):
            assert math.isfinite(entry[f"{workload}_median_ms"]) and entry[f"{workload}_median_ms"] > 0, name
    assert not report["skipped"]
