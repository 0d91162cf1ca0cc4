"""Data records in the formats the ecosystem uses, as the samples Glider takes: a text, or an (input, target) pair.

Accepted, per record (a JSONL line, a `datasets.Dataset` row, or a Python object):

- a string: a text; a pair of strings: (input, target);
- `{"input": ..., "target": ...}`; `{"text": ...}` (Glider's own JSONL);
- `{"prompt": ..., "completion": ...}`: TRL's prompt-completion format, strings or (conversational) message lists;
- `{"messages": [{"role", "content"}, ...]}`: TRL's conversational format; the last assistant message is the
  target, the conversation before it the input.

Conversations become text through the tokenizer's chat template when one is given (gate training: the model sees
what it was trained on), else as `role: content` lines (instructions and routing).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

Sample = Union[str, tuple[str, str]]

#: The record formats, as named in errors.
FORMATS = '{"input", "target"}, {"text"}, {"prompt", "completion"} or {"messages"}'


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def render(messages: Sequence[Mapping[str, Any]], tokenizer: Any = None, prompt: bool = False) -> str:
    """A conversation as text: the tokenizer's chat template (with the generation prompt when `prompt`), or
    `role: content` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def as_sample(record: Any, tokenizer: Any = None) -> Sample:
    """One record as a text or an (input, target) pair. A record of another shape is a `ValueError`, anything else
    a `TypeError`; both name the formats."""
    if isinstance(record, str):
        return record
    if isinstance(record, (tuple, list)) and len(record) == 2 and all(isinstance(part, str) for part in record):
        return (record[0], record[1])
    if isinstance(record, Mapping):
        if "input" in record and "target" in record:
            return (str(record["input"]), str(record["target"]))
        if "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
            if _is_messages(prompt) and _is_messages(completion):
                return (render(prompt, tokenizer, prompt=True), "\n".join(str(m["content"]) for m in completion))
            return (str(prompt), str(completion))
        if _is_messages(record.get("messages")):
            messages = list(record["messages"])
            if len(messages) > 1 and messages[-1]["role"] == "assistant":
                return (render(messages[:-1], tokenizer, prompt=True), str(messages[-1]["content"]))
            return render(messages, tokenizer)
        if "text" in record:
            return str(record["text"])
        raise ValueError(f"a record with keys {sorted(map(str, record))}: expected {FORMATS}")
    raise TypeError(f"a {type(record).__name__}: expected a text, an (input, target) pair or a record {FORMATS}")


def as_samples(data: Union[Iterable[Any], Any], tokenizer: Any = None) -> list[Sample]:
    """Every record of `data` (an iterable of records, or a `datasets.Dataset`) as samples."""
    return [as_sample(record, tokenizer) for record in data]
