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
