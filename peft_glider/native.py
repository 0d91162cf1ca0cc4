"""The compiled kernel for the selected experts' products (`csrc/selected_experts.c`), loaded through ctypes.

It is built with the package where a C compiler is found (`setup.py`, optional); without it, `available()` is
False and `routing` runs its pure-torch kernels. Float32 tensors on CPU only, and no autograd: `routing` decides
when it may run.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path
from typing import Optional

import torch

_LIBRARY_STEM = "_selected_experts"


def _load() -> Optional[ctypes.CDLL]:
    package_dir = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package_dir / f"{_LIBRARY_STEM}{suffix}"
        if path.is_file():
            library = ctypes.CDLL(str(path))
            function = library.glider_add_selected_experts
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            function.argtypes = [
                pointer, size, size, size,  # x, tokens, d, x row stride
                pointer, pointer, size,  # A, BT, o
                pointer, pointer, pointer,  # row_start, rank, scaling
                pointer, pointer, size,  # indices, weights, k
                pointer, size, ctypes.c_int, ctypes.c_int,  # out, out row stride, threads, simd
            ]
            function.restype = None
            return function
    return None


_ADD_SELECTED_EXPERTS = _load()


def available() -> bool:
    """Whether the compiled kernel was built and loaded."""
    return _ADD_SELECTED_EXPERTS is not None


def add_selected_experts(
    x: torch.Tensor,
    A: torch.Tensor,
    BT: torch.Tensor,
    row_start: torch.Tensor,
    rank: torch.Tensor,
    scaling: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    simd: bool = True,
) -> torch.Tensor:
    """`out[n] += sum_j weights[n, j] * scaling[e] * BT_e.T @ (A_e @ x[n])` with `e = indices[n, j]`, in place.

    x (N, d) and out (N, o): float32, rows contiguous (any row stride); A (R, d), BT (R, o): an expert's rows are
    `row_start[e]` to `row_start[e] + rank[e]` (int64, (E,)); scaling (E,) float32; indices (N, k) int64 and
    weights (N, k) float32, contiguous. `simd=False` runs the portable loops instead of the AVX2 forms.
    """
    if _ADD_SELECTED_EXPERTS is None:
        raise RuntimeError("peft-glider's compiled kernel is not built; reinstall the package with a C compiler.")
    n, k = indices.shape
    _ADD_SELECTED_EXPERTS(
        x.data_ptr(), n, x.shape[1], x.stride(0),
        A.data_ptr(), BT.data_ptr(), BT.shape[1],
        row_start.data_ptr(), rank.data_ptr(), scaling.data_ptr(),
        indices.data_ptr(), weights.data_ptr(), k,
        out.data_ptr(), out.stride(0), torch.get_num_threads(), int(simd),
    )  # fmt: skip
    return out
