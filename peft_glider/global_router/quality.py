"""Is an instruction an instruction? A small writer (SmolLM2-135M) often echoes the prompt it was given, copies the
samples back, or loops on one phrase; embedding such text routes by the prompt's wording instead of the task. The
global router checks each written instruction here and, for a degenerate one, embeds the samples themselves instead
(what `SamplesWriter` would write) and reports it.

Hand-written: no well-kept library judges an LLM output against the prompt that produced it in these terms; the
checks are word n-gram counts, cheap enough for every instruction.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from ..records import Sample
from .writers import format_samples, instruction_prompt

ECHO_SHARE = 0.6  # at least this share of the instruction's word 4-grams also in the prompt: an echo
REPEAT_SHARE = 0.5  # fewer distinct word 3-grams than this share of them all: a loop
MIN_WORDS = 3  # fewer words: too short to name a task


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def degenerate_reason(instruction: str, samples: Sequence[Sample]) -> Optional[str]:
    """Why `instruction`, written from `samples`, is not a usable instruction; None if it is.

    Degenerate: empty or under `MIN_WORDS` words; an echo (most of its word 4-grams appear in the writer's prompt,
    i.e. in our request or in the samples); a loop (few distinct word 3-grams among many).
    """
    words = _words(instruction)
    if len(words) < MIN_WORDS:
        return f"too short ({len(words)} words)"
    grams = _ngrams(words, 4)
    if grams:
        prompt = set(_ngrams(_words(instruction_prompt(samples)), 4))
        copied = sum(gram in prompt for gram in grams) / len(grams)
        if copied >= ECHO_SHARE:
            source = "the samples" if set(grams) & set(_ngrams(_words(format_samples(samples)), 4)) else "the prompt"
            return f"an echo of {source} ({copied:.0%} of its word 4-grams are copied)"
    trigrams = _ngrams(words, 3)
    if len(trigrams) >= 8 and len(set(trigrams)) < REPEAT_SHARE * len(trigrams):
        return f"repeated ({len(set(trigrams))} distinct word 3-grams of {len(trigrams)})"
    return None
