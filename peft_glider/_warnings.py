"""Warnings that point at the user's line, whatever sits between the user and the library.

`warnings.warn(stacklevel=n)` needs a fixed depth, but a Glider warning can be raised through PEFT's
`get_peft_model`, `save_pretrained` or `from_pretrained`, transformers' model code, the `kernels` package's layer
wrappers, accelerate's dispatch hooks or torch.compile, at depths that change with every release. So the frames are
walked up to the first one that is neither this package nor an installed library: a file under the interpreter's
standard library or a site-packages folder, a module of a package that the wrappers above belong to (for editable
installs of them), or generated code (`<frozen ...>`, torch.fx's `<eval_with_key>`). Python 3.12's
`skip_file_prefixes` would take the prefixes but not the generated code, and 3.10-3.11 lack it.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
import warnings
from types import FrameType
from typing import Optional

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: Libraries known to sit between a user's call and a Glider layer; their folders count as libraries even when they
#: are not installed in site-packages (an editable install of them).
_WRAPPERS = ("peft", "torch", "transformers", "accelerate", "kernels", "safetensors", "huggingface_hub",
             "sentence_transformers", "triton")


@functools.lru_cache(maxsize=1)
def _library_prefixes() -> tuple[str, ...]:
    """The folders of installed code: the standard library, every site-packages folder, and the wrappers'."""
    folders = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    folders.update(getattr(site, "getsitepackages", lambda: [])())
    folders.add(site.getusersitepackages())
    for name in _WRAPPERS:
        module = sys.modules.get(name)  # only what is imported: looking others up would import them
        if module is not None and getattr(module, "__file__", None):
            folders.add(os.path.dirname(module.__file__))
    return tuple(sorted({os.path.abspath(folder) + os.sep for folder in folders if folder}))


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    if filename.startswith("<"):  # generated code: <frozen importlib._bootstrap>, <eval_with_key>.3, <string>
        return True
    return os.path.abspath(filename).startswith(_library_prefixes())


def _user_level(frame: Optional[FrameType]) -> int:
    """The stack level (1 = `frame`) of the first frame outside this package and every library; where the whole
    stack is library code (an application installed in site-packages), the first frame outside this package."""
    level, outside_package = 1, None
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE):
            outside_package = outside_package or level
            if not _is_library_file(filename):
                return level
        frame, level = frame.f_back, level + 1
    return outside_package or 1


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the user's line: the first caller outside peft-glider and the libraries
    between the user and it (see the module's docstring)."""
    caller = sys._getframe(1)
    warnings.warn(message, category, stacklevel=_user_level(caller) + 1)
