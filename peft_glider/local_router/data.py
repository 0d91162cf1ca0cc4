"""Turn an expert's data (texts, (input, target) pairs, TRL's prompt-completion or conversational records, or a
`datasets.Dataset` of any of them) into token batches for gate training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import torch

from ..records import as_sample

IGNORE_INDEX = -100

GateData = Union[Sequence[str], Sequence[tuple[str, str]], Any]  # Any: a datasets.Dataset


@dataclass
class Example:
    """One tokenized example: causal LMs predict `labels` shifted by one; seq2seq models decode `labels`."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def _rows(data: GateData, tokenizer: Any) -> Iterable[Any]:
    """Each row as a pre-tokenized dict, a text or a pair (`records.as_sample`: TRL's formats included)."""
    if hasattr(data, "column_names"):  # datasets.Dataset
        columns = set(data.column_names)
        if "input_ids" in columns:
            return ({"input_ids": row["input_ids"], "labels": row.get("labels")} for row in data)
        known = ({"input", "target"}, {"prompt", "completion"}, {"messages"}, {"text"})
        if not any(names <= columns for names in known):
            raise ValueError(
                f"Dataset columns {sorted(columns)}: expected 'text', 'input' and 'target', 'prompt' and "
                "'completion', 'messages', or 'input_ids'."
            )
    return (row if isinstance(row, dict) and "input_ids" in row else _sample(row, position, tokenizer)
            for position, row in enumerate(data))


def _sample(row: Any, position: int, tokenizer: Any) -> Any:
    try:
        return as_sample(row, tokenizer)
    except TypeError as error:
        raise TypeError(f"Gate training data row {position} is {error}") from error
    except ValueError as error:
        raise ValueError(f"Gate training data row {position}: {error}") from error


def _truncate_pair(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    target = target[:max_length]
    keep = max_length - len(target)
    return (prompt[-keep:] if keep > 0 else []), target


def build_examples(data: GateData, tokenizer: Any, is_encoder_decoder: bool, max_length: int) -> list[Example]:
    """Tokenize every row. Texts: loss on all tokens (causal LMs only). Pairs: loss on the target tokens only."""
    examples = []
    for position, row in enumerate(_rows(data, tokenizer)):
        if isinstance(row, dict):  # pre-tokenized
            ids = list(row["input_ids"])[:max_length]
            labels = list(row["labels"])[:max_length] if row.get("labels") is not None else list(ids)
            examples.append(Example(ids, labels))
            continue
        if tokenizer is None:
            raise ValueError("Gate training on text needs a tokenizer.")
        if isinstance(row, str):
            if is_encoder_decoder:
                raise ValueError("An encoder-decoder model needs (input, target) pairs, not plain texts.")
            ids = tokenizer(row, truncation=True, max_length=max_length)["input_ids"]
            examples.append(Example(ids, list(ids)))
        else:  # an (input, target) pair
            prompt = tokenizer(row[0], add_special_tokens=is_encoder_decoder)["input_ids"]
            target = tokenizer(row[1], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                target = target + [tokenizer.eos_token_id]
            if is_encoder_decoder:
                examples.append(Example(prompt[:max_length], target[:max_length]))
            else:
                if tokenizer.bos_token_id is not None and (not prompt or prompt[0] != tokenizer.bos_token_id):
                    prompt = [tokenizer.bos_token_id] + prompt
                prompt, target = _truncate_pair(prompt, target, max_length)
                examples.append(Example(prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    if not examples:
        raise ValueError("Gate training data is empty.")
    return examples


def loss_tokens(example: Example, is_encoder_decoder: bool) -> int:
    """Tokens that carry loss in this example (causal LMs never predict the first token)."""
    labels = example.labels if is_encoder_decoder else example.labels[1:]
    return sum(label != IGNORE_INDEX for label in labels)


def collate(examples: Sequence[Example], pad_token_id: int, is_encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels (padding labelled IGNORE_INDEX)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    label_width = max(len(e.labels) for e in examples) if is_encoder_decoder else width
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
