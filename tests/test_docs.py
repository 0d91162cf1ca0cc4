"""The documentation tells the truth: the README's snippet runs, the API reference covers every public name, no
docstring cites a missing page, and `.ci/run` runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import input_ids, make_expert, tiny_llama

import peft_glider
import peft_glider.global_router

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_readme_usage_snippet_runs_on_a_tiny_model(tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.commit_folder("owner/math-lora", Path(make_expert(tiny_llama, tmp_path / "m", seed=1)))
    hub.commit_folder("owner/lib", Path(make_expert(tiny_llama, tmp_path / "c", seed=2, r=2)), prefix="chat/", branch="v1")
    make_expert(tiny_llama, tmp_path / "code-lora", seed=3)
    usage = README.split("## Use", 1)[1]
    snippet = python_blocks(usage)[0]
    namespace = {
        "base_model": tiny_llama(),
        "gate_vector": torch.randn(32),
        "expert_embeddings": torch.randn(3, 8),
        "cosines": torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]),
        "inputs": {"input_ids": input_ids()},
    }
    exec(compile(snippet, "README.md", "exec"), namespace)
    model, trace = namespace["model"], namespace["trace"]
    assert model.base_model.expert_names == ["math-lora", "code-lora", "chat"]
    assert trace.modules and (tmp_path / "my-glider" / "adapter_config.json").exists()


def test_api_reference_covers_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", api, re.MULTILINE))
    public = {f"peft_glider.{name}" for name in peft_glider.__all__ if name != "__version__"}
    public |= {f"peft_glider.global_router.{name}" for name in peft_glider.global_router.__all__}
    missing = {
        name for name in public
        if name not in documented and name.replace("global_router.", "") not in documented
    }
    assert not missing, f"not in docs/api.md: {sorted(missing)}"


def test_no_docstring_or_page_cites_a_missing_page():
    cited = set()
    for path in [*(ROOT / "peft_glider").rglob("*.py"), ROOT / "README.md"]:
        cited |= set(re.findall(r"docs/([\w-]+\.md)", path.read_text()))
    nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    assert "algorithm.md" in cited and "api.md" in nav
    assert not [page for page in cited | nav if not (ROOT / "docs" / page).exists()]


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2  # the quickstart and the tests
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "examples/quickstart.py" in commands[0] and "mkdocs build --strict" in commands[1]
    # both install the recorded versions, and CI then reports on the newest releases
    assert all(command.count("-c constraints.txt") == 2 for command in commands)
    assert "python3 .ci/newest_releases.py" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_ci_fails_when_the_readme_test_command_fails(tmp_path):
    """A failure anywhere in the README's && chain (a red test suite) fails `.ci/run`, even when the newest-releases
    report after it succeeds."""
    import subprocess

    command = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)[1]
    script = (ROOT / ".ci" / "run").read_text()
    assert command in script and "python3 .ci/newest_releases.py" in script
    for failing, expected in ((command.replace(".venv/bin/python -m pytest", "false"), 1), ("true", 0)):
        run = script.replace(command, failing.replace("python3 -m venv .venv", "true")
                             .replace(".venv/bin/pip", "true").replace(".venv/bin/mkdocs", "true")
                             .replace("python3 .ci/vllm_suite.py", "true"))
        run = run.replace("python3 .ci/newest_releases.py", "true")
        result = subprocess.run(["bash", "-c", run], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == expected, (failing, result.stderr)


def test_the_constraints_pin_every_package_of_the_test_install():
    """Every distribution the README's test command installs is pinned, so upstream cannot move one under a fresh
    clone (checked against this environment, which that command made)."""
    import importlib.metadata

    newest = _load_ci_script()
    pinned = newest.pins((ROOT / "constraints.txt").read_text().splitlines())
    installed = {newest.pins([f"{d.metadata['Name']}=={d.version}"]).popitem() for d in importlib.metadata.distributions()}
    unpinned = sorted(name for name, version in installed if name not in pinned)
    unpinned = [name for name in unpinned if name not in ("peft-glider", "pip", "setuptools", "wheel")]  # the venv's
    assert not unpinned, f"constraints.txt misses {unpinned}"
    assert pinned["torch"] == "2.13.0"


def test_the_newest_releases_report_names_every_difference():
    newest = _load_ci_script()
    pinned = newest.pins(["# header", "Torch==2.13.0", "transformers==5.24.0", "gone==1.0"])
    installed = newest.pins(["torch==2.13.0+cpu", "transformers==5.25.0", "kernels==0.19.1", "-e git+x#egg=y"])
    assert newest.differences(pinned, installed) == [
        "  gone: 1.0 -> (not installed)", "  kernels: (not pinned) -> 0.19.1", "  transformers: 5.24.0 -> 5.25.0"
    ]


def test_the_newest_releases_report_sees_releases_the_projects_own_bounds_hold_back():
    """An install without constraints stops at pyproject.toml's bounds (`peft<0.22` installs 0.21.2 when 0.22.0 is
    out): `held_back` names such a release, so the report installs it and runs the suite on it."""
    held_back = _load_ci_script("held_back")
    project = {
        "name": "peft-glider",
        "dependencies": ["peft>=0.21.2,<0.22", "torch>=2.4"],
        "optional-dependencies": {
            "docs": ["mkdocs>=1.6,<2"],
            "windows": ["pywin32<300; platform_system == 'Windows'"],
            "dev": ["peft-glider[docs,windows]", "pytest>=8", "nothing-here==1.0; python_version < '3'"],
            "vllm": ["vllm>=0.33,<0.35"],  # not installed by the README's test command
        },
    }
    requirements = held_back.declared(project)
    assert sorted(r.name for r in requirements) == ["mkdocs", "peft", "pytest", "torch"]
    newest = {"peft": "0.22.0", "torch": "9.0", "mkdocs": "1.7.0", "pytest": "10.0"}
    asked = []
    found = held_back.held_back(requirements, lambda name: asked.append(name) or newest[name])
    assert found == {"peft": {"newest": "0.22.0", "requirement": "peft<0.22,>=0.21.2"}}
    assert sorted(asked) == ["mkdocs", "peft"]  # no ceiling, nothing to ask: the install takes the newest
    assert held_back.held_back(requirements, {"peft": "0.21.3", "mkdocs": "1.7.0"}.get) == {}
    # the project's own pyproject.toml reads, and its ceilings are the ones asked about
    import tomllib

    ours = held_back.declared(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])
    assert "peft" in {r.name for r in ours} and "vllm" not in {r.name for r in ours}


def _load_ci_script(name: str = "newest_releases"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
