"""Warnings that point at the user's line, however deep in PEFT or transformers the library was called from.

`warnings.warn(stacklevel=n)` needs a fixed depth, but a Glider warning can be raised through PEFT's
`get_peft_model`, `save_pretrained` or `from_pretrained` at varying depths. Python 3.12 has
`skip_file_prefixes` for this; on 3.10-3.11 the frames are walked here.
"""

from __future__ import annotations

import os
import sys
import warnings

import peft
import torch
import transformers

_LIBRARIES = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (peft, torch, transformers)
) + (os.path.dirname(__file__) + os.sep,)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the first caller outside peft-glider, PEFT, transformers and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
