"""The `peft-glider` command line, through its installed entry point (a subprocess per call): every subcommand
once as a user runs it and once with a bad input (one line on stderr, a non-zero exit, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKEN, make_expert, tiny_chat_model
from transformers import AutoModelForCausalLM

import peft_glider.cli

CLI = Path(sys.executable).with_name("peft-glider")


def run(*args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_user_error(result: subprocess.CompletedProcess, message: str, status: int = 1) -> None:
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if status == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("peft-glider: error:")]
        assert len(errors) == 1, result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny chat base model saved with its tokenizer, two LoRA experts of it, their data, a built adapter."""
    root = tmp_path_factory.mktemp("cli")
    model, tokenizer = tiny_chat_model()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(root / "base")

    for seed, name in enumerate(["math", "code"], start=1):
        make_expert(load_base, root / name, seed=seed)
        rows = [{"input": f"w{seed} w{i} w{i + 1}", "target": f" w{i + seed}"} for i in range(3, 40)]
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    run("build", str(root / "math"), str(root / "code"), "--top-k", "1", "--out", str(root / "glider"))
    return {"root": root, "base": root / "base", "glider": root / "glider"}


def test_build_from_folders_and_an_experts_file(workspace, tmp_path):
    listing = tmp_path / "experts.yaml"
    listing.write_text(f"experts:\n  - {workspace['root'] / 'math'}\n  - source: {workspace['root'] / 'code'}\n    name: coder\n")
    result = run("build", "--experts-file", str(listing), "--alpha", "auto", "--out", str(tmp_path / "g"))
    assert "2 experts (math, coder)" in result.stdout
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["peft_type"] == "GLIDER" and config["alpha"] == "auto"
    assert config["base_model_name_or_path"] == str(workspace["base"])  # taken from the first expert

    result = run("build", "--experts-file", str(listing), "--router-only", "--top-k", "1", "--candidates", "1",
                 "--max-resident-experts", "1", "--out", str(tmp_path / "large"))
    config = json.loads((tmp_path / "large" / "adapter_config.json").read_text())
    assert config["candidates"] == 1 and config["max_resident_experts"] == 1
    run("build", "--experts-file", str(listing), "--max-resident-experts", "2", "--out", str(tmp_path / "budget"))
    config = json.loads((tmp_path / "budget" / "adapter_config.json").read_text())
    assert config["max_resident_experts"] == 2 and config["save_expert_weights"] is False  # the knob alone
    assert (tmp_path / "g" / "README.md").exists()

    assert_user_error(run("build", "--experts-file", str(tmp_path / "nope.yaml"), "--out", "x", ok=False),
                      "experts file")
    assert_user_error(run("build", "a", "--top-k", "0", "--out", "x", ok=False),
                      "argument --top-k: must be a positive integer", status=2)


def test_inspect_shows_experts_commits_and_settings(workspace, tmp_path):
    result = run("inspect", str(workspace["glider"]), "--card")
    assert "math" in result.stdout and "code" in result.stdout and "top_k 1" in result.stdout
    assert "local" in result.stdout and "<!-- peft-glider:start" in result.stdout
    lora = make_expert(lambda: AutoModelForCausalLM.from_pretrained(workspace["base"]), tmp_path / "lora", seed=3)
    assert_user_error(run("inspect", lora, ok=False), "holds a LORA adapter, not a Glider adapter")


def test_train_gates_then_describe_then_route_and_generate(workspace, tmp_path):
    root, glider = workspace["root"], workspace["glider"]
    data = ["--data", f"math={root / 'math.jsonl'}", "--data", f"code={root / 'code.jsonl'}"]
    result = run("train-gates", str(glider), *data, "--steps", "3")
    assert "Trained the gates of math, code" in result.stdout
    assert "trained (3 steps" in run("inspect", str(glider)).stdout
    assert_user_error(run("train-gates", str(glider), "--data", f"poetry={root / 'math.jsonl'}", ok=False),
                      "unknown expert(s) ['poetry']")

    samples = ["--samples", f"math={root / 'math.jsonl'}", "--samples", f"code={root / 'code.jsonl'}"]
    result = run("describe", str(glider), *samples, "--writer", "samples")
    assert "Example 1" in result.stdout
    assert_user_error(run("describe", str(glider), samples[0], samples[1], "--writer", "samples", ok=False),
                      "no samples for expert(s) ['code']")

    picture = tmp_path / "routing.png"
    result = run("route", str(glider), "w1 w5 w6", "w2 w7 w8", "--writer", "samples", "--plot", str(picture))
    assert "Global scores" in result.stdout and "model.layers.0" in result.stdout
    assert not picture.exists()  # two prompts: one picture each
    pictures = [picture.with_name(f"routing-{n}.png") for n in (1, 2)]
    assert all(p.stat().st_size > 0 for p in pictures) and picture.with_name("routing-scores.png").stat().st_size > 0
    assert pictures[0].read_bytes() != pictures[1].read_bytes()
    assert_user_error(run("route", str(tmp_path / "missing"), "w1", ok=False), "missing")

    result = run("generate", str(glider), "w1 w5 w6", "--max-new-tokens", "3", "--writer", "samples")
    assert result.stdout.strip()
    assert_user_error(run("generate", str(glider), "w1", "--max-new-tokens", "-1", ok=False),
                      "must be a positive integer", status=2)


def test_push_uploads_to_the_hub_and_refuses_a_router_only_adapter_of_local_folders(workspace, tmp_path, hub):
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = run("push", str(workspace["glider"]), "me/cli-glider", env=env)
    assert "Pushed" in result.stdout
    received = hub.files("me/cli-glider")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(received)
    assert b"glider" in received["README.md"]

    run("build", str(workspace["root"] / "math"), "--router-only", "--top-k", "1", "--out", str(tmp_path / "ro"))
    assert_user_error(run("push", str(tmp_path / "ro"), "me/ro", env=env, ok=False),
                      "router-only Glider adapter (save_expert_weights=False) routes among local expert folders")


def test_every_subcommand_help_shows_an_example():
    parser = peft_glider.cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"build", "train-gates", "describe", "route", "generate", "inspect", "push", "check-vllm"}
    for name, sub in commands.items():
        assert f"example:\n  peft-glider {name}" in sub.format_help(), name
    assert "example:\n  peft-glider route my-glider" in run("route", "--help").stdout


def test_data_files_in_trl_formats(workspace, tmp_path):
    """describe --samples and train-gates --data read TRL's prompt-completion and conversational records too."""
    root = workspace["root"]
    glider = tmp_path / "glider"
    run("build", str(root / "math"), str(root / "code"), "--top-k", "1", "--out", str(glider))
    prompt_completion = tmp_path / "math-pc.jsonl"
    prompt_completion.write_text("\n".join(json.dumps({"prompt": f"w1 w{i}", "completion": f" w{i + 1}"}) for i in range(3, 20)))
    conversations = tmp_path / "code-chat.jsonl"
    conversations.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"w2 w{i}"}, {"role": "assistant", "content": f"w{i + 2}"}]}) for i in range(3, 20)))
    files = ["math=" + str(prompt_completion), "code=" + str(conversations)]
    result = run("train-gates", str(glider), "--data", files[0], "--data", files[1], "--steps", "2")
    assert "Trained the gates of math, code" in result.stdout
    result = run("describe", str(glider), "--samples", files[0], "--samples", files[1], "--writer", "samples")
    instructions = {e["name"]: e["instruction"] for e in json.loads((glider / "adapter_config.json").read_text())["experts"]}
    assert "Input: w1 w3\n" in instructions["math"]  # a prompt-completion record's prompt (describe shows inputs)
    assert "Input: user: w2 w3\n" in instructions["code"] and "assistant" not in instructions["code"]  # before its answer
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "w1"}))
    assert_user_error(run("describe", str(glider), "--samples", f"math={bad}", "--samples", files[1], ok=False),
                      f"{bad}:1: a record with keys ['question']: expected")
