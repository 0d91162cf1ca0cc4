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


#: The most experts the fused routing call takes (its per-token logits live on the stack).
MAX_EXPERTS = 2048

_POINTER, _SIZE, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "glider_add_selected_experts": [
        _POINTER, _SIZE, _SIZE, _SIZE,  # x, tokens, d, x row stride
        _POINTER, _POINTER, _SIZE,  # A, BT, o
        _POINTER, _POINTER, _POINTER,  # row_start, rank, scaling
        _POINTER, _POINTER, _SIZE,  # indices, weights, k
        _POINTER, _SIZE, _INT, _INT,  # out, out row stride, threads, simd
    ],
    "glider_route_and_add": [
        _POINTER, _SIZE, _SIZE, _SIZE,  # x, tokens, d, x row stride
        _POINTER, _SIZE, _INT, ctypes.c_float, _POINTER, _SIZE,  # rows, E, standardize, eps, bias, group
        _POINTER, _POINTER, _SIZE,  # A, BT, o
        _POINTER, _POINTER, _POINTER,  # row_start, rank, scaling
        _SIZE, _POINTER, _POINTER,  # k, indices (out), weights (out)
        _POINTER, _SIZE, _INT, _INT,  # out, out row stride, threads, simd
    ],
}  # fmt: skip


def _load() -> Optional[ctypes.CDLL]:
    package_dir = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package_dir / f"{_LIBRARY_STEM}{suffix}"
        if path.is_file():
            library = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                function = getattr(library, name)
                function.argtypes, function.restype = argtypes, None
            return library
    return None


_LIBRARY = _load()


def available() -> bool:
    """Whether the compiled kernel was built and loaded."""
    return _LIBRARY is not None


def _library() -> ctypes.CDLL:
    if _LIBRARY is None:
        raise RuntimeError("peft-glider's compiled kernel is not built; reinstall the package with a C compiler.")
    return _LIBRARY


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
    n, k = indices.shape
    _library().glider_add_selected_experts(
        x.data_ptr(), n, x.shape[1], x.stride(0),
        A.data_ptr(), BT.data_ptr(), BT.shape[1],
        row_start.data_ptr(), rank.data_ptr(), scaling.data_ptr(),
        indices.data_ptr(), weights.data_ptr(), k,
        out.data_ptr(), out.stride(0), torch.get_num_threads(), int(simd),
    )  # fmt: skip
    return out


def route_and_add(
    x: torch.Tensor,
    rows: torch.Tensor,
    standardize: bool,
    eps: float,
    bias: Optional[torch.Tensor],
    k: int,
    A: torch.Tensor,
    BT: torch.Tensor,
    row_start: torch.Tensor,
    rank: torch.Tensor,
    scaling: torch.Tensor,
    out: torch.Tensor,
    simd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token and add its experts' deltas into `out`, in one pass: local scores against `rows` (E, d)
    (`rows . x / std(x)` for standardized rows, else `|rows . x|`), plus `bias` (B, E) for B consecutive groups of
    tokens (or None), top-k among experts with `rank > 0`, softmax, then as `add_selected_experts`.

    Returns the selected experts (N, k) int64 and their weights (N, k) float32. Same tensor requirements as
    `add_selected_experts`; rows and bias float32, contiguous; E <= `MAX_EXPERTS`.
    """
    n = x.shape[0]
    indices = torch.empty(n, k, dtype=torch.int64)
    weights = torch.empty(n, k, dtype=torch.float32)
    group = 1 if bias is None else n // bias.shape[0]
    _library().glider_route_and_add(
        x.data_ptr(), n, x.shape[1], x.stride(0),
        rows.data_ptr(), rows.shape[0], int(standardize), eps, 0 if bias is None else bias.data_ptr(), group,
        A.data_ptr(), BT.data_ptr(), BT.shape[1],
        row_start.data_ptr(), rank.data_ptr(), scaling.data_ptr(),
        k, indices.data_ptr(), weights.data_ptr(),
        out.data_ptr(), out.stride(0), torch.get_num_threads(), int(simd),
    )  # fmt: skip
    return indices, weights
