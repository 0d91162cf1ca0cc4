"""Rank classification by length-normalized log-likelihood: the option whose tokens have the highest
log-probability after the prompt per character of the option wins (lm-evaluation-harness's `acc_norm`, the usual
multiple-choice scoring; unnormalized sums favour short options).

The prompt is run once per example; its KV cache is repeated for the options, which are scored together in one
more call. Prompts and options are tokenized exactly as the experts were trained on them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from peft_glider.local_router.data import IGNORE_INDEX, build_examples

from .tasks import Example

MAX_LENGTH = 256  # prompt + option tokens; prompts are cut from the left (the question sits at the end)


def tokenize_options(example: Example, tokenizer: Any) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [option ids]) with the tokenization of the expert training pairs (no end-of-text token)."""
    pairs = [(example.prompt, " " + option) for option in example.options]
    rows = build_examples(pairs, tokenizer, is_encoder_decoder=False, max_length=MAX_LENGTH)
    prompts = [[token for token, label in zip(row.input_ids, row.labels) if label == IGNORE_INDEX] for row in rows]
    options = []
    for row in rows:
        target = [label for label in row.labels if label != IGNORE_INDEX]
        if tokenizer.eos_token_id is not None and target[-1:] == [tokenizer.eos_token_id]:
            target = target[:-1]
        options.append(target)
    return min(prompts, key=len), options  # each is a suffix of the prompt: the shortest fits every option


@torch.no_grad()
def option_log_likelihoods(model: Any, prompt: list[int], options: Sequence[list[int]], pad_token_id: int) -> torch.Tensor:
    """(num_options,) summed log-probabilities of each option's tokens after the prompt."""
    output = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    first = output.logits[0, -1].float().log_softmax(-1)  # (vocab,)
    scores = torch.stack([first[option[0]] for option in options])
    rest = max(len(option) for option in options) - 1
    if rest > 0:  # the options' later tokens, all options in one call over the repeated prompt cache
        cache = output.cache
        cache.batch_repeat_interleave(len(options))
        input_ids = torch.full((len(options), rest), pad_token_id)
        attention_mask = torch.zeros((len(options), len(prompt) + rest), dtype=torch.long)
        attention_mask[:, : len(prompt)] = 1
        for row, option in enumerate(options):
            input_ids[row, : len(option) - 1] = torch.tensor(option[:-1])
            attention_mask[row, len(prompt) : len(prompt) + len(option) - 1] = 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
        log_probs = logits.float().log_softmax(-1)  # (num_options, rest, vocab)
        for row, option in enumerate(options):
            if len(option) > 1:
                positions = torch.arange(len(option) - 1)
                scores[row] += log_probs[row, positions, torch.tensor(option[1:])].sum()
    return scores


def rank_classify(model: Any, tokenizer: Any, examples: Sequence[Example], desc: str = "") -> list[bool]:
    """Whether the model ranks a correct option first by log-likelihood per character, per example."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = []
    for example in tqdm(examples, desc=desc, leave=False, mininterval=5):
        prompt, options = tokenize_options(example, tokenizer)
        characters = torch.tensor([len(" " + option) for option in example.options], dtype=torch.float32)
        scores = option_log_likelihoods(model, prompt, options, pad_token_id) / characters
        hits.append(int(scores.argmax()) in example.correct)
    return hits
