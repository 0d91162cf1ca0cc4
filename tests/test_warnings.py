"""A Glider warning points at the user's line whatever wraps the layer: PEFT, transformers with the `kernels`
package's layer wrappers, accelerate's dispatch hooks (CPU offload), torch.compile, or a library that is none of
these (any code in site-packages)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import warnings

import pytest
import torch
from accelerate import cpu_offload
from conftest import input_ids, make_expert, tiny_llama
from peft import get_peft_model

from peft_glider import GliderConfig, _warnings, native, routing

NO_KERNEL = "compiled CPU kernel is not built"


@pytest.fixture
def glider(tmp_path, monkeypatch):
    """A Glider model whose first forward warns (the compiled CPU kernel made unavailable, once per process)."""
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setattr(routing, "_warned_no_native", False)
    experts = [make_expert(tiny_llama, tmp_path / f"e{i}", seed=i) for i in range(2)]
    return get_peft_model(tiny_llama(), GliderConfig(experts=experts, top_k=1))


def caught_at(call) -> warnings.WarningMessage:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            call()
    [warning] = [w for w in caught if NO_KERNEL in str(w.message)]
    return warning


def test_through_peft_and_transformers_kernels_wrappers(glider):
    here = sys._getframe().f_lineno + 1
    warning = caught_at(lambda: glider(input_ids()))
    assert (warning.filename, warning.lineno) == (__file__, here)
    # transformers' layers are wrapped by the kernels package when it is installed: the case that broke
    if importlib.util.find_spec("kernels") is not None:
        assert "kernels" in sys.modules


def test_through_accelerate_cpu_offload_hooks(glider):
    offloaded = cpu_offload(glider, execution_device=torch.device("cpu"))
    assert any(hasattr(module, "_hf_hook") for module in offloaded.modules())
    here = sys._getframe().f_lineno + 1
    warning = caught_at(lambda: offloaded(input_ids()))
    assert (warning.filename, warning.lineno) == (__file__, here)


def test_through_torch_compile(glider):
    compiled = torch.compile(glider, backend="eager")
    here = sys._getframe().f_lineno + 1
    warning = caught_at(lambda: compiled(input_ids()))
    assert warning.filename == __file__ and warning.lineno == here


def test_any_installed_library_between_the_user_and_the_layer_is_skipped(glider, tmp_path, monkeypatch):
    """A wrapper from a library the package has never heard of, installed in a site-packages folder."""
    site_packages = tmp_path / "lib" / "site-packages"
    (site_packages / "servinglib").mkdir(parents=True)
    (site_packages / "servinglib" / "__init__.py").write_text(textwrap.dedent("""
        def serve(model, ids):
            return model(ids)
    """))
    monkeypatch.syspath_prepend(str(site_packages))
    monkeypatch.setattr(_warnings.site, "getsitepackages", lambda: [str(site_packages)])
    _warnings._library_prefixes.cache_clear()
    _warnings._is_library_file.cache_clear()
    import servinglib

    try:
        here = sys._getframe().f_lineno + 1
        warning = caught_at(lambda: servinglib.serve(glider, input_ids()))
        assert (warning.filename, warning.lineno) == (__file__, here)
    finally:
        _warnings._library_prefixes.cache_clear()
        _warnings._is_library_file.cache_clear()
        sys.modules.pop("servinglib", None)


def test_a_stack_of_library_code_only_points_just_outside_the_package(monkeypatch):
    """An application installed in site-packages: no frame is the user's; the first outside peft-glider is."""
    monkeypatch.setattr(_warnings, "_is_library_file", lambda filename: True)
    here = sys._getframe().f_lineno + 2
    with pytest.warns(UserWarning, match="library all the way") as caught:
        _warnings.warn_user("library all the way")
    assert (caught[0].filename, caught[0].lineno) == (__file__, here)
