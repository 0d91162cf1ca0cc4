"""A resident-experts budget (`GliderConfig(max_resident_experts=N)`): the layers hold at most N experts' factors,
read from their files when a call's candidates need them, least recently used evicted; routing is unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_glider import GliderConfig
from peft_glider.residency import BudgetExceededError

from conftest import input_ids, make_expert, random_gates, tiny_llama
from test_library_versions import HoldBetweenLayers

NUM_EXPERTS = 6
MODULES = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def experts(tmp_path) -> list[str]:
    """Experts on the same modules: a row's candidates are the same at every module."""
    return [make_expert(tiny_llama, tmp_path / f"e{i}", seed=500 + i, target_modules=MODULES) for i in range(NUM_EXPERTS)]


@pytest.fixture
def mixed_experts(tmp_path) -> list[str]:
    """Odd experts also adapt up_proj: there a row's candidates are its best odd experts."""
    return [make_expert(tiny_llama, tmp_path / f"m{i}", seed=500 + i, target_modules=MODULES[: 2 + i % 2])
            for i in range(NUM_EXPERTS)]


def build(experts: list[str], **config):
    config = {"top_k": 2, "alpha": 5.0, "candidates": 2, "save_expert_weights": False, **config}
    model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, **config))
    model.base_model.set_gates(random_gates(model.base_model, seed=2))
    return model


def scores(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))


def logits(model, ids, row_scores) -> torch.Tensor:
    with torch.no_grad(), model.base_model.global_scores(row_scores):
        return model(input_ids=ids).logits


def resident_factor_rows(model) -> dict[str, int]:
    """Rank rows of factors each layer holds now."""
    return {name: layer.glider_A["default"].shape[0] for name, layer in model.base_model.glider_layers().items()}


def test_the_residency_alone_keeps_every_gate_in_one_place_and_a_running_call_s_version(experts):
    """The residency's own interface: make experts hot (least recently used evicted), an expert's gate wherever it
    lives, new gates placed where their experts are; a version taken before an eviction keeps its factors and gates."""
    glider = build(experts, max_resident_experts=2).base_model
    residency = glider._libraries["default"].residency
    module = "model.layers.0.self_attn.q_proj"
    expected = glider.get_gates()  # build set random gates for every expert: all cold so far
    assert not residency.hot and residency.slots().of_expert.tolist() == [-1] * NUM_EXPERTS
    first = residency.make_resident(["e0", "e1"])
    assert dict(residency.hot) == {"e0": 0, "e1": 1}
    held = first.layers[module].bank.A.clone()
    second = residency.make_resident(["e4"])  # e0 is the least recently used: evicted, e4 takes its slot
    assert dict(residency.hot) == {"e1": 1, "e4": 0}
    assert residency.slots().of_expert.tolist() == [-1, 1, -1, -1, 0, -1]
    assert torch.equal(first.layers[module].bank.A, held)  # a call holding the first version keeps e0's factors
    assert torch.equal(first.layers[module].gate_of(0), expected["e0"][module])  # and its gate row
    assert second.layers[module].gate_of(0) is None  # e0 is cold now: its gate was written back
    for index, name in enumerate(second.expert_names):
        assert torch.equal(residency.gate_of(second.layers[module], module, index), expected[name][module])
    full = residency.full_gates(second.layers[module], module)
    assert torch.equal(full, torch.stack([expected[name][module] for name in second.expert_names]))
    width = full.shape[1]
    new = {1: torch.full((width,), 1.0), 2: torch.full((width,), 2.0)}  # e1 is hot (slot 1), e2 cold
    rows = residency.place_gates(second.layers[module], module, new)
    assert list(rows) == [1] and torch.equal(rows[1], new[1])
    assert torch.equal(residency.cold.read(module, "e2", width), new[2])
    with pytest.raises(BudgetExceededError, match="3 experts"):
        residency.make_resident(["e0", "e2", "e3"])
    with pytest.raises(KeyError, match="unknown expert"):
        residency.make_resident(["e9"])


@pytest.mark.parametrize("rows", [1, 2])
def test_a_budget_routes_exactly_as_every_expert_resident_and_holds_at_most_the_budget(mixed_experts, rows):
    # a row needs up to 2 candidates at q/v (all experts) and 2 more at up_proj (odd experts only)
    everything, budgeted = build(mixed_experts), build(mixed_experts, max_resident_experts=4 * rows)
    library = budgeted.base_model._libraries["default"]
    assert set(resident_factor_rows(budgeted).values()) == {0}  # nothing read at build
    ids = input_ids(batch=rows)
    for seed in range(12):  # distinct queries: the resident set turns over
        row_scores = scores(rows, seed)
        torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(everything, ids, row_scores))
        assert len(library.residency.hot) <= 4 * rows
        for name, held in resident_factor_rows(budgeted).items():  # rank 4 each, only the resident ones adapting
            adapting = [e for e in library.residency.hot if name.endswith(tuple(MODULES[: 2 + int(e[1:]) % 2]))]
            assert held == 4 * len(adapting), (name, held, list(library.residency.hot))


def test_the_least_recently_used_expert_is_evicted(experts):
    budgeted = build(experts, max_resident_experts=3, candidates=1, top_k=1)
    library, ids = budgeted.base_model._libraries["default"], input_ids(batch=1)
    for best in (0, 1, 2, 0, 3):  # one candidate per call: expert `best`; 1 is then the least recently used
        logits(budgeted, ids, torch.nn.functional.one_hot(torch.tensor([best]), NUM_EXPERTS).float())
    assert list(library.residency.hot) == ["e2", "e0", "e3"]


def test_a_call_that_needs_more_than_the_budget_is_refused_naming_the_knob(experts):
    budgeted = build(experts, max_resident_experts=3)
    with pytest.raises(ValueError, match="max_resident_experts=3"):
        with torch.no_grad():
            budgeted(input_ids=input_ids())  # no global scores: every expert
    with pytest.raises(ValueError, match="more than max_resident_experts=3"):
        logits(budgeted, input_ids(batch=2), torch.tensor([[9.0, 8, 0, 0, 0, 0], [0, 0, 9, 8, 0, 0]]))  # 4 experts
    # a library within its budget serves calls without global scores too
    everything, roomy = build(experts), build(experts, max_resident_experts=NUM_EXPERTS)
    with torch.no_grad():
        torch.testing.assert_close(roomy(input_ids=input_ids()).logits, everything(input_ids=input_ids()).logits)


def test_a_trace_inside_scores_routes_resident_experts_only(experts):
    budgeted = build(experts, max_resident_experts=2)
    glider = budgeted.base_model
    with torch.no_grad(), glider.routing_trace() as trace:
        with pytest.raises(RuntimeError, match="no candidates"):  # a trace alone gives no candidates
            budgeted(input_ids=input_ids(batch=1))
    row_scores = scores(1, seed=3)
    with torch.no_grad(), glider.global_scores(row_scores), glider.routing_trace() as trace:
        budgeted(input_ids=input_ids(batch=1))
    chosen = set().union(*(torch.cat(s, 1).unique().tolist() for s in trace.selections.values()))
    assert chosen <= {glider.expert_names.index(name) for name in glider._libraries["default"].residency.hot}


def test_generate_with_beams_under_a_budget_equals_every_expert_resident(experts):
    everything, budgeted = build(experts), build(experts, max_resident_experts=4)
    row_scores, ids = scores(2, seed=5), input_ids(batch=2, length=5)

    def generate(model):
        with torch.no_grad(), model.base_model.global_scores(row_scores):
            return model.generate(input_ids=ids, max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)

    assert torch.equal(generate(budgeted), generate(everything))


def test_a_call_held_mid_forward_keeps_the_experts_another_call_evicts(experts):
    everything, budgeted = build(experts), build(experts, max_resident_experts=2)
    library, ids = budgeted.base_model._libraries["default"], input_ids(batch=1)
    first, second = torch.tensor([[9.0, 8, 0, 0, 0, 0]]), torch.tensor([[0.0, 0, 9, 8, 0, 0]])
    hold = HoldBetweenLayers(budgeted)
    held = hold.run(lambda: logits(budgeted, ids, first), lambda: logits(budgeted, ids, second))
    assert set(library.residency.hot) == {"e2", "e3"}  # the second call evicted both of the first call's experts
    torch.testing.assert_close(held, logits(everything, ids, first))


def test_an_expert_whose_files_vanished_or_changed_is_refused_naming_it(experts):
    budgeted, everything = build(experts, max_resident_experts=2), build(experts)
    shutil.rmtree(experts[4])
    with pytest.raises(RuntimeError, match="Expert 'e4' could not be read"):
        logits(budgeted, input_ids(batch=1), torch.tensor([[0.0, 0, 0, 0, 9, 8]]))
    weights = f"{experts[3]}/adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: value * 2 for key, value in tensors.items()}, weights, metadata={"format": "pt"})  # same layout
    with pytest.raises(RuntimeError, match="Expert 'e3' changed since it was opened"):
        logits(budgeted, input_ids(batch=1), torch.tensor([[0.0, 0, 0, 9, 0, 8]]))
    # nothing half-done: the experts still there serve as before
    row_scores = torch.tensor([[9.0, 8, 0, 0, 0, 0]])
    torch.testing.assert_close(logits(budgeted, input_ids(batch=1), row_scores),
                               logits(everything, input_ids(batch=1), row_scores))


def test_edits_under_a_budget(experts, tmp_path):
    budgeted = build(experts[:5], max_resident_experts=2)
    glider = budgeted.base_model
    library, ids = glider._libraries["default"], input_ids(batch=1)
    logits(budgeted, ids, torch.tensor([[9.0, 8, 0, 0, 0]]))
    glider.remove_expert("e0")
    assert list(library.residency.hot) == ["e1"]
    glider.add_expert({"source": experts[5], "name": "e5"})
    glider.set_gates(random_gates(glider, seed=2))
    reference = build([experts[i] for i in (1, 2, 3, 4, 5)])
    reference.base_model.set_gates(random_gates(reference.base_model, seed=2))
    row_scores = torch.tensor([[0.0, 0, 0, 8, 9]])  # the newcomer and e4
    torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(reference, ids, row_scores))
    assert set(library.residency.hot) == {"e4", "e5"}


def test_a_budget_makes_a_router_only_adapter_and_survives_save_and_load(experts, tmp_path):
    assert GliderConfig(experts=experts, max_resident_experts=2, candidates=2).save_expert_weights is False
    assert GliderConfig(experts=experts).save_expert_weights is True
    with pytest.raises(ValueError, match="max_resident_experts cannot be combined with save_expert_weights=True"):
        GliderConfig(experts=experts, max_resident_experts=2, candidates=2, save_expert_weights=True)
    with pytest.raises(ValueError, match="max_resident_experts must be None or an integer >= top_k and candidates"):
        GliderConfig(experts=experts, max_resident_experts=2, candidates=3, save_expert_weights=False)
    budgeted = build(experts, max_resident_experts=3, save_expert_weights=None)  # the budget alone
    ids, row_scores = input_ids(batch=1), scores(1, seed=8)
    expected = logits(budgeted, ids, row_scores)
    budgeted.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert reloaded.peft_config["default"].max_resident_experts == 3
    assert set(resident_factor_rows(reloaded).values()) == {0}
    torch.testing.assert_close(logits(reloaded, ids, row_scores), expected)


def test_a_library_opens_hub_experts_concurrently_and_in_order(tmp_path, monkeypatch, hub):
    import threading
    from pathlib import Path

    from peft_glider import library as library_module

    for i in range(12):
        hub.commit_folder(f"owner/c{i}", Path(make_expert(tiny_llama, tmp_path / f"c{i}", seed=600 + i)))
    local = make_expert(tiny_llama, tmp_path / "local", seed=700)
    in_flight, most, threads, changed = [0], [0], {}, threading.Condition()
    real_load = library_module.load_expert

    def counting_load(entry, *args):
        threads[entry["name"]] = threading.get_ident()
        with changed:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            changed.notify_all()
            if entry["name"] != "local":  # make overlap happen: wait (2 s at most) until the pool is full
                changed.wait_for(lambda: in_flight[0] >= library_module.OPEN_WORKERS, timeout=2)
        try:
            return real_load(entry, *args)
        finally:
            with changed:
                in_flight[0] -= 1

    monkeypatch.setattr(library_module, "load_expert", counting_load)
    sources = [f"owner/c{i}" for i in range(6)] + [local] + [f"owner/c{i}" for i in range(6, 12)]
    model = get_peft_model(tiny_llama(), GliderConfig(experts=sources))
    # Hub experts in threads, up to the limit at once (the local one may overlap them)
    assert library_module.OPEN_WORKERS <= most[0] <= library_module.OPEN_WORKERS + 1
    assert threads["local"] == threading.get_ident()  # a local folder in this thread
    assert model.base_model.expert_names == [f"c{i}" for i in range(6)] + ["local"] + [f"c{i}" for i in range(6, 12)]


def test_a_saved_budget_adapter_opens_without_reading_any_factor(experts, tmp_path, monkeypatch):
    from peft_glider import experts as expert_io

    budgeted = build(experts, max_resident_experts=2)
    ids, row_scores = input_ids(batch=1), torch.tensor([[9.0, 8, 0, 0, 0, 0]])
    expected = logits(budgeted, ids, row_scores)
    budgeted.save_pretrained(tmp_path / "saved")
    reads: list[str] = []
    real_read = expert_io.SafetensorsReader.read
    monkeypatch.setattr(expert_io.SafetensorsReader, "read",
                        lambda reader, key: reads.append(reader.path) or real_read(reader, key))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert reads == []  # pins, gates and layouts only
    torch.testing.assert_close(logits(reloaded, ids, row_scores), expected)
    assert {path.split("/")[-2] for path in reads} == {"e0", "e1"}  # the call's candidates, read when it began
    # an expert changed since the adapter was saved is refused when first needed, naming it
    weights = f"{experts[2]}/adapter_model.safetensors"
    save_file({key: value * 2 for key, value in load_file(weights).items()}, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="Expert 'e2' changed since it was opened"):
        logits(reloaded, ids, torch.tensor([[0.0, 0, 9, 8, 0, 0]]))


def test_threads_with_different_candidates_under_a_small_budget_route_as_every_expert_resident(experts):
    """4 threads x 60 calls, each call with its own candidates, against a budget that holds only two calls' worth:
    experts are evicted and read again all the time, and every output equals full residency's, nothing raises."""
    import threading

    everything, budgeted = build(experts), build(experts, max_resident_experts=4)
    library = budgeted.base_model._libraries["default"]
    queries = [torch.nn.functional.one_hot(torch.tensor([[a, b]]), NUM_EXPERTS).float().sum(1) * 5
               for a, b in ((0, 1), (2, 3), (4, 5), (1, 4), (3, 5), (0, 2))]  # 6 different candidate pairs
    ids = input_ids(batch=1)
    expected = [logits(everything, ids, q) for q in queries]
    errors, wrong, reads = [], [], [0]
    real_fetch = library.residency._fetch
    library.residency._fetch = lambda expert: reads.__setitem__(0, reads[0] + 1) or real_fetch(expert)

    def serve(thread: int) -> None:
        try:
            for n in range(60):
                q = (thread + n) % len(queries)
                if not torch.allclose(logits(budgeted, ids, queries[q]), expected[q], atol=1e-6, rtol=0):
                    wrong.append(q)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not wrong, (errors[:3], wrong[:5])
    assert len(library.residency.hot) <= 4 and reads[0] > 20  # the budget turned over many times


def test_training_steps_inside_one_global_scores_context_under_a_budget_follow_the_gates(experts):
    """Under a budget the candidates' router rows are computed from their gates; inside one context (one call) a
    training loop's second step must see the gates the optimizer just moved, through a fresh graph, as without a
    budget."""
    ids, row_scores = input_ids(batch=2), scores(2, seed=4)

    def two_steps(model) -> list[torch.Tensor]:
        model.train()
        gates = [p for n, p in model.named_parameters() if "glider_gates" in n]
        optimizer = torch.optim.SGD(gates, lr=1.0)
        losses = []
        with model.base_model.global_scores(row_scores):
            for _ in range(2):
                loss = model(input_ids=ids).logits.square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
        return losses

    budgeted = two_steps(build(experts, max_resident_experts=4))
    unbounded = two_steps(build(experts))
    torch.testing.assert_close(torch.stack(budgeted), torch.stack(unbounded))
    assert budgeted[1] != budgeted[0]


# ---------------------------------------------------------------------- gates follow the factors


def gate_rows(model) -> dict[str, tuple]:
    """The shape of each layer's gate parameter: what the layers hold of the gates."""
    layers = model.base_model.glider_layers()
    return {name: tuple(layer.gate_parameter("default").shape) for name, layer in layers.items()}


def assert_same_gates(model, reference) -> None:
    got, expected = model.base_model.get_gates(), reference.base_model.get_gates()
    assert got.keys() == expected.keys()
    for expert in expected:
        assert got[expert].keys() == expected[expert].keys()
        for module in expected[expert]:
            torch.testing.assert_close(got[expert][module], expected[expert][module], msg=f"{expert} at {module}")


def test_layers_hold_the_gates_of_the_budget_only_and_the_rest_reads_back_exactly(experts):
    everything, budgeted = build(experts), build(experts, max_resident_experts=2)
    widths = {name: shape[1] for name, shape in gate_rows(everything).items()}
    assert gate_rows(everything) == {name: (NUM_EXPERTS, width) for name, width in widths.items()}
    assert gate_rows(budgeted) == {name: (2, width) for name, width in widths.items()}  # not E rows
    parameters = [layer.gate_parameter("default") for layer in budgeted.base_model.glider_layers().values()]
    assert_same_gates(budgeted, everything)  # every gate cold, in the store
    ids = input_ids(batch=1)
    for seed in range(8):  # the resident set turns over
        row_scores = scores(1, seed)
        torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(everything, ids, row_scores))
    assert_same_gates(budgeted, everything)
    # the parameters an optimizer holds stay the same objects, with the same budget rows, through every change
    budgeted.base_model.add_expert({"source": experts[0], "name": "again"})
    everything.base_model.add_expert({"source": experts[0], "name": "again"})
    new_gates = random_gates(everything.base_model, seed=9)
    for model in (budgeted, everything):
        model.base_model.set_gates(new_gates)
    assert [layer.gate_parameter("default") for layer in budgeted.base_model.glider_layers().values()] == parameters
    assert gate_rows(budgeted) == {name: (2, width) for name, width in widths.items()}
    assert_same_gates(budgeted, everything)
    row_scores = torch.randn(1, NUM_EXPERTS + 1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(everything, ids, row_scores))


def test_gates_trained_while_resident_are_kept_when_evicted_and_saved_whole(experts, tmp_path):
    from peft.utils import get_peft_model_state_dict

    everything, budgeted = build(experts), build(experts, max_resident_experts=2)
    ids, first = input_ids(batch=1), torch.tensor([[9.0, 8, 0, 0, 0, 0]])
    for model in (everything, budgeted):  # one optimizer step on the gates of e0 and e1, resident in `budgeted`
        model.train()
        optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "glider_gates" in n], lr=0.5)
        with model.base_model.global_scores(first):
            model(input_ids=ids).logits.square().mean().backward()
        optimizer.step()
        model.eval()
    logits(budgeted, ids, torch.tensor([[0.0, 0, 9, 8, 0, 0]]))  # e0 and e1 evicted: their trained gates written back
    assert not {"e0", "e1"} & set(budgeted.base_model._libraries["default"].residency.hot)
    assert_same_gates(budgeted, everything)
    torch.testing.assert_close(logits(budgeted, ids, first), logits(everything, ids, first))
    saved = get_peft_model_state_dict(budgeted)  # what a checkpoint holds: every expert's gates, as without a budget
    expected = get_peft_model_state_dict(everything)
    gate_keys = sorted(key for key in expected if "glider_gates" in key)
    assert gate_keys and gate_keys == sorted(key for key in saved if "glider_gates" in key)
    for key in gate_keys:
        torch.testing.assert_close(saved[key], expected[key], msg=key)
    budgeted.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert gate_rows(reloaded) == gate_rows(budgeted)
    assert_same_gates(reloaded, everything)
    torch.testing.assert_close(logits(reloaded, ids, first), logits(everything, ids, first))


def test_a_copied_budgeted_model_keeps_its_own_gates(experts):
    import copy

    budgeted = build(experts, max_resident_experts=2)
    logits(budgeted, input_ids(batch=1), scores(1, seed=1))
    copied = copy.deepcopy(budgeted)
    assert_same_gates(copied, budgeted)
    budgeted.base_model.set_gates(random_gates(budgeted.base_model, seed=11))  # the copy's store is its own
    assert_same_gates(copied, build(experts))


def test_arrow_prototypes_under_a_budget_route_as_every_expert_resident(experts):
    def arrow(**budget):  # the prototypes computed from the factors (no gates set)
        config = GliderConfig(experts=experts, local_router="arrow", top_k=2, alpha=5.0, candidates=2,
                              save_expert_weights=False, **budget)
        return get_peft_model(tiny_llama(), config)

    everything, budgeted = arrow(), arrow(max_resident_experts=2)
    assert_same_gates(budgeted, everything)
    ids = input_ids(batch=1)
    for seed in range(4):
        row_scores = scores(1, seed)
        torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(everything, ids, row_scores))


@pytest.mark.parametrize("budget", [None, 6])
def test_gates_cast_in_place_are_followed_by_routing_and_training(experts, budget):
    """`model.half()` gives the float32 gates new data in place (the parameter object stays) while the half factors
    stay the same tensors: routing must read the new data and gradients must reach the parameter."""
    model = get_peft_model(tiny_llama().half(), GliderConfig(experts=experts, top_k=2, candidates=2,
                                                              save_expert_weights=False, max_resident_experts=budget))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=2))
    parameter = next(iter(glider.glider_layers().values())).gate_parameter("default")
    assert parameter.dtype == torch.float32
    with torch.no_grad(), glider.global_scores(scores(1, seed=1)):
        model(input_ids=input_ids(batch=1))
    model.half()
    assert next(iter(glider.glider_layers().values())).gate_parameter("default") is parameter
    assert parameter.dtype == torch.float16
    with glider.global_scores(scores(1, seed=1)):
        model(input_ids=input_ids(batch=1)).logits.float().square().mean().backward()
    assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_shipped_gates_under_a_budget_go_to_the_store_a_few_experts_at_a_time(experts, monkeypatch):
    from peft_glider import library as library_module, save_gates

    generator = torch.Generator().manual_seed(21)
    modules = build(experts).base_model.get_gates()["e0"]  # every expert adapts the same modules
    shipped = {}
    for folder in experts:  # each expert ships its gates
        shipped[folder] = {module: torch.randn(gate.shape, generator=generator) for module, gate in modules.items()}
        save_gates(shipped[folder], folder)
    calls = []
    set_gates = library_module.ExpertLibrary.set_gates
    monkeypatch.setattr(library_module, "SHIPPED_GATES_AT_ONCE", 4)
    monkeypatch.setattr(library_module.ExpertLibrary, "set_gates",
                        lambda self, gates, how="set": calls.append(len(gates)) or set_gates(self, gates, how))

    def fresh(**budget):
        config = GliderConfig(experts=experts, top_k=2, alpha=5.0, candidates=2, save_expert_weights=False, **budget)
        return get_peft_model(tiny_llama(), config)

    budgeted = fresh(max_resident_experts=2)
    assert calls == [4, 2]  # never the whole library's gates at once
    calls.clear()
    everything = fresh()
    assert calls == [NUM_EXPERTS]
    assert_same_gates(budgeted, everything)
    for name, folder in zip(budgeted.base_model.expert_names, experts):
        for module, gate in budgeted.base_model.get_gates()[name].items():
            torch.testing.assert_close(gate, shipped[folder][module])
    ids, row_scores = input_ids(batch=1), scores(1, seed=6)
    torch.testing.assert_close(logits(budgeted, ids, row_scores), logits(everything, ids, row_scores))


def test_a_budgeted_model_copies_and_pickles_with_its_own_residency(experts):
    """After calls made experts hot, `copy.deepcopy` and pickle give a model that routes the same, saves every
    expert's gates, and keeps its own hot set and cold store: editing the copy's gates leaves the original's."""
    import copy
    import pickle

    model = build(experts, max_resident_experts=2)
    ids, row_scores = input_ids(batch=1), scores(1, seed=3)
    expected = logits(model, ids, row_scores)
    gates = model.base_model.get_gates()
    residency = model.base_model._libraries["default"].residency
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(clone, ids, row_scores), expected)
        own = clone.base_model._libraries["default"].residency
        assert own is not residency and dict(own.hot) == dict(residency.hot)
        saved = {key: value for key, value in clone.state_dict().items() if "glider_gates" in key}
        assert saved and all(value.shape[0] == NUM_EXPERTS for value in saved.values())  # every expert's, not the hot rows
        cold = next(name for name in clone.base_model.expert_names if name not in own.hot)
        module = "model.layers.0.self_attn.q_proj"
        clone.base_model.set_gates({cold: {module: torch.ones_like(gates[cold][module])}})
        assert torch.equal(clone.base_model.get_gates()[cold][module], torch.ones_like(gates[cold][module]))
        assert torch.equal(model.base_model.get_gates()[cold][module], gates[cold][module])
