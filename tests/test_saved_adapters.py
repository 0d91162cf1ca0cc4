"""Adapters written by an earlier release still load and compute the same: a small self-contained Glider adapter
saved by the code of 4e1ea76 (before library versions) is checked in with the logits it gave then."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

SAVED = Path(__file__).parent / "data" / "glider-adapter-4e1ea76"


def test_an_adapter_saved_by_the_earlier_release_loads_and_routes_the_same():
    expected = load_file(str(SAVED / "expected.safetensors"))
    model = PeftModel.from_pretrained(tiny_llama(), SAVED)  # the experts' folders are gone: the checkpoint holds them
    glider = model.base_model
    assert glider.expert_names == ["arith", "words"]
    with torch.no_grad(), glider.global_scores(expected["scores"]):
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
    # and it goes on as a library of today: an edit, then routing again
    glider.remove_expert("words")  # top_k=1: one expert may remain
    assert glider.expert_names == ["arith"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=expected["input_ids"]).logits).all()
