"""The selected experts' products, `sum_j w_j * s_j * B_j A_j x` over each token's chosen experts: one function per
kernel (`KERNEL_FUNCTIONS`), pure torch ("concat", "gather", "sparse"), compiled C ("native", which also routes:
`route_and_apply_native`) and Triton on a GPU ("triton"); and Phatgoose gate training's single-expert form.

Shapes: N tokens, d input and o output features, k selected experts per token, R the experts' total rank.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch

from . import native
from .bank import LN_EPS, ExpertBank, Selection

_CSR_WARNING_LOCK = threading.Lock()
_csr_warning_consumed = False


def _consume_csr_beta_warning() -> None:
    """torch warns once per process ("Sparse CSR tensor support is in beta state") when the first CSR tensor is
    built; the sparse kernel builds them internally, so that warning would point at nothing the user wrote. Build
    one tiny CSR tensor with the warning ignored, once, without touching the process's filters afterwards."""
    global _csr_warning_consumed
    with _CSR_WARNING_LOCK:
        if _csr_warning_consumed:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), size=(1, 1), check_invariants=False)
        _csr_warning_consumed = True


#: The kernels this module offers for the experts' products; "auto" picks one per call from the shapes.
KERNELS = ("auto", "concat", "gather", "sparse", "native", "triton")


def _weights_as(selection: Selection, dtype: torch.dtype) -> torch.Tensor:
    """The routing weights (N, k) in `dtype` (no conversion call when they already are: decoding's hot path)."""
    return selection.weights if selection.weights.dtype == dtype else selection.weights.to(dtype)


def _scaled_weights(bank: ExpertBank, selection: Selection, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Each selected pair's weight times its expert's LoRA scaling, as (weights (N, k), common factor): a scaling
    shared by every expert is left out of the weights and applied once, by the final GEMM's `alpha`."""
    weights = _weights_as(selection, dtype)
    if bank.uniform_scaling is not None:
        return weights, bank.uniform_scaling
    return weights * bank.expert_scaling[selection.indices], 1.0


def _slots(bank: ExpertBank, indices: torch.Tensor) -> torch.Tensor:
    """Expert indices (any shape) -> their rank-block positions among the experts present here."""
    return indices if bank.num_present == bank.num_experts else bank.expert_slot[indices]


def _output(x: torch.Tensor, bank: ExpertBank, out: torch.Tensor | None) -> torch.Tensor:
    return x.new_zeros(x.shape[0], bank.BT.shape[1]) if out is None else out


def delta_concat(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Two GEMMs over all concatenated ranks, unselected experts weighted zero; adds into `out` (N, o).

    Costs N * R * (d + o) multiply-adds in five calls: best for few experts, where call overhead rules.
    Any ranks, dtypes and devices; differentiable.
    """
    n = x.shape[0]
    weights, alpha = _scaled_weights(bank, selection, x.dtype)
    hidden = x @ bank.A.T  # (N, R)
    rank = bank.uniform_rank
    if rank is not None:
        per_expert = x.new_zeros(n, bank.num_present).scatter_(1, _slots(bank, selection.indices), weights)
        hidden = (hidden.view(n, bank.num_present, rank) * per_expert.unsqueeze(-1)).view(n, -1)
    else:
        per_expert = x.new_zeros(n, bank.num_experts).scatter_(1, selection.indices, weights)  # (N, E)
        hidden = hidden * per_expert[:, bank.rank_expert]
    return _output(x, bank, out).addmm_(hidden, bank.BT, alpha=alpha)


def delta_gather(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather each token's k experts' factors and apply them by batched matrix-vector products; adds into `out`.

    Costs N * k * r * (d + o) multiply-adds plus copying as many factor entries, in five calls: best for a few
    tokens (decoding) among many experts, since it reads only the selected experts. Needs a rank shared by the
    experts present here; differentiable.
    """
    n, k = selection.indices.shape
    width = k * bank.uniform_rank
    weights, alpha = _scaled_weights(bank, selection, x.dtype)
    slots = _slots(bank, selection.indices).view(-1)  # (N k,)
    a = bank.A_blocks.index_select(0, slots).view(n, width, -1)  # (N, k r, d)
    hidden = torch.bmm(a, x.unsqueeze(-1)).view(n, k, -1) * weights.unsqueeze(-1)  # (N, k, r)
    b = bank.BT_blocks.index_select(0, slots).view(n, width, -1)  # (N, k r, o)
    out = _output(x, bank, out)
    out.unsqueeze(1).baddbmm_(hidden.view(n, 1, width), b, alpha=alpha)  # (N, 1, o) in place
    return out


def delta_sparse(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The selected (token, rank) pairs as a sparse CSR pattern: a sampled dense-dense product gives only the
    selected experts' `A_e x` (SDDMM), a sparse-dense product adds their weighted `B_e` rows (SpMM) into `out`.

    Costs N * k * r * (d + o) multiply-adds in about eight calls, whatever E: best for many tokens and many
    experts (prefill). Needs a rank shared by the experts present here and float32 or float64.
    """
    if not _csr_warning_consumed:
        _consume_csr_beta_warning()
    n, k = selection.indices.shape
    rank, total_rank = bank.uniform_rank, bank.A.shape[0]
    weights, alpha = _scaled_weights(bank, selection, x.dtype)
    columns = (_slots(bank, selection.indices).unsqueeze(-1) * rank + torch.arange(rank, device=x.device)).view(-1)
    row_starts = torch.arange(0, n * k * rank + 1, k * rank, device=x.device)  # every token has k * r entries

    def pattern(values: torch.Tensor) -> torch.Tensor:  # (N, R), non-zero at each token's selected ranks
        return torch.sparse_csr_tensor(row_starts, columns, values, size=(n, total_rank), check_invariants=False)

    hidden = torch.sparse.sampled_addmm(pattern(x.new_zeros(n * k * rank)), x, bank.A.T, beta=0.0).values()
    weighted = (hidden.view(n, k, rank) * weights.unsqueeze(-1)).view(-1)  # (N k r,)
    return _output(x, bank, out).addmm_(pattern(weighted), bank.BT, alpha=alpha)


def _native_operands(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x with contiguous rows, and where the compiled (or Triton) kernel adds: `out` itself, or zeros to add into `out` after
    when its rows are not contiguous (see `_native_result`)."""
    return (x if x.stride(-1) == 1 else x.contiguous()), (out if out.stride(-1) == 1 else torch.zeros_like(out))


def _native_result(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out if target is out else out.add_(target)


def delta_native(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The compiled kernel (`native.py`): per token, only its k experts' `A_e x` and weighted `B_e` rows, with the
    token in cache, in one call; adds into `out` (N, o).

    Costs N * k * r * (d + o) multiply-adds and no intermediate tensors. Runs for float32 on CPU, without gradients,
    with the package's compiled kernel built; any ranks and scalings.
    """
    weights = _weights_as(selection, x.dtype)
    out = _output(x, bank, out)
    x, target = _native_operands(x, out)
    native.add_selected_experts(
        x, bank.A, bank.BT, bank.expert_row_start, bank.expert_rank, bank.expert_scaling,
        selection.indices.contiguous(), weights.contiguous(), target, layout_checked=True,
    )  # fmt: skip
    return _native_result(out, target)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device`: CUDA with `triton` importable (or any device under Triton's
    interpreter, `TRITON_INTERPRET=1`, which the tests use on CPU)."""
    global _TRITON_IMPORTABLE
    if device.type != "cuda" and (os.environ.get("TRITON_INTERPRET") != "1" or not triton_interpreter_usable()):
        return False
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def triton_interpreter_usable() -> bool:
    """Whether Triton's interpreter can run the kernel here: before Triton 3.7 it turns a scalar argument into an
    int with `int(array)` of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted"). Found by `benchmarks/gpu.py --dry-run` on the GPU machine's Triton 3.6; compiled kernels on a GPU
    are not concerned."""
    from importlib import metadata

    from packaging.version import Version

    try:
        triton_version, numpy_version = Version(metadata.version("triton")), Version(metadata.version("numpy"))
    except metadata.PackageNotFoundError:
        return False
    return triton_version >= Version("3.7") or numpy_version < Version("2.4")


_TRITON_IMPORTABLE: bool | None = None
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def delta_triton(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The grouped Triton kernel (`triton_kernels.py`): pairs sorted by expert, each tile of pairs applying one
    expert's factors, float32 accumulation; adds into `out` (N, o). For CUDA, in float32, float16 or bfloat16,
    without gradients; any ranks and scalings."""
    from . import triton_kernels

    out = _output(x, bank, out)
    x, target = _native_operands(x, out)
    triton_kernels.add_selected_experts(
        x, bank.A, bank.BT, bank.device_layout(x.device), selection.indices, selection.weights, target, bank.max_rank
    )
    return _native_result(out, target)


def can_fuse_routing(rows: torch.Tensor, bank: ExpertBank) -> bool:
    """Whether `route_and_apply_native` can take these router rows (E, d) and experts."""
    return (
        bank.native_ready
        and rows.dtype == torch.float32
        and rows.device.type == "cpu"
        and rows.is_contiguous()
        and rows.shape[0] <= native.MAX_EXPERTS
    )


def bind_native_routing(
    rows: torch.Tensor, standardized: bool, global_bias: torch.Tensor | None, k: int, bank: ExpertBank
) -> native.RouteAndAdd:
    """The compiled routing call bound to one module's router rows (E, d) (`can_fuse_routing`), `standardized`
    (`standardized_dots`, else `arrow_dots`), the global bias (B, E) for B consecutive groups of tokens (or None),
    k and `bank`'s experts: what `route_and_apply_native` runs."""
    if global_bias is not None and (global_bias.dtype != torch.float32 or not global_bias.is_contiguous()):
        global_bias = global_bias.to(torch.float32).contiguous()
    return native.RouteAndAdd(
        rows, standardized, LN_EPS, global_bias, k,
        bank.A, bank.BT, bank.expert_row_start, bank.expert_rank, bank.expert_scaling, layout_checked=True,
    )  # fmt: skip


def route_and_apply_native(
    u: torch.Tensor, bound: native.RouteAndAdd, bank: ExpertBank, out: torch.Tensor | None = None,
    want_selection: bool = True,
) -> tuple[Selection | None, torch.Tensor]:
    """`standardized_dots` (or `arrow_dots`), `combine_logits`, `select_top_k` and `delta_native` in one compiled
    call (`bound` by `bind_native_routing` for `bank`), each token routed and its experts applied while it sits in
    cache. u (N, d) float32. Adds into `out` (N, o) (zeros if None); returns the selection (for traces; None when
    not `want_selection`) and `out`. No gradients.
    """
    out = _output(u, bank, out)
    x, target = _native_operands(u, out)
    chosen = bound(x, target, selection=want_selection)
    return (None if chosen is None else Selection(*chosen)), _native_result(out, target)


def delta_gated_single(
    x: torch.Tensor, bank: ExpertBank, expert: int, gate: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Phatgoose gate training form, one expert: `sigmoid(gate . x)` times the expert's delta `s_e B_e A_e x` (plus
    its output terms, see `output_terms`) on the raw x. (N, d) -> (N, o)."""
    span = bank.spans[expert]
    if span is None:
        return x.new_zeros(x.shape[0], bank.BT.shape[1])
    start, end = span
    probability = torch.sigmoid(x @ gate.to(x.dtype))  # (N,)
    hidden = (x @ bank.A[start:end].T) * (probability * bank.rank_scaling[start])[:, None]
    delta = hidden @ bank.BT[start:end]
    if bank.has_output_terms:
        indices = torch.full_like(probability, expert, dtype=torch.long)[:, None]
        one = Selection(indices=indices, weights=probability[:, None])
        delta = delta + output_terms(one, bank, base)
    return delta


def output_terms(selection: Selection, bank: ExpertBank, base: torch.Tensor | None) -> torch.Tensor:
    """The selected experts' per-output terms mixed by their routing weights, (N, o): `sum_k w_k (shift_k * base +
    s_k bias_k)`, with `base` (N, o) the base layer's output without its bias (needed when DoRA experts are here:
    their shift is `g - 1`). Computed with torch on every kernel path (the low-rank products stay the kernel's)."""
    weights = selection.weights if selection.weights.dtype == bank.dtype else selection.weights.to(bank.dtype)
    if bank.num_experts <= _DENSE_TERMS_MAX_EXPERTS:  # one (N, E) x (E, o) product: fewer calls than gathering
        weights = weights.new_zeros(weights.shape[0], bank.num_experts).scatter_(1, selection.indices, weights)
        scaling = bank.expert_scaling  # (E,)
        mix = torch.mm
    else:  # (N, k, o) gathered: memory and work in k, not E
        scaling = bank.expert_scaling[selection.indices]  # (N, k)
        mix = lambda row_weights, terms: torch.einsum("nk,nko->no", row_weights, terms[selection.indices])  # noqa: E731
    terms = None
    if bank.shift is not None:
        terms = mix(weights, bank.shift) * (base if base.dtype == bank.dtype else base.to(bank.dtype))
    if bank.bias is not None:
        biases = mix(weights * scaling, bank.bias)
        terms = biases if terms is None else terms + biases
    return terms


#: Up to this many experts at a module, the output terms are mixed through a dense (N, E) weight matrix.
_DENSE_TERMS_MAX_EXPERTS = 64


#: Kernel name -> the function computing the selected experts' products.
KERNEL_FUNCTIONS = {
    "concat": delta_concat, "gather": delta_gather, "sparse": delta_sparse, "native": delta_native,
    "triton": delta_triton,
}  # fmt: skip
