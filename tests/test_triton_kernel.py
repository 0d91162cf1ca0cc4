"""The grouped Triton kernel against the per-pair float64 reference, in float32 and bfloat16, prefill and decode
shapes, mixed ranks and absent experts; and a Glider model routed through it equals the `concat` kernel.

Without a GPU the checks run on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is
imported, hence a subprocess running this file); with CUDA they run on the GPU as well.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def reference(x, A, BT, starts, ranks, scaling, indices, weights) -> torch.Tensor:
    """Per (token, choice) pair, in float64: `w * s_e * B_e A_e x`."""
    out = torch.zeros(x.shape[0], BT.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            rows = slice(starts[e], starts[e] + ranks[e])
            delta = BT[rows].double().T @ (A[rows].double() @ x[n].double())
            out[n] += float(weights[n, j]) * float(scaling[e]) * delta
    return out


def check_kernel(device: str, dtype: torch.dtype, tokens: int, k: int, ranks: list[int], d: int = 40, o: int = 70):
    from peft_glider import triton_kernels

    generator = torch.Generator().manual_seed(tokens * 31 + k)
    starts = [sum(ranks[:e]) for e in range(len(ranks))]
    A = torch.randn(sum(ranks), d, generator=generator).to(dtype)
    BT = torch.randn(sum(ranks), o, generator=generator).to(dtype)
    scaling = torch.rand(len(ranks), generator=generator) + 0.5
    present = torch.tensor([e for e, r in enumerate(ranks) if r > 0])
    indices = torch.stack([present[torch.randperm(len(present), generator=generator)[:k]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=generator), dim=-1)
    x = torch.randn(tokens, d, generator=generator).to(dtype)
    out = torch.randn(tokens, o, generator=generator).to(dtype)
    expected = out.double() + reference(x, A, BT, starts, ranks, scaling, indices, weights)
    to = dict(device=device)
    result = triton_kernels.add_selected_experts(
        x.to(**to), A.to(**to), BT.to(**to),
        (torch.tensor(starts, dtype=torch.int32, **to), torch.tensor(ranks, dtype=torch.int32, **to), scaling.to(**to)),
        indices.to(**to), weights.to(**to), out.to(**to), max(ranks),
    ).cpu().double()
    scale = expected.abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the sum is rounded into bfloat16 once
    assert (result - expected).abs().max().item() <= tolerance * scale, (dtype, tokens, k, ranks)


CASES = [
    (torch.float32, 70, 2, [3, 8, 0, 5, 17, 16]),  # prefill-like: several tiles per expert, mixed and absent ranks
    (torch.float32, 2, 1, [16] * 9),  # decode: two tokens among nine experts
    (torch.float32, 9, 3, [4, 4, 4, 4]),
    (torch.bfloat16, 40, 2, [8, 16, 0, 12]),
    (torch.float16, 3, 2, [16, 16, 16]),
]


def check_model(device: str) -> None:
    """A tiny Glider model routed through the Triton kernel gives the outputs of the `concat` kernel, with a DoRA
    expert and a biased one beside plain LoRAs."""
    sys.path.insert(0, os.path.dirname(__file__))
    import tempfile

    from conftest import input_ids, make_expert, random_gates, tiny_llama
    from peft import get_peft_model
    from test_lora_variants import peft_expert

    import peft_glider  # noqa: F401
    from peft_glider import GliderConfig

    with tempfile.TemporaryDirectory() as folder:
        experts = [make_expert(tiny_llama, f"{folder}/e{i}", seed=i, r=2 + 2 * i) for i in range(3)]
        experts.append(peft_expert(f"{folder}/dora", "llama", seed=5, target_modules=["q_proj", "v_proj"], use_dora=True))
        experts.append(peft_expert(f"{folder}/bias", "llama", seed=6, target_modules=["q_proj", "v_proj"], lora_bias=True))
        model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=2)).to(device)
    glider = model.base_model
    glider.set_gates(random_gates(glider))
    with torch.no_grad():
        glider.set_kernel("concat")
        expected = model(input_ids().to(device)).logits
        glider.set_kernel("triton")
        with glider.routing_trace() as trace:
            routed = model(input_ids().to(device)).logits
    assert trace.modules
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)


def run_all(device: str) -> None:
    for case in CASES:
        check_kernel(device, *case)
    check_model(device)


@pytest.mark.skipif(not __import__("peft_glider.kernels").kernels.triton_interpreter_usable(),
                    reason="Triton < 3.7's interpreter cannot run with NumPy >= 2.4 (compiled kernels can)")
def test_triton_kernel_under_the_interpreter_on_cpu():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "triton kernel checks passed on cpu" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_cuda():
    run_all("cuda")


def test_kernel_choices_are_bounded_and_bucketed(tmp_path):
    from conftest import make_expert, tiny_llama
    from peft import get_peft_model

    from peft_glider import GliderConfig, kernel_choice

    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(2)]
    model = get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=1))
    layer = next(iter(model.base_model.glider_layers().values()))
    bank = layer.expert_bank("default")
    for tokens in range(1, 3000, 7):  # one prompt length after another
        kernel_choice.choose_kernel(tokens, bank, 1, torch.float32)
    choices = kernel_choice.choices_for(bank)
    assert len(choices) <= choices.capacity
    assert kernel_choice.KernelChoices.key(300, 1, torch.float32, False, "cpu")[0] == 512
    assert "triton" not in kernel_choice.kernel_costs(64, bank, 1, torch.float32)  # auto never picks it on CPU
    assert kernel_choice.choose_kernel_cuda(bank, torch.float32, False) == "concat"  # a small library: the rule's answer
    import copy
    import pickle

    for clone in (copy.deepcopy(choices), pickle.loads(pickle.dumps(choices))):  # models are copied and pickled
        assert len(clone) == len(choices) and clone.get(next(clone.keys())) is not None


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    run_all("cpu")
    print("triton kernel checks passed on cpu")
