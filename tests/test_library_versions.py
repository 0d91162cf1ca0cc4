"""Editing the expert library while it serves: every call sees one whole version of the library.

An edit (add_expert, remove_expert, set_gates, set_instruction_embeddings) builds the new version beside the
old one and publishes it in one step; a call keeps the version it began with to its end (a forward, a whole
generate with its KV cache, a routing context), and a call that begins after an edit sees all of it. The bad case
is made to happen on purpose: a forward is held between two decoder layers while another thread edits.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import pytest
import torch
from conftest import LetterEmbedder, input_ids, make_expert, random_gates, tiny_llama
from peft import get_peft_model

from peft_glider import GliderConfig, GlobalRouter, SamplesWriter

TASKS = {
    "expert0": ["add the numbers one two three", "sum seven and eight"],
    "expert1": ["translate bonjour to english", "translate merci"],
    "expert2": ["review awful boring movie", "review wonderful film"],
}
NEWCOMER_TASK = ["quiz capital of japan", "quiz largest planet"]
THREADS, CALLS = 4, 200  # serving threads in the stress test, calls each


def build(folders, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=2, alpha=2.0, **kwargs))


@pytest.fixture
def served(llama_experts):
    """Three experts with gates and embeddings, a router, and a fourth expert (adapting every module) to add."""
    model = build(llama_experts[:3])
    glider = model.base_model
    glider.set_gates(random_gates(glider, seed=4, scale=3.0))
    router = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None)
    router.describe_experts(model, TASKS, calibrate=False)
    newcomer_embedding = LetterEmbedder().embed([" ".join(NEWCOMER_TASK)])[0]
    return model, glider, llama_experts[3], newcomer_embedding


class HoldBetweenLayers:
    """Holds the first forward that reaches decoder layer 1 (in a chosen thread) until released."""

    def __init__(self, model, skip: int = 0) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        self.thread: int | None = None
        self.skip = skip  # calls through the layer to let pass first (generate: hold a later decoding step)
        layer = model.base_model.model.model.layers[1]
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if threading.get_ident() != self.thread or self.reached.is_set():
            return
        if self.skip:
            self.skip -= 1
            return
        self.reached.set()
        assert self.release.wait(timeout=60), "never released"

    def run(self, call, edit):
        """Run `call` in a thread, edit while it is held between layers 0 and 1; return the call's result."""
        result: dict = {}

        def serve() -> None:
            self.thread = threading.get_ident()
            try:
                result["value"] = call()
            except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
                result["error"] = error
                self.reached.set()

        worker = threading.Thread(target=serve)
        worker.start()
        assert self.reached.wait(timeout=60)
        try:
            edit()
        finally:
            self.release.set()
            worker.join(timeout=60)
            self.handle.remove()
        if "error" in result:
            raise result["error"]
        return result["value"]


def edits(glider, newcomer, newcomer_embedding):
    """Each kind of edit, as a zero-argument function (applied to the model of the `served` fixture)."""
    gates = random_gates(glider, seed=9, scale=3.0)
    embeddings = torch.randn(3, LetterEmbedder.dim, generator=torch.Generator().manual_seed(5))
    return {
        "add": lambda: glider.add_expert(newcomer, instruction_embedding=newcomer_embedding),
        "remove": lambda: glider.remove_expert("expert1"),
        "set_gates": lambda: glider.set_gates(gates),
        "set_instruction_embeddings": lambda: glider.set_instruction_embeddings(embeddings),
    }


@pytest.mark.parametrize("edit", ["add", "remove", "set_gates", "set_instruction_embeddings"])
@pytest.mark.parametrize("context", ["plain", "route", "trace"])
def test_a_forward_held_between_layers_finishes_on_the_version_it_began_with(served, edit, context):
    model, glider, newcomer, newcomer_embedding = served
    ids = input_ids(batch=2, length=6)
    prompts = ["sum four and five", "translate le chien"]

    def call():
        with torch.no_grad(), contextlib.ExitStack() as stack:
            trace = stack.enter_context(glider.routing_trace()) if context == "trace" else None
            if context == "route":
                stack.enter_context(glider.route(prompts))
            logits = model(input_ids=ids).logits
        return logits, (trace.as_dict() if trace is not None else None)

    before = call()
    after_edit = HoldBetweenLayers(model).run(call, edits(glider, newcomer, newcomer_embedding)[edit])
    torch.testing.assert_close(after_edit[0], before[0], atol=0, rtol=0)
    assert after_edit[1] == before[1]
    # A call that begins after the edit sees all of it: the same as the model built with the edited library.
    now = call()
    if edit in ("add", "remove", "set_gates"):
        assert not torch.equal(now[0], before[0])
    assert glider.routing_state().current_call() is None


def test_generate_with_kv_cache_across_an_edit_finishes_on_its_version(served):
    model, glider, newcomer, newcomer_embedding = served
    ids = input_ids(batch=2, length=5)

    def call():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            )
        return out.sequences, torch.stack(out.scores)

    before = call()
    # held at the third decoding step: the prompt and two tokens ran on the old library, four tokens remain
    sequences, scores = HoldBetweenLayers(model, skip=2).run(call, lambda: glider.remove_expert("expert1"))
    assert torch.equal(sequences, before[0])
    torch.testing.assert_close(scores, before[1], atol=0, rtol=0)
    assert glider.expert_names == ["expert0", "expert2"]


def test_threads_serving_while_another_edits_see_whole_versions_only(served):
    """4 serving threads x 200 calls against a thread cycling through every kind of edit: each output equals the
    clean result of one of the library's versions, and nothing raises."""
    model, glider, newcomer, newcomer_embedding = served
    gates_a = {"expert0": glider.get_gates()["expert0"]}
    gates_b = {"expert0": {m: torch.randn_like(g) * 3 for m, g in gates_a["expert0"].items()}}
    embeddings_a = glider.get_instruction_embeddings().clone()
    embeddings_b = torch.randn(4, LetterEmbedder.dim, generator=torch.Generator().manual_seed(2))
    cycle = [
        lambda: glider.add_expert(newcomer, instruction_embedding=newcomer_embedding),
        lambda: glider.set_gates(gates_b),
        lambda: glider.set_instruction_embeddings(embeddings_b),
        lambda: glider.remove_expert(newcomer.rsplit("/", 1)[-1]),
        lambda: glider.set_gates(gates_a),
        lambda: glider.set_instruction_embeddings(embeddings_a),
    ]
    inputs = [input_ids(batch=1 + i % 2, length=4 + i, seed=i) for i in range(3)]
    prompts = [["sum two and two"], ["translate merci beaucoup", "quiz biggest lake"], ["review fine film"]]

    def call(i: int, mode: str) -> torch.Tensor:
        with torch.no_grad(), (glider.route(prompts[i]) if mode == "route" else contextlib.nullcontext()):
            return model(input_ids=inputs[i]).logits

    keys = [(i, mode) for i in range(3) for mode in ("plain", "route")]
    clean: dict = {key: [] for key in keys}
    for step in range(len(cycle)):  # every version's clean results, computed alone
        for key in keys:
            clean[key].append(call(*key))
        cycle[step]()
    for key in keys:  # the cycle comes back to where it started
        torch.testing.assert_close(call(*key), clean[key][0], atol=0, rtol=0)

    stop, errors, torn, done_calls = threading.Event(), [], [], []  # list.append is atomic under the GIL

    def serve(thread: int) -> None:
        try:
            for n in range(CALLS):
                key = keys[(thread * 5 + n) % len(keys)]
                out = call(*key)
                done_calls.append(key)
                if not any(out.shape == c.shape and torch.allclose(out, c, atol=1e-6, rtol=0) for c in clean[key]):
                    torn.append((key, min(float((out - c).abs().max()) for c in clean[key] if c.shape == out.shape)))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    def edit() -> None:
        step = 0
        try:
            while not stop.is_set() or step % len(cycle):
                cycle[step % len(cycle)]()
                step += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append("editor: " + repr(error))

    servers = [threading.Thread(target=serve, args=(t,)) for t in range(THREADS)]
    editor = threading.Thread(target=edit)
    editor.start()
    for server in servers:
        server.start()
    for server in servers:
        server.join(timeout=600)
    stop.set()
    editor.join(timeout=600)
    assert not errors, errors[:5]
    assert len(done_calls) == THREADS * CALLS
    assert not torn, f"{len(torn)} of {THREADS * CALLS} outputs match no version of the library: {torn[:8]}"
