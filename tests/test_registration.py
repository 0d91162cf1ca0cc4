"""Registration of the GLIDER PEFT method: idempotent, enum identity kept, needed for loading."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

from conftest import tiny_llama
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_glider
from peft_glider import GliderConfig, GliderModel, _registration


def test_member_is_a_real_enum_member():
    member = PeftType.GLIDER
    assert PeftType("GLIDER") is member and PeftType["GLIDER"] is member
    assert member.value == "GLIDER" and isinstance(member, PeftType) and member == "GLIDER"
    assert member in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is GliderConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is GliderModel


def test_registration_is_idempotent():
    members_before = list(PeftType)
    assert _registration.register(GliderConfig, GliderModel) is PeftType.GLIDER
    importlib.reload(peft_glider)
    assert list(PeftType) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GLIDER].__name__ == "GliderConfig"


def test_config_pickles_into_a_fresh_process(llama_experts, tmp_path):
    config = GliderConfig(experts=llama_experts, top_k=1)
    payload = tmp_path / "config.pkl"
    payload.write_bytes(pickle.dumps(config))
    code = f"import pickle; c = pickle.loads(open({str(payload)!r}, 'rb').read()); print(c.peft_type.value, c.top_k)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["GLIDER", "1"]


def test_loading_without_import_fails_and_with_import_works(tmp_path, llama_experts):
    get_peft_model(tiny_llama(), GliderConfig(experts=llama_experts)).save_pretrained(tmp_path / "glider")
    load = f"from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(tmp_path / 'glider')!r})).__name__)"
    without = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert without.returncode != 0 and "GLIDER" in without.stderr
    with_import = subprocess.run([sys.executable, "-c", "import peft_glider; " + load], capture_output=True, text=True)
    assert with_import.stdout.strip() == "GliderConfig", with_import.stderr
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "glider"), GliderConfig)
