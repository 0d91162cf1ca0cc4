"""Random sequences of library edits equal a rebuild with the same experts, gates and embeddings.

Each sequence adds, removes, sets gates and instruction embeddings, saves and reloads, and checks the model (logits
and routing trace under global scores) against one built from scratch with what the sequence says the library
holds. Run twice: with the real allocator, and with one that reuses every address (every parameter reports the
same `data_ptr` and version counter), so a cache keyed by where a tensor lives would hand back another tensor's
router rows: the bad case made to happen on purpose, not left to the allocator's luck.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import pytest
import torch
from conftest import LLAMA_MODULES, input_ids, make_expert, tiny_llama
from peft import PeftModel, get_peft_model

from peft_glider import GliderConfig

EMBEDDING_DIM = 6


@contextlib.contextmanager
def allocator_reusing_addresses(monkeypatch: pytest.MonkeyPatch):
    """Every nn.Parameter reports address 0 and version 0, as if each new one took the freed place of the last."""
    real_data_ptr = torch.Tensor.data_ptr
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "data_ptr", lambda t: 0 if isinstance(t, torch.nn.Parameter) else real_data_ptr(t))
        patch.setattr(torch.Tensor, "_version", property(lambda t: 0))
        yield


@pytest.fixture
def pool(tmp_path, llama_experts):
    """Six experts of different ranks and module sets (two adapt modules no other adapts)."""
    extra = [
        make_expert(tiny_llama, tmp_path / "expert4", seed=104, r=5, target_modules=["q_proj", "gate_proj", "up_proj"]),
        make_expert(tiny_llama, tmp_path / "expert5", seed=105, r=2, target_modules=["v_proj", "o_proj"]),
    ]
    return llama_experts + extra


def build(folders, gates, embeddings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=list(folders), top_k=2, alpha=2.0))
    glider = model.base_model
    glider.set_gates({name: gates[name] for name in glider.expert_names if gates[name]})
    glider.set_instruction_embeddings(torch.stack([embeddings[name] for name in glider.expert_names]))
    return model


def outputs(model, seed: int):
    glider = model.base_model
    ids = input_ids(batch=2, length=6, seed=seed)
    scores = torch.rand(2, len(glider.expert_names), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad(), glider.global_scores(scores), glider.routing_trace() as trace:
        logits = model(input_ids=ids).logits
    return logits, trace.as_dict()


def random_gate_set(model, expert: str, rng: random.Random) -> dict:
    generator = torch.Generator().manual_seed(rng.randrange(10_000))
    return {module: torch.randn(gate.shape, generator=generator) * 3 for module, gate in model.base_model.get_gates()[expert].items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("allocator", ["real", "reuses addresses"])
def test_random_edit_sequences_equal_a_rebuild(pool, tmp_path, monkeypatch, seed, allocator):
    rng = random.Random(seed)
    names = {folder: folder.rsplit("/", 1)[-1] for folder in pool}
    library = list(pool[:3])  # folders, in routing order
    gates = {names[f]: {} for f in pool}  # expert -> {module: gate} as the sequence set them (untouched: zeros)
    embeddings = {names[f]: torch.randn(EMBEDDING_DIM, generator=torch.Generator().manual_seed(i)) for i, f in enumerate(pool)}
    model = build(library, gates, embeddings)
    def same_address():
        return allocator_reusing_addresses(monkeypatch) if allocator != "real" else contextlib.nullcontext()

    operations = ["add", "remove", "set_gates", "set_embeddings", "forward", "save_load", "add", "remove", "set_gates"]
    rng.shuffle(operations)
    done = []
    for step, operation in enumerate(operations + ["forward"]):
        glider = model.base_model
        outside = [f for f in pool if f not in library]
        if operation == "add" and outside:
            folder = rng.choice(outside)
            with same_address(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                glider.add_expert(folder, instruction_embedding=embeddings[names[folder]])
            library.append(folder)
            gates[names[folder]] = {}  # an added expert starts without gates (none shipped)
        elif operation == "remove" and len(library) > 2:
            folder = rng.choice(library)
            with same_address():
                glider.remove_expert(names[folder])
            library.remove(folder)
        elif operation == "set_gates":
            expert = names[rng.choice(library)]
            gates[expert] = random_gate_set(model, expert, rng)
            with same_address():
                glider.set_gates({expert: gates[expert]})
        elif operation == "set_embeddings":
            for folder in library:
                embeddings[names[folder]] = torch.randn(EMBEDDING_DIM, generator=torch.Generator().manual_seed(50 + step))
            with same_address():
                glider.set_instruction_embeddings(torch.stack([embeddings[names[f]] for f in library]))
        elif operation == "save_load":
            folder = tmp_path / f"saved{step}"
            model.save_pretrained(folder)
            model = PeftModel.from_pretrained(tiny_llama(), folder)
        else:
            operation = "forward"
        done.append(operation)
        # after every edit, with the router rows of the previous state cached: outputs and traces equal a rebuild
        with same_address():
            edited = outputs(model, seed=step)
        rebuilt = outputs(build(library, gates, embeddings), seed=step)
        torch.testing.assert_close(edited[0], rebuilt[0], atol=1e-6, rtol=0, msg=f"after {done}")
        assert edited[1] == rebuilt[1], f"routing differs after {done}"
    assert {"add", "remove", "set_gates"} <= set(done)
