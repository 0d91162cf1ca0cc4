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
