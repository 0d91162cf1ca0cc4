"""Data records in the formats the ecosystem uses (TRL's prompt-completion and conversational ones, Glider's own,
a `datasets.Dataset`) become the same samples, for instructions and for gate training."""

from __future__ import annotations

import pytest
import torch
from conftest import make_expert, tiny_chat_model

from peft_glider import train_expert_gates
from peft_glider.local_router import GateTrainingArguments
from peft_glider.records import as_sample

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": "w7"}]


def test_every_format_becomes_a_text_or_a_pair():
    assert as_sample("w1 w2") == "w1 w2"
    assert as_sample(("w1", "w2")) == as_sample(["w1", "w2"]) == ("w1", "w2")
    assert as_sample({"input": "w1", "target": "w2"}) == ("w1", "w2")
    assert as_sample({"text": "w1 w2"}) == "w1 w2"
    assert as_sample({"prompt": "w1", "completion": "w2"}) == ("w1", "w2")
    assert as_sample({"messages": CHAT}) == ("system: be brief\nuser: w5 w6", "w7")
    assert as_sample({"prompt": CHAT[:2], "completion": CHAT[2:]}) == ("system: be brief\nuser: w5 w6", "w7")
    assert as_sample({"messages": CHAT[:2]}) == "system: be brief\nuser: w5 w6"  # no answer: a text
    _, tokenizer = tiny_chat_model()
    templated = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert as_sample({"messages": CHAT}, tokenizer) == (templated, "w7")
    with pytest.raises(ValueError, match=r"keys \['question'\]: expected .*\{\"messages\"\}"):
        as_sample({"question": "w1"})
    with pytest.raises(TypeError, match="a int: expected a text"):
        as_sample(3)


def test_gate_training_on_a_dataset_of_conversations_equals_the_same_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    model_factory = lambda: tiny_chat_model()[0]  # noqa: E731
    _, tokenizer = tiny_chat_model()
    expert = make_expert(model_factory, tmp_path / "e", seed=3)
    conversations = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                                   {"role": "assistant", "content": f"w{i + 2}"}]} for i in range(4, 30)]
    pairs = [(tokenizer.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True),
              c["messages"][1]["content"]) for c in conversations]
    args = GateTrainingArguments(steps=3, batch_size=4)
    from_dataset = train_expert_gates(model_factory(), expert, datasets.Dataset.from_list(conversations), tokenizer,
                                      args, save=False)
    from_pairs = train_expert_gates(model_factory(), expert, pairs, tokenizer, args, save=False)
    assert from_dataset.keys() == from_pairs.keys()
    for module, gate in from_pairs.items():
        torch.testing.assert_close(from_dataset[module], gate, atol=0, rtol=0)
        assert gate.abs().sum() > 0
