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


def routing_operands(E=3, d=8, n=4, groups=2, k=2):
    args = operands(E=E, d=d, n=n, k=k)
    return dict(x=args["x"], rows=torch.randn(E, d), standardize=True, eps=1e-5, bias=torch.randn(groups, E), k=k,
                A=args["A"], BT=args["BT"], row_start=args["row_start"], rank=args["rank"], scaling=args["scaling"],
                out=args["out"])


@needs_native
@pytest.mark.parametrize("bad, message", [
    (dict(rows=torch.randn(3, 7)), "rows must be contiguous float32"),
    (dict(rows=torch.randn(8, 3).T), "rows must be contiguous float32"),
    (dict(k=4), "k=4 must lie in"),
    (dict(bias=torch.randn(2, 3).T.contiguous().T), "bias must be contiguous float32"),
    (dict(bias=torch.randn(3, 3)), "do not split into the bias's 3 groups"),
    (dict(x=torch.randn(8, 4).T), "x must be float32 CPU"),  # rows not contiguous
])
def test_bad_routing_operands_are_refused_by_name_bound_or_not_and_through_the_operator(bad, message):
    args = {**routing_operands(), **bad}
    order = ["x", "rows", "standardize", "eps", "bias", "k", "A", "BT", "row_start", "rank", "scaling", "out"]
    pattern = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        native.route_and_add(*[args[name] for name in order])
    with pytest.raises(ValueError, match=pattern):  # the experts' layout vouched for: everything else still checked
        native.route_and_add(*[args[name] for name in order], layout_checked=True)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.peft_glider.route_and_add(*[args[name] for name in order], True)
    with pytest.raises(ValueError, match=pattern):
        bound = native.RouteAndAdd(*[args[name] for name in order if name not in ("x", "out")])
        bound(args["x"], args["out"])


@needs_native
def test_a_bound_routing_call_equals_the_unbound_one_and_serves_any_token_count():
    args = routing_operands(n=6, groups=2)
    order = ["rows", "standardize", "eps", "bias", "k", "A", "BT", "row_start", "rank", "scaling"]
    bound = native.RouteAndAdd(*[args[name] for name in order])
    for n in (6, 2, 10):
        x, start = torch.randn(n, 8), torch.randn(n, 6)
        expected_out, out, untold = start.clone(), start.clone(), start.clone()
        expected = native.route_and_add(x, *[args[name] for name in order], expected_out)
        got = bound(x, out)
        assert got[0].tolist() == expected[0].tolist()
        torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
        torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
        assert bound(x, untold, selection=False) is None  # the selection kept on the C side: the same deltas
        torch.testing.assert_close(untold, expected_out, atol=0, rtol=0)


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


@needs_native
def test_a_binding_made_while_torch_compile_traced_is_refused_when_called_eagerly(monkeypatch):
    """Under tracing a binding takes no addresses (fake tensors have none); run eagerly it must refuse, never pass
    a null struct to C."""
    args = routing_operands()
    order = ["rows", "standardize", "eps", "bias", "k", "A", "BT", "row_start", "rank", "scaling"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bound = native.RouteAndAdd(*[args[name] for name in order])
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="made while torch.compile traced"):
        bound(args["x"], args["out"])
