"""One model served from several threads: each call is routed by what its own thread set, nothing else.

4 threads x 50 calls on one model, each thread with its own prompts, batch sizes and routing contexts
(`global_scores`, `route`, `routing_trace`, none), first interleaved deliberately with barriers (every thread inside
its context before any runs, every thread done before any exits), then free running. Every output and every trace
must equal the same call run alone, and nothing may stay set afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import zlib
import pytest
import torch
from conftest import LetterEmbedder, random_gates, tiny_llama
from peft import get_peft_model

from peft_glider import GliderConfig, GlobalRouter, SamplesWriter

THREADS, CALLS, INTERLEAVED = 4, 50, 10
MODES = ("scores", "route", "trace", "plain", "scores+trace")


TASKS = {
    "expert0": ["add the numbers one two three", "sum seven and eight", "plus nine minus four"],
    "expert1": ["translate bonjour to english", "translate merci", "translate le chat noir"],
    "expert2": ["review awful boring movie", "review wonderful film", "review terrible acting"],
    "expert3": ["quiz capital of japan", "quiz largest planet", "quiz tallest mountain"],
}
PROMPTS = ["sum three and four", "translate au revoir", "review lovely story", "quiz deepest ocean", "zzz qqq"]


@pytest.fixture
def served(llama_experts):
    model = get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts, top_k=2, alpha=2.0))
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=4, scale=3.0))
    router = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None)
    router.describe_experts(model, TASKS, calibrate=False)
    return model, glider


def call_plan(thread: int, call: int) -> dict:
    """What call `call` of thread `thread` does: its mode, batch, token ids and scores (all seeded by both)."""
    seed = zlib.crc32(f"{thread}:{call}".encode())
    generator = torch.Generator().manual_seed(seed)
    batch = 1 + (thread + call) % 3
    return {
        "mode": MODES[(thread * 7 + call) % len(MODES)],
        "ids": torch.randint(3, 97, (batch, 3 + (call % 5)), generator=generator),
        "scores": torch.rand(batch, 4, generator=generator) * 2 - 1,
        "prompts": [PROMPTS[(seed + row) % len(PROMPTS)] for row in range(batch)],
    }


def run_call(model, glider, plan: dict, wait=lambda: None) -> tuple[torch.Tensor, dict]:
    """Run one planned call inside its routing contexts; `wait` runs inside them, before and after the forward."""
    mode = plan["mode"]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        trace = None
        if "scores" in mode:
            stack.enter_context(glider.global_scores(plan["scores"]))
        if mode == "route":
            stack.enter_context(glider.route(plan["prompts"]))
        if "trace" in mode:
            trace = stack.enter_context(glider.routing_trace())
        wait()
        logits = model(input_ids=plan["ids"]).logits
        wait()
    selections = {module: [t.clone() for t in calls] for module, calls in trace.selections.items()} if trace else {}
    return logits, selections


def test_four_threads_fifty_calls_each_equal_the_calls_run_alone(served):
    model, glider = served
    plans = {(t, c): call_plan(t, c) for t in range(THREADS) for c in range(CALLS)}
    alone = {key: run_call(model, glider, plan) for key, plan in plans.items()}
    assert {plan["mode"] for plan in plans.values()} == set(MODES)

    barrier = threading.Barrier(THREADS)
    results: dict = {}
    errors: list = []

    def serve(thread: int) -> None:
        try:
            for call in range(CALLS):
                wait = barrier.wait if call < INTERLEAVED else (lambda: None)
                results[thread, call] = run_call(model, glider, plans[thread, call], wait)
        except BaseException as error:  # noqa: BLE001 - reported below with the thread named
            barrier.abort()
            errors.append((thread, repr(error)))

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert not errors, errors
    assert len(results) == THREADS * CALLS

    wrong = []
    for key, (logits, selections) in results.items():
        expected_logits, expected_selections = alone[key]
        same = torch.equal(logits, expected_logits) or torch.allclose(logits, expected_logits, atol=1e-5, rtol=0)
        same_trace = selections.keys() == expected_selections.keys() and all(
            torch.equal(a, b) for m in selections for a, b in zip(selections[m], expected_selections[m])
        )
        if not (same and same_trace):
            wrong.append((key, plans[key]["mode"]))
    assert not wrong, f"{len(wrong)} calls differ from the same call run alone: {wrong[:8]}"

    # Nothing stays set: neither here nor in a fresh thread, and a plain call is routed locally.
    assert glider.routing_state().current_call() is None
    seen_in_thread = []
    checker = threading.Thread(target=lambda: seen_in_thread.append(glider.routing_state().current_call()))
    checker.start()
    checker.join()
    assert seen_in_thread == [None]
    plain = {"mode": "plain", "ids": plans[0, 0]["ids"]}
    torch.testing.assert_close(run_call(model, glider, plain)[0], run_call(model, glider, plain)[0], atol=0, rtol=0)


def test_threads_sharing_one_routing_context_share_its_kept_kernels_and_equal_the_calls_run_alone(served):
    """`asyncio.to_thread` and `contextvars.copy_context().run` carry one routing context into several threads:
    they share its call, so its kept compiled routing (`CallRouting.kernel_bindings`) is made and used by all of
    them at once (the first forwards start together at a barrier)."""
    model, glider = served
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1
    ids = {(t, c): torch.randint(3, 97, (2, 1 + c % 3), generator=torch.Generator().manual_seed(100 * t + c))
           for t in range(THREADS) for c in range(20)}  # fmt: skip
    with torch.no_grad(), glider.global_scores(scores):
        alone = {key: model(input_ids=batch).logits for key, batch in ids.items()}
    barrier = threading.Barrier(THREADS)
    results: dict = {}
    errors: list = []

    def serve(thread: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for call in range(20):
                    results[thread, call] = model(input_ids=ids[thread, call]).logits
        except BaseException as error:  # noqa: BLE001 - reported below with the thread named
            barrier.abort()
            errors.append((thread, repr(error)))

    with glider.global_scores(scores):
        shared = glider.routing_state().current_call()
        workers = [threading.Thread(target=contextvars.copy_context().run, args=(serve, t)) for t in range(THREADS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
    assert not errors, errors
    assert len(shared.kernel_bindings) == len(glider.glider_layers())  # the threads kept theirs in the one call
    wrong = [key for key, logits in results.items() if not torch.allclose(logits, alone[key], atol=1e-5, rtol=0)]
    assert not wrong, f"{len(wrong)} calls differ from the same call run alone: {wrong[:8]}"


def test_nested_contexts_restore_what_they_found_even_on_errors(served):
    model, glider = served
    outer, inner = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0]])
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), glider.global_scores(outer, alpha=100.0):
        first = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with glider.global_scores(inner, alpha=100.0):
                assert glider.routing_state().current_call().row_bias[0, 3] == 100.0
                raise RuntimeError("boom")
        assert glider.routing_state().current_call().row_bias[0, 0] == 100.0
        torch.testing.assert_close(model(input_ids=ids).logits, first, atol=0, rtol=0)
        with glider.routing_trace() as trace:  # a trace nested inside keeps the outer scores
            model(input_ids=ids)
            assert glider.routing_state().current_call().row_bias[0, 0] == 100.0
        first_choices = trace.counts("model.layers.0.self_attn.q_proj", first_choice_only=True)  # expert0 adapts it
        assert first_choices[0] == first_choices.sum() == 5
    assert glider.routing_state().current_call() is None
