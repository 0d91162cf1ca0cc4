"""Phatgoose gate training: specialisation, determinism, gates travelling with experts, missing gates."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_expert, tiny_llama
from peft import LoraConfig, get_peft_model

from peft_glider import (
    GateTrainingArguments,
    GliderConfig,
    save_gates,
    train_expert_gates,
    train_gates,
    train_missing_gates,
    untrained_experts,
)

NUM_TASKS = 3
TASK_TOKENS = [(3, 33), (33, 65), (65, 97)]  # each synthetic task writes with its own slice of the vocabulary


def clustered_llama():
    """A tiny Llama whose token embeddings cluster by task, as words of one domain do in a pretrained LM."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        for low, high in TASK_TOKENS:
            centre = torch.randn(embeddings.shape[1], generator=generator)
            embeddings[low:high] = 0.5 * embeddings[low:high] + centre * embeddings.std()
    return model


def task_sequences(task: int, count: int, seed: int, length: int = 12) -> list[dict]:
    """Task t: counting upwards (mod its token range) from a random start, within its own tokens."""
    low, high = TASK_TOKENS[task]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(low, high, (count,), generator=generator).tolist()
    step = task + 1
    rows = []
    for start in starts:
        ids = [low + (start - low + step * i) % (high - low) for i in range(length)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def train_lora_expert(task: int, folder: Path) -> str:
    """A real specialist: LoRA trained on its task's sequences."""
    torch.manual_seed(task)
    model = get_peft_model(clustered_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = task_sequences(task, 64, seed=task)
    model.train()
    for step in range(30):
        batch = torch.tensor([row["input_ids"] for row in data[(step * 8) % 64 : (step * 8) % 64 + 8]])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def specialists(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("specialists")
    return [train_lora_expert(task, root / f"task{task}") for task in range(NUM_TASKS)]


def test_trained_gates_route_tokens_to_their_task_expert(specialists):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(clustered_llama(), GliderConfig(experts=specialists, top_k=1, alpha=0.0))
    args = GateTrainingArguments(steps=40, batch_size=8)
    for task, name in enumerate(model.base_model.expert_names):
        train_gates(model, name, task_sequences(task, 64, seed=10 + task), args=args, progress=False)
    assert untrained_experts(model) == []

    correct = total = 0
    for task in range(NUM_TASKS):
        held_out = torch.tensor([row["input_ids"] for row in task_sequences(task, 16, seed=99 + task)])
        with torch.no_grad(), model.base_model.routing_trace() as trace:
            model(input_ids=held_out)
        counts = trace.counts(first_choice_only=True)
        correct += int(counts[task])
        total += int(counts.sum())
    rate = correct / total
    # chance is 1/3; measured 0.835 on this setup (torch 2.13, CPU); the threshold leaves room for BLAS differences
    print(f"routing rate to the own-task expert: {rate:.3f}")
    assert rate >= 0.7, rate


def test_gate_training_is_deterministic_and_leaves_other_experts_alone(llama_experts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=1))
    glider = model.base_model
    other = {"expert1": {m: torch.randn(g.shape) for m, g in glider.get_gates()["expert1"].items()}}
    glider.set_gates(other)
    args = GateTrainingArguments(steps=5, batch_size=4, learning_rate=1e-2)
    data = task_sequences(0, 16, seed=0)
    first = train_gates(model, "expert3", data, args=args, progress=False)
    second = train_gates(model, "expert3", data, args=args, progress=False)
    assert set(first) == set(glider.get_gates()["expert3"])
    for module in first:
        assert first[module].abs().sum() > 0
        torch.testing.assert_close(first[module], second[module], atol=0, rtol=0)
    for module, gate in glider.get_gates()["expert1"].items():
        torch.testing.assert_close(gate, other["expert1"][module], atol=0, rtol=0)
    assert torch.equal(glider.get_gates()["expert3"][module], second[module])


def test_gates_travel_with_the_expert_and_missing_ones_warn(tmp_path, llama_experts):
    base = tiny_llama()
    data = task_sequences(1, 16, seed=1)
    args = GateTrainingArguments(steps=3, batch_size=4)
    gates = train_expert_gates(base, llama_experts[0], data, args=args)
    assert (Path(llama_experts[0]) / "glider_gates.safetensors").exists()
    assert not any("glider" in name for name, _ in base.named_modules())  # base model restored

    with pytest.warns(UserWarning, match=r"Experts \['expert1', 'expert2', 'expert3'\] carry no trained gates"):
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))
    picked_up = model.base_model.get_gates()["expert0"]
    for module, gate in gates.items():
        torch.testing.assert_close(picked_up[module], gate, atol=0, rtol=0)
    assert untrained_experts(model) == ["expert1", "expert2", "expert3"]

    with pytest.raises(KeyError, match=r"no data for untrained expert\(s\) \['expert3'\]"):
        train_missing_gates(model, {"expert1": data, "expert2": data}, args=args)
    trained = train_missing_gates(model, {name: data for name in ["expert1", "expert2", "expert3"]}, args=args)
    assert trained == ["expert1", "expert2", "expert3"] and untrained_experts(model) == []
    torch.testing.assert_close(model.base_model.get_gates()["expert0"][module], gates[module], atol=0, rtol=0)


def test_gates_file_for_other_modules_is_rejected(tmp_path, llama_experts):
    save_gates({"model.layers.0.mlp.up_proj": torch.zeros(32)}, llama_experts[0])
    with pytest.raises(ValueError, match="has a gate for module 'model.layers.0.mlp.up_proj', which it does not adapt"):
        get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts))


def test_text_and_pair_data_with_a_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2")
    expert = make_expert(tiny_llama, tmp_path / "e", seed=1)
    args = GateTrainingArguments(steps=2, batch_size=2)
    texts = ["w5 w6 w7 w8", "w9 w10 w11"]
    pairs = [("w5 w6", "w7"), ("w8 w9 w10", "w11 w12")]
    for data in (texts, pairs):
        gates = train_expert_gates(tiny_llama(), expert, data, tokenizer, args, save=False)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gates.values())
    with pytest.raises(TypeError, match="row 0 is a int"):
        train_expert_gates(tiny_llama(), expert, [3, 4], tokenizer, args, save=False)


def test_gate_training_touches_only_the_trained_expert(llama_experts):
    """Only expert e's factors enter the computation, so memory is one expert's forward/backward for any E:
    other experts' factors are poisoned with NaN and the trained gates stay finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2))
    glider = model.base_model
    trained = 1
    for layer in glider.glider_layers().values():
        rows = layer.glider_rank_expert["default"] != trained
        layer.glider_A["default"][rows] = float("nan")
        layer.glider_B["default"][rows] = float("nan")
    gates = train_gates(model, "expert1", task_sequences(0, 8, seed=0), args=GateTrainingArguments(steps=3, batch_size=4), progress=False)
    assert len(gates) == 6 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gates.values())


def test_datasets_dataset_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    expert = make_expert(tiny_llama, tmp_path / "e", seed=2)
    rows = task_sequences(0, 8, seed=0)
    args = GateTrainingArguments(steps=3, batch_size=4)
    from_list = train_expert_gates(tiny_llama(), expert, rows, args=args, save=False)
    from_dataset = train_expert_gates(tiny_llama(), expert, datasets.Dataset.from_list(rows), args=args, save=False)
    for module, gate in from_list.items():
        torch.testing.assert_close(from_dataset[module], gate, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"Dataset columns \['question'\]"):
        train_expert_gates(tiny_llama(), expert, datasets.Dataset.from_dict({"question": ["a"]}), args=args, save=False)


def test_gate_training_under_a_budget_smaller_than_the_library_equals_every_expert_resident(llama_experts):
    """Under max_resident_experts the expert under training is made resident, its gates are rows of the layers'
    parameters, and the other experts' gates (resident or in the store) stay as they are."""
    def train(**budget) -> tuple[dict, dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = GliderConfig(experts=llama_experts, top_k=1, candidates=1, save_expert_weights=False, **budget)
            model = get_peft_model(tiny_llama(), config)
        glider = model.base_model
        glider.set_gates({name: {m: torch.full(g.shape, 0.1 * i) for m, g in per_module.items()}
                          for i, (name, per_module) in enumerate(glider.get_gates().items())})
        args = GateTrainingArguments(steps=4, batch_size=4, learning_rate=1e-2)
        for name in ("expert3", "expert0"):  # with budget 1, training expert0 evicts expert3
            trained = train_gates(model, name, task_sequences(0, 16, seed=0), args=args, progress=False)
        return trained, glider.get_gates()

    (expected_trained, expected), (trained, gates) = train(), train(max_resident_experts=1)
    for module in expected_trained:
        torch.testing.assert_close(trained[module], expected_trained[module])
    assert gates.keys() == expected.keys()
    for name in expected:
        for module in expected[name]:
            torch.testing.assert_close(gates[name][module], expected[name][module], msg=f"{name} at {module}")
    trained3 = expected["expert3"]
    assert any(not torch.equal(gate, torch.full_like(gate, 0.3)) for gate in trained3.values())  # it did train
