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
        _POINTER, _POINTER, _SIZE, _SIZE, _SIZE,  # the bound operands (`_Routing`), x, tokens, x row stride, group
        _POINTER, _POINTER,  # indices (out), weights (out)
        _POINTER, _SIZE, _INT, _INT,  # out, out row stride, threads, simd
    ],
}  # fmt: skip


class _Routing(ctypes.Structure):
    """The C side's `GliderRouting`: what a routing call binds once (`RouteAndAdd`), passed by address."""

    _fields_ = [
        ("rows", _POINTER), ("E", _SIZE), ("d", _SIZE), ("standardize", _SIZE), ("eps", ctypes.c_double),
        ("bias", _POINTER), ("A", _POINTER), ("BT", _POINTER), ("o", _SIZE),
        ("row_start", _POINTER), ("rank", _POINTER), ("scaling", _POINTER), ("k", _SIZE),
    ]  # fmt: skip


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


def check_layout(A: torch.Tensor, BT: torch.Tensor, row_start: torch.Tensor, rank: torch.Tensor,
                 scaling: torch.Tensor) -> None:
    """Check the experts' operands the C functions read (once per set of experts: `bank.ExpertBank` does it
    when it is built): contiguous CPU tensors of the right dtypes and shapes, each expert's rows inside A and BT.
    Raises `ValueError` naming the operand."""
    total_rank, o = BT.shape
    num_experts = row_start.shape[0]
    for name, tensor, dtype, shape in (
        ("A", A, torch.float32, (total_rank, A.shape[-1])),
        ("BT", BT, torch.float32, (total_rank, o)),
        ("row_start", row_start, torch.int64, (num_experts,)),
        ("rank", rank, torch.int64, (num_experts,)),
        ("scaling", scaling, torch.float32, (num_experts,)),
    ):
        if tensor.device.type != "cpu" or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"native kernel: {name} must be a {dtype} CPU tensor of shape {shape}, got {tensor.dtype} "
                f"{tuple(tensor.shape)} on {tensor.device}."
            )
        if not tensor.is_contiguous():
            raise ValueError(f"native kernel: {name} must be contiguous.")
    if num_experts and bool(((row_start < 0) | (rank < 0) | (row_start + rank > total_rank)).any()):
        raise ValueError("native kernel: an expert's rows (row_start, rank) fall outside A and BT.")


def check_tokens(x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, BT: torch.Tensor,
                 indices: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> None:
    """Check one call's operands (every call: a few attribute reads): x (N, d) and out (N, o) float32 CPU with
    contiguous rows, indices (N, k) int64 and weights (N, k) float32 contiguous. Raises `ValueError`."""
    _check_tokens(x, out, A.shape[1], BT.shape[1])
    n = x.shape[0]
    if indices is not None and (
        indices.dtype != torch.int64 or weights.dtype != torch.float32 or indices.shape[0] != n
        or weights.shape != indices.shape or not indices.is_contiguous() or not weights.is_contiguous()
    ):  # fmt: skip
        raise ValueError(f"native kernel: indices (int64) and weights (float32) must be contiguous ({n}, k).")


def _check_tokens(x: torch.Tensor, out: torch.Tensor, d: int, o: int) -> None:
    # The cheapest reads of each property (a device's .type or .stride(i) cost several times is_cpu or .stride()):
    # this runs at every module of every decoding step.
    x_shape, out_shape = x.shape, out.shape
    if x.dtype is not torch.float32 or not x.is_cpu or len(x_shape) != 2 or x_shape[1] != d or x.stride()[1] != 1:
        raise ValueError(f"native kernel: x must be float32 CPU (N, {d}) with contiguous rows.")
    if out.dtype is not torch.float32 or not out.is_cpu or out_shape != (x_shape[0], o) or out.stride()[1] != 1:
        raise ValueError(f"native kernel: out must be float32 CPU ({x_shape[0]}, {o}) with contiguous rows.")


def _add_selected_experts(x, A, BT, row_start, rank, scaling, indices, weights, out, simd) -> None:
    n, k = indices.shape
    _library().glider_add_selected_experts(
        x.data_ptr(), n, x.shape[1], x.stride(0),
        A.data_ptr(), BT.data_ptr(), BT.shape[1],
        row_start.data_ptr(), rank.data_ptr(), scaling.data_ptr(),
        indices.data_ptr(), weights.data_ptr(), k,
        out.data_ptr(), out.stride(0), torch.get_num_threads(), int(simd),
    )  # fmt: skip


class RouteAndAdd:
    """`route_and_add` with everything but the tokens bound: router rows, bias, k and the experts, checked and their
    addresses taken once. A call binds one per module and each of its forwards (every decoding step) then only
    checks its tokens and makes the C call (binding costs ~4 microseconds, a decoding step's module ~50).

    Holds its tensors, so the addresses it took stay valid while it lives. Arguments as `route_and_add`'s.
    """

    __slots__ = ("operands", "standardize", "k", "_features", "_groups", "_fixed", "_fixed_address")

    def __init__(self, rows: torch.Tensor, standardize: bool, eps: float, bias: Optional[torch.Tensor], k: int,
                 A: torch.Tensor, BT: torch.Tensor, row_start: torch.Tensor, rank: torch.Tensor,
                 scaling: torch.Tensor, layout_checked: bool = False) -> None:  # fmt: skip
        if not layout_checked:
            check_layout(A, BT, row_start, rank, scaling)
        d, num_experts = A.shape[1], rows.shape[0]
        if rows.dtype != torch.float32 or tuple(rows.shape) != (row_start.shape[0], d) or not rows.is_contiguous():
            raise ValueError(f"native kernel: rows must be contiguous float32 (E, {d}), one per expert.")
        if not 1 <= k <= num_experts or num_experts > MAX_EXPERTS:
            raise ValueError(f"native kernel: k={k} must lie in [1, {num_experts}] and E <= {MAX_EXPERTS}.")
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.dim() != 2
                                 or bias.shape[1] != num_experts or bias.shape[0] == 0):
            raise ValueError(f"native kernel: bias must be contiguous float32 (B, {num_experts}), B >= 1.")
        self.operands = (rows, standardize, eps, bias, k, A, BT, row_start, rank, scaling)
        self.standardize, self.k = standardize, k
        self._features = (d, BT.shape[1])  # (d, o)
        self._groups = 0 if bias is None else bias.shape[0]  # B (0: no bias)
        # The operands' addresses for C, taken here once (every thread sharing this binding sees them whole); none
        # while torch.compile traces with fake tensors, whose calls go to the operator instead.
        self._fixed: Optional[_Routing] = None
        self._fixed_address = 0
        if not torch.compiler.is_compiling():
            self._fixed = _Routing(
                rows.data_ptr(), num_experts, d, int(standardize), eps, 0 if bias is None else bias.data_ptr(),
                A.data_ptr(), BT.data_ptr(), BT.shape[1], row_start.data_ptr(), rank.data_ptr(), scaling.data_ptr(), k,
            )  # fmt: skip
            self._fixed_address = ctypes.addressof(self._fixed)

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor, simd: bool = True, selection: bool = True
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Route the tokens x (N, d) and add their experts' deltas into `out` (N, o); returns the selected experts
        and their weights, (N, k) each, or None when no `selection` is wanted (none is allocated). Under
        torch.compile, the operator `torch.ops.peft_glider.route_and_add`."""
        if torch.compiler.is_compiling():
            return torch.ops.peft_glider.route_and_add(x, *self.operands, out, simd)
        _check_tokens(x, out, *self._features)
        return self._run(x, out, simd, selection)

    def _run(
        self, x: torch.Tensor, out: torch.Tensor, simd: bool, selection: bool = True
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        n = x.shape[0]
        if not self._fixed_address:
            raise RuntimeError("native kernel: this binding was made while torch.compile traced; bind it again.")
        if self._groups and n % self._groups:
            raise ValueError(f"native kernel: {n} tokens do not split into the bias's {self._groups} groups.")
        if selection:
            indices = torch.empty(n, self.k, dtype=torch.int64)
            weights = torch.empty(n, self.k, dtype=torch.float32)
        _library().glider_route_and_add(
            self._fixed_address, x.data_ptr(), n, x.stride()[0], n // self._groups if self._groups else 1,
            indices.data_ptr() if selection else 0, weights.data_ptr() if selection else 0,
            out.data_ptr(), out.stride()[0], torch.get_num_threads(), int(simd),
        )  # fmt: skip
        return (indices, weights) if selection else None


# The C library is called through ctypes rather than built as a torch C++ extension: building against torch's
# headers would make torch a build requirement (pip's isolated build would fetch a multi-GB wheel). Registered as
# torch operators all the same, with fake implementations, so torch.compile traces a Glider model; in eager mode
# the functions below call the library directly (a custom op's Python dispatch costs ~100x the C call itself).


@torch.library.custom_op("peft_glider::add_selected_experts", mutates_args=("out",), device_types="cpu")
def _add_selected_experts_op(
    x: torch.Tensor, A: torch.Tensor, BT: torch.Tensor, row_start: torch.Tensor, rank: torch.Tensor,
    scaling: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, simd: bool,
) -> None:  # fmt: skip
    check_layout(A, BT, row_start, rank, scaling)
    check_tokens(x, out, A, BT, indices, weights)
    _add_selected_experts(x, A, BT, row_start, rank, scaling, indices, weights, out, simd)


@_add_selected_experts_op.register_fake
def _(x, A, BT, row_start, rank, scaling, indices, weights, out, simd) -> None:
    return None


@torch.library.custom_op("peft_glider::route_and_add", mutates_args=("out",), device_types="cpu")
def _route_and_add_op(
    x: torch.Tensor, rows: torch.Tensor, standardize: bool, eps: float, bias: Optional[torch.Tensor], k: int,
    A: torch.Tensor, BT: torch.Tensor, row_start: torch.Tensor, rank: torch.Tensor, scaling: torch.Tensor,
    out: torch.Tensor, simd: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    check_tokens(x, out, A, BT)
    return RouteAndAdd(rows, standardize, eps, bias, k, A, BT, row_start, rank, scaling)._run(x, out, simd)


@_route_and_add_op.register_fake
def _(x, rows, standardize, eps, bias, k, A, BT, row_start, rank, scaling, out, simd):
    n = x.shape[0]
    return x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, k, dtype=torch.float32)


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
    layout_checked: bool = False,
) -> torch.Tensor:
    """`out[n] += sum_j weights[n, j] * scaling[e] * BT_e.T @ (A_e @ x[n])` with `e = indices[n, j]`, in place.

    x (N, d) and out (N, o): float32, rows contiguous (any row stride); A (R, d), BT (R, o): an expert's rows are
    `row_start[e]` to `row_start[e] + rank[e]` (int64, (E,)); scaling (E,) float32; indices (N, k) int64 (expert
    indices, trusted: they come from top-k) and weights (N, k) float32, contiguous. `simd=False` runs the portable
    loops instead of the AVX2 forms. `layout_checked`: the experts' operands passed `check_layout` already.
    Under torch.compile, the operator `torch.ops.peft_glider.add_selected_experts`.
    """
    if torch.compiler.is_compiling():
        torch.ops.peft_glider.add_selected_experts(x, A, BT, row_start, rank, scaling, indices, weights, out, simd)
        return out
    if not layout_checked:
        check_layout(A, BT, row_start, rank, scaling)
    check_tokens(x, out, A, BT, indices, weights)
    _add_selected_experts(x, A, BT, row_start, rank, scaling, indices, weights, out, simd)
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
    layout_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token and add its experts' deltas into `out`, in one pass: local scores against `rows` (E, d)
    (`rows . x / std(x)` for standardized rows, else `|rows . x|`), plus `bias` (B, E) for B consecutive groups of
    tokens (or None), top-k among experts with `rank > 0`, softmax, then as `add_selected_experts`.

    Returns the selected experts (N, k) int64 and their weights (N, k) float32. Same tensor requirements as
    `add_selected_experts`; rows and bias float32, contiguous; E <= `MAX_EXPERTS`. Under torch.compile, the
    operator `torch.ops.peft_glider.route_and_add`. To route many calls with the same operands, bind them once
    (`RouteAndAdd`).
    """
    if torch.compiler.is_compiling():
        return torch.ops.peft_glider.route_and_add(x, rows, standardize, eps, bias, k, A, BT, row_start, rank,
                                                   scaling, out, simd)
    return RouteAndAdd(rows, standardize, eps, bias, k, A, BT, row_start, rank, scaling, layout_checked)(x, out, simd)
