"""Expert file reading: tensors read one at a time from safetensors files, as private copies."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_glider.experts import SafetensorsReader


def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=generator),
        "b.f16": torch.randn(4, 2, generator=generator).half(),
        "c.bf16": torch.randn(2, 7, generator=generator).bfloat16(),
        "d.f64": torch.randn(6, generator=generator, dtype=torch.float64),
        "e.i64": torch.arange(5),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = SafetensorsReader(str(path))
    expected = load_file(str(path))
    assert sorted(reader.keys) == sorted(expected)  # metadata is not a tensor
    for key, tensor in expected.items():
        got = reader.read(key)
        assert reader.shape(key) == tuple(tensor.shape)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
        if got.dtype != torch.bool and got.numel():  # a private, writable copy: the next read is unchanged
            got.add_(1)
            assert torch.equal(reader.read(key), tensor), key


def test_reader_names_a_truncated_file(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"the file has \d+ bytes, its header describes \d+"):
        SafetensorsReader(str(path))


def test_a_library_keeps_no_copy_of_its_experts_shipped_gates(tmp_path):
    """Shipped gates are read when installed (and again when asked), not held by the library beside the layers'."""
    import dataclasses

    from conftest import make_expert, tiny_llama
    from peft import get_peft_model

    from peft_glider import GliderConfig, save_gates

    folder = make_expert(tiny_llama, tmp_path / "e0", seed=1)
    gates = {"model.layers.0.self_attn.q_proj": torch.randn(32), "model.layers.0.self_attn.v_proj": torch.randn(32),
             "model.layers.1.self_attn.q_proj": torch.randn(32), "model.layers.1.self_attn.v_proj": torch.randn(32)}
    save_gates(gates, folder)
    model = get_peft_model(tiny_llama(), GliderConfig(experts=[folder], top_k=1))
    [expert] = model.base_model._libraries["default"].experts
    held = [value for field in dataclasses.fields(expert) for value in [getattr(expert, field.name)]
            if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())]
    assert not held
    torch.testing.assert_close(model.base_model.get_gates()["e0"], gates)  # installed all the same
    assert expert.gates.keys() == gates.keys()
