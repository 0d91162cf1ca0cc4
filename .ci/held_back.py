"""Which declared dependencies have a release newer than the project's own bounds in pyproject.toml allow.

An install without constraints still stops at those bounds (`peft>=0.21.2,<0.22` installs 0.21.2 when 0.22.0 is
out), so a run on "the newest releases" would not see such a release at all. `.ci/newest_releases.py` calls this
and installs what it reports on top, so the suite meets the release the bounds hold back.

Run with a virtual environment's Python (it needs `packaging`, which every pip environment holds, and
Python >= 3.11 for `tomllib`):
`python .ci/held_back.py` prints {name: {"newest": version, "requirement": text}} as JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable, Iterable, Optional

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_EXTRAS = ("dev",)  # what the README's install names: `-e ".[dev]"`
CEILINGS = ("<", "<=", "==", "~=", "===")  # operators that can exclude a newer release


def declared(project: dict, extras: Iterable[str] = INSTALLED_EXTRAS) -> list[Requirement]:
    """`project`'s dependencies and those of `extras`, following extras that name the project itself
    (`dev = ["peft-glider[offline,plot,docs]", ...]`); requirements whose marker excludes this platform dropped."""
    optional = project.get("optional-dependencies", {})
    found = [Requirement(text) for text in project.get("dependencies", [])]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, optional.get(extra, [])):
            if requirement.name == project["name"]:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return [requirement for requirement in found if requirement.marker is None or requirement.marker.evaluate()]


def newest_release(name: str) -> Optional[str]:
    """The newest final release of `name` on the configured index (`pip index versions`), or None."""
    output = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True
    ).stdout
    match = re.match(r"\S+ \(([^)]+)\)", output)
    return match.group(1) if match else None


def held_back(requirements: Iterable[Requirement], newest: Callable[[str], Optional[str]]) -> dict[str, dict]:
    """The requirements with a ceiling whose newest release (`newest(name)`) lies outside their specifier."""
    found = {}
    for requirement in requirements:
        if not any(spec.operator in CEILINGS for spec in requirement.specifier):
            continue  # no ceiling: an install takes the newest release anyway
        version = newest(requirement.name)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            found[requirement.name] = {"newest": version, "requirement": str(requirement)}
    return found


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    print(json.dumps(held_back(declared(project), newest_release)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
