"""`local_router="arrow"` against PEFT's own Arrow (`peft.create_arrow_model`) on the same experts."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_MODULES, input_ids, make_expert, tiny_llama
from peft import ArrowConfig, create_arrow_model, get_peft_model

from peft_glider import GliderConfig, routing


def test_top_right_singular_vector_matches_dense_svd():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 30, generator=generator), torch.randn(20, 4, generator=generator)
    expected = torch.linalg.svd(B @ A).Vh[0]
    got = routing.top_right_singular_vector(A, B)
    assert abs(float(got @ expected)) == pytest.approx(1.0, abs=1e-5)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_arrow_matches_peft_arrow(tmp_path, top_k):
    # PEFT finds prototypes by 15 power iterations, which only converge with a clear spectral gap; we use an exact
    # SVD of the factors. The experts get a dominant singular value so that both are exact.
    folders = [
        make_expert(tiny_llama, tmp_path / f"e{i}", seed=40 + i, r=4, target_modules=LLAMA_MODULES, scale=3.0, dominant=3.0)
        for i in range(4)
    ]
    ids = input_ids(batch=2, length=9)
    peft_arrow = create_arrow_model(
        tiny_llama(), folders, ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    )
    with torch.no_grad():
        expected = peft_arrow(input_ids=ids).logits

    model = get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=top_k, local_router="arrow", alpha=0.0))
    glider = model.base_model
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in glider.glider_layers().items()
    ]
    with torch.no_grad(), glider.routing_trace() as trace:
        got = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    # same prototypes (up to sign) and the same experts selected per token, module by module
    peft_modules = dict(peft_arrow.base_model.model.named_modules())
    for name, layer in glider.glider_layers().items():
        peft_protos = peft_modules[name].lora_arrow["arrow_router"].prototypes.float()
        ours = layer.glider_gates["default"].detach()
        cosines = (ours * peft_protos).sum(-1).abs()
        assert torch.all(cosines > 0.999), (name, cosines)
        u = inputs[name].reshape(-1, layer.in_features)
        peft_choice = (u @ peft_protos.T).abs().topk(top_k, dim=-1).indices.sort(-1).values
        our_choice = trace.selections[name][0].reshape(-1, top_k).sort(-1).values
        assert torch.equal(our_choice, peft_choice), name
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
