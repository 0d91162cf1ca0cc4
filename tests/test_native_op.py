"""The compiled CPU kernel as torch operators: arguments checked in one place, fake implementations so that
torch.compile traces a Glider model through them, and a warning when it is missing."""

from __future__ import annotations

import pytest
import torch
from conftest import input_ids, make_expert, random_gates, tiny_llama
from peft import get_peft_model

from peft_glider import GliderConfig, native

needs_native = pytest.mark.skipif(not native.available(), reason="the compiled kernel is not built")


def operands(E=3, r=4, d=8, o=6, n=5, k=2):
    A, BT = torch.randn(E * r, d), torch.randn(E * r, o)
    return dict(x=torch.randn(n, d), A=A, BT=BT, row_start=torch.arange(0, E * r, r), rank=torch.full((E,), r),
                scaling=torch.ones(E), indices=torch.randint(0, E, (n, k)), weights=torch.rand(n, k),
                out=torch.zeros(n, o))


@needs_native
@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(5, 8, dtype=torch.float64)), "x must be float32 CPU"),
    (dict(out=torch.zeros(5, 7)), "out must be float32 CPU"),
    (dict(A=torch.randn(12, 8).T.contiguous().T), "A must be contiguous"),
    (dict(rank=torch.full((3,), 5)), "fall outside A and BT"),
    (dict(indices=torch.randint(0, 3, (5, 2)).int()), "indices (int64) and weights (float32)"),
    (dict(row_start=torch.arange(0, 12, 4).float()), "row_start must be a torch.int64"),
])
def test_bad_operands_are_refused_by_name_in_eager_and_through_the_operator(bad, message):
    args = {**operands(), **bad}
    order = ["x", "A", "BT", "row_start", "rank", "scaling", "indices", "weights", "out"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        native.add_selected_experts(*[args[name] for name in order])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.peft_glider.add_selected_experts(*[args[name] for name in order], True)


@needs_native
def test_operator_equals_the_eager_call():
    args = operands()
    order = ["x", "A", "BT", "row_start", "rank", "scaling", "indices", "weights"]
    eager = native.add_selected_experts(*[args[name] for name in order], args["out"].clone())
    through_op = args["out"].clone()
    torch.ops.peft_glider.add_selected_experts(*[args[name] for name in order], through_op, True)
    torch.testing.assert_close(through_op, eager, atol=0, rtol=0)


@needs_native
def test_torch_compile_traces_a_glider_model_through_the_operators(tmp_path):
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(3)]
    model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=2))
    glider = model.base_model
    glider.set_gates(random_gates(glider))
    glider.set_kernel("native")
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        graphs = []

        def recording_backend(graph_module, example_inputs):
            graphs.append(graph_module.code)
            return torch._dynamo.backends.debugging.aot_eager(graph_module, example_inputs)  # fake tensors

        logits = torch.compile(model, backend=recording_backend)(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    traced = "".join(graphs)
    assert "peft_glider.route_and_add" in traced  # the compiled kernel is in the graph, not a graph break


def test_float32_cpu_inference_without_the_compiled_kernel_warns_once(tmp_path, monkeypatch):
    import warnings

    from peft_glider import routing

    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setattr(routing, "_warned_no_native", False)
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(2)]
    model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=1))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="compiled CPU kernel is not built") as caught:
            model(input_ids())
        assert caught[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids())  # once per process
