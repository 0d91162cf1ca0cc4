"""The routing maths of GLIDER, in one place (see `docs/algorithm.md`).

Shapes: N tokens, d input features, o output features, E experts, k selected experts per token, R the sum of the
experts' ranks at one module (the experts' A factors are concatenated along the rank axis, B factors likewise).
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import native
from ._warnings import warn_user

if TYPE_CHECKING:
    from .experts import LoraFactors

LN_EPS = 1e-5

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


def standardize(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """`(x - mean(x)) / sqrt(var(x) + eps)` over the last axis, without affine parameters."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def local_scores(u: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Phatgoose scores `LN(u) . LN(gate_e) / sqrt(d)`: u (N, d), gates (E, d) -> (N, E)."""
    return standardized_dots(u, phatgoose_rows(gates))


def phatgoose_rows(gates: torch.Tensor) -> torch.Tensor:
    """`LN(gate_e) / sqrt(d)`, (E, d): what standardized tokens are multiplied with (computed once per gate update)."""
    return standardize(gates) / math.sqrt(gates.shape[-1])


# Below this many token features, one fused layer norm beats the two reductions of `standardized_dots` on CPU
# (it makes a standardized copy, ~1 ns a feature, but is one call instead of eight at ~5 microseconds each).
_LAYER_NORM_MAX_FEATURES = 32_768


def standardized_dots(u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`LN(u) @ rows.T` for zero-mean rows (standardized gates): u (N, d), rows (E, d) -> (N, E).

    The mean of `u` drops out against zero-mean rows, so only its scale is needed: `(u @ rows.T) / std(u)`, with
    `d var(u) = |u|^2 - (sum u)^2 / d` from two fast reductions, no standardized copy of the tokens (torch's fused
    `var_mean` is ten times slower on CPU). A few tokens (decoding) take one fused layer norm instead.
    """
    d = u.shape[-1]
    if u.numel() <= _LAYER_NORM_MAX_FEATURES:
        return torch.nn.functional.layer_norm(u, (d,), eps=LN_EPS) @ rows.T
    total = u.sum(dim=-1, keepdim=True)  # (N, 1)
    d_variance = torch.addcmul(torch.linalg.vector_norm(u, dim=-1, keepdim=True).square(), total, total, value=-1 / d)
    # Rounding can leave the variance a hair below zero for constant tokens: clamp it to zero.
    inverse_std = torch.rsqrt(d_variance.clamp_min(0.0) / d + LN_EPS)  # (N, 1)
    return (u @ rows.T).mul_(inverse_std)


def arrow_rows(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """`v_e / T`, (E, d), from unit prototypes v_e: what tokens are multiplied with (once per prototype update)."""
    return prototypes / temperature


def arrow_dots(u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Arrow scores `|u . v_e| / T = |u . (v_e / T)|` from `arrow_rows`: u (N, d), rows (E, d) -> (N, E)."""
    return (u @ rows.T).abs()


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of `B @ A` (d,), from the factors only: A (r, d), B (o, r).

    With `A.T = Q R` (Q: d x r orthonormal), `B @ A = (B @ R.T) @ Q.T`; if `B @ R.T = U S V.T` then the right
    singular vectors of `B @ A` are `Q @ V`. Only r x r and o x r decompositions are needed. The sign is arbitrary.
    """
    Q, R = torch.linalg.qr(A.T.to(torch.float64))  # (d, r), (r, r)
    _, _, Vh = torch.linalg.svd(B.to(torch.float64) @ R.T, full_matrices=False)
    return (Q @ Vh[0]).to(A.dtype)


@dataclass
class Selection:
    """The experts chosen for each token and their mixing weights."""

    indices: torch.Tensor  # (N, k) expert indices, best first
    weights: torch.Tensor  # (N, k) softmax over the selected logits


def select_top_k(logits: torch.Tensor, present: torch.Tensor | None, k: int) -> Selection:
    """Mask experts absent from the module, keep the k largest logits, softmax over them.

    logits (N, E); present (E,) bool, or None when every expert adapts the module; k must not exceed the
    number of present experts.
    """
    masked = logits if present is None else logits.masked_fill(~present, float("-inf"))
    top_logits, indices = masked.topk(k, dim=-1)
    return Selection(indices=indices, weights=torch.softmax(top_logits, dim=-1))


def combine_logits(local: torch.Tensor, global_bias: torch.Tensor | None) -> torch.Tensor:
    """`local + alpha * global`: local (N, E) for B consecutive groups of tokens (a batch row's tokens, or the rows
    a generate() call expanded from one row), the global bias (B, E) broadcast over each group."""
    if global_bias is None:
        return local
    groups, num_experts = global_bias.shape
    if global_bias.dtype != local.dtype:
        global_bias = global_bias.to(local.dtype)
    if local.shape[0] == groups:  # one token per group (decoding): a plain sum
        return local + global_bias
    return (local.view(groups, -1, num_experts) + global_bias.unsqueeze(1)).view(-1, num_experts)


def auto_alpha(scores: torch.Tensor, threshold: float, held_in: float, held_out: float) -> torch.Tensor:
    """Per-row alpha (B,): `held_in` where the row's best global score reaches `threshold` (the query looks like
    one of the experts' tasks, so the global router should decide), else `held_out` (a mild prior)."""
    best = scores.max(dim=-1).values
    return torch.where(best >= threshold, torch.tensor(held_in), torch.tensor(held_out)).to(scores.dtype)


Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]  # A, BT, rank_expert, rank_scaling, spans


def pack_experts(experts: "list[LoraFactors | None]") -> Packed:
    """Concatenate the experts' factors along the rank axis, in routing order (None: absent from the module).

    Returns A (R, d), BT (R, o) in the first expert's dtype, rank_expert (R,) long, rank_scaling (R,) and the spans
    `[start, end)` of each expert's rows (None where absent)."""
    present = [factors for factors in experts if factors is not None]
    dtype = present[0].A.dtype
    spans, offset = [], 0
    for factors in experts:
        spans.append(None if factors is None else (offset, offset + factors.rank))
        offset += 0 if factors is None else factors.rank
    A = torch.cat([factors.A for factors in present], dim=0).to(dtype)
    BT = torch.cat([factors.B.T for factors in present], dim=0).to(dtype)
    rank_expert = torch.tensor([i for i, f in enumerate(experts) if f is not None for _ in range(f.rank)], dtype=torch.long)
    rank_scaling = torch.tensor([f.scaling for f in present for _ in range(f.rank)], dtype=dtype)
    return A, BT, rank_expert, rank_scaling, spans


@dataclass
class ExpertBank:
    """The experts at one module, concatenated along the rank axis (absent experts take no rows)."""

    A: torch.Tensor  # (R, d)
    BT: torch.Tensor  # (R, o): the B factors, transposed, so each rank's output direction is a contiguous row
    rank_expert: torch.Tensor  # (R,) long: which expert each rank row belongs to
    rank_scaling: torch.Tensor  # (R,) the LoRA scaling of that row's expert
    spans: list[tuple[int, int] | None]  # per expert: its [start, end) rows, None where it does not adapt here
    expert_slot: torch.Tensor  # (E,) long: position of each expert among those present here (-1 if absent)

    def __post_init__(self) -> None:
        self.device, self.dtype = self.A.device, self.A.dtype  # where the factors were when the bank was made
        present = [span for span in self.spans if span is not None]
        ranks = {end - start for start, end in present}
        expert_scaling = [0.0 if span is None else float(self.rank_scaling[span[0]]) for span in self.spans]
        scalings = {scaling for scaling, span in zip(expert_scaling, self.spans) if span is not None}
        self.num_experts = len(self.spans)
        self.num_present = len(present)
        self.max_rank = max(ranks, default=0)
        self.uniform_rank = ranks.pop() if len(ranks) == 1 else None  # None for mixed ranks
        self.uniform_scaling = scalings.pop() if len(scalings) == 1 else None  # None for mixed scalings
        self.expert_scaling = torch.tensor(expert_scaling, dtype=self.A.dtype, device=self.A.device)  # (E,)
        # (E,) bool: the experts adapting this module, or None when all do (nothing to mask before top-k).
        self.present = None if self.num_present == self.num_experts else self.expert_slot >= 0
        # Each expert's first row and rank (0 where absent), for the compiled kernel.
        self.expert_row_start = torch.tensor([0 if span is None else span[0] for span in self.spans])  # (E,)
        self.expert_rank = torch.tensor([0 if span is None else span[1] - span[0] for span in self.spans])  # (E,)
        self.native_ready = (  # whether the compiled kernel can read these factors
            native.available()
            and self.A.dtype == self.BT.dtype == torch.float32
            and self.A.device.type == "cpu"
            and self.A.is_contiguous()
            and self.BT.is_contiguous()
        )
        if self.native_ready:  # checked once here; each call then checks only its tokens
            native.check_layout(self.A, self.BT, self.expert_row_start, self.expert_rank, self.expert_scaling)
        if self.uniform_rank is not None:  # per-expert blocks of the factors, for gathering
            self.A_blocks = self.A.view(self.num_present, self.uniform_rank, -1)  # (P, r, d)
            self.BT_blocks = self.BT.view(self.num_present, self.uniform_rank, -1)  # (P, r, o)
        self.kernel_choices = KernelChoices()
        self._device_layout: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_factors(cls, experts: "list[LoraFactors | None]") -> "ExpertBank":
        """The bank of these experts (None: absent from the module), packed in routing order (`pack_experts`)."""
        A, BT, rank_expert, rank_scaling, spans = pack_experts(experts)
        present = torch.tensor([span is not None for span in spans])
        slot = torch.where(present, present.long().cumsum(0) - 1, -1)
        return cls(A=A, BT=BT, rank_expert=rank_expert, rank_scaling=rank_scaling, spans=spans, expert_slot=slot)

    def appended(self, factors: "LoraFactors | None") -> Packed:
        """The packed tensors with one more expert after the others (None: absent here), in this bank's dtype and
        device. The factors of an expert absent here are the same tensors, not copies."""
        index, rows = self.num_experts, self.A.shape[0]
        if factors is None:
            return self.A, self.BT, self.rank_expert, self.rank_scaling, [*self.spans, None]
        new = lambda values, dtype=self.dtype: torch.full((factors.rank,), values, dtype=dtype, device=self.device)  # noqa: E731
        return (
            torch.cat([self.A, factors.A.to(self.device, self.dtype)]),
            torch.cat([self.BT, factors.B.T.to(self.device, self.dtype)]),
            torch.cat([self.rank_expert, new(index, torch.long)]),
            torch.cat([self.rank_scaling, new(factors.scaling, self.rank_scaling.dtype)]),
            [*self.spans, (rows, rows + factors.rank)],
        )

    def without(self, index: int) -> Packed:
        """The packed tensors without expert `index` (later experts move up one index). Where it is absent, the
        factors are the same tensors, not copies."""
        span = self.spans[index]
        removed = 0 if span is None else span[1] - span[0]
        spans = [
            None if s is None else (s[0] - removed, s[1] - removed) if span is not None and s[0] >= span[1] else s
            for i, s in enumerate(self.spans) if i != index
        ]  # fmt: skip
        A, BT, rank_expert, rank_scaling = self.A, self.BT, self.rank_expert, self.rank_scaling
        if span is not None:
            keep = torch.ones(self.A.shape[0], dtype=torch.bool, device=self.device)
            keep[span[0] : span[1]] = False
            A, BT, rank_expert, rank_scaling = A[keep], BT[keep], rank_expert[keep], rank_scaling[keep]
        return A, BT, rank_expert - (rank_expert > index).long(), rank_scaling, spans

    def device_layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each expert's first row and rank (int32) and scaling on `device`, for the Triton kernel (copied once)."""
        layout = self._device_layout.get(device)
        if layout is None:
            layout = self._device_layout[device] = (
                self.expert_row_start.to(device=device, dtype=torch.int32),
                self.expert_rank.to(device=device, dtype=torch.int32),
                self.expert_scaling.to(device=device, dtype=torch.float32),
            )
        return layout


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


def route_and_apply_native(
    u: torch.Tensor,
    rows: torch.Tensor,
    standardized: bool,
    global_bias: torch.Tensor | None,
    k: int,
    bank: ExpertBank,
    out: torch.Tensor | None = None,
) -> tuple[Selection, torch.Tensor]:
    """`standardized_dots` (or `arrow_dots` when not `standardized`), `combine_logits`, `select_top_k` and
    `delta_native` in one compiled call, each token routed and its experts applied while it sits in cache.

    u (N, d) float32; rows (E, d) (`can_fuse_routing`); global_bias (B, E) for B consecutive groups of tokens, or
    None. Adds into `out` (N, o) (zeros if None); returns the selection (for traces) and `out`. No gradients.
    """
    out = _output(u, bank, out)
    x, target = _native_operands(u, out)
    if global_bias is not None and (global_bias.dtype != torch.float32 or not global_bias.is_contiguous()):
        global_bias = global_bias.to(torch.float32).contiguous()
    indices, weights = native.route_and_add(
        x, rows, standardized, LN_EPS, global_bias, k,
        bank.A, bank.BT, bank.expert_row_start, bank.expert_rank, bank.expert_scaling, target, layout_checked=True,
    )  # fmt: skip
    return Selection(indices=indices, weights=weights), _native_result(out, target)


def delta_gated_single(x: torch.Tensor, bank: ExpertBank, expert: int, gate: torch.Tensor) -> torch.Tensor:
    """Phatgoose gate training form, one expert: `sigmoid(gate . x) * s_e * B_e A_e x` on the raw x. (N, d) -> (N, o)."""
    span = bank.spans[expert]
    if span is None:
        return x.new_zeros(x.shape[0], bank.BT.shape[1])
    start, end = span
    probability = torch.sigmoid(x @ gate.to(x.dtype))  # (N,)
    hidden = (x @ bank.A[start:end].T) * (probability * bank.rank_scaling[start])[:, None]
    return hidden @ bank.BT[start:end]


# Cost model of the kernels on CPU, in microseconds, fitted to measurements on 2 cores (docs/benchmarks.md):
# a fixed cost per call, then multiply-adds at a kernel's rate, and for `concat` the pass over all its factors.
_FIXED_US = {"concat": 25.0, "gather": 30.0, "sparse": 100.0, "native": 8.0}
_MACS_PER_US = {"concat": 50e3, "gather": 0.8e3, "sparse": 12e3, "native": 20e3}  # gather: the rate of copying
_FACTOR_READS_PER_US = 8e3
_SPARSE_DTYPES = (torch.float32, torch.float64)


def runnable_kernels(bank: ExpertBank, dtype: torch.dtype, needs_grad: bool = False) -> tuple[str, ...]:
    """The kernels that can run a call: `native` needs its compiled library, contiguous float32 factors on CPU,
    float32 tokens and no gradients;
    `gather` and `sparse` need a rank shared by the experts present; `sparse` needs float32/64 and no gradients
    (torch's SDDMM backward disagreed with the dense products in our tests)."""
    kernels = ["concat"]
    if bank.uniform_rank is not None:
        kernels.append("gather")
        if dtype in _SPARSE_DTYPES and not needs_grad:
            kernels.append("sparse")
    if bank.native_ready and dtype == torch.float32 and not needs_grad:
        kernels.append("native")
    if dtype in _TRITON_DTYPES and not needs_grad and bank.A.dtype == bank.BT.dtype and triton_available(bank.A.device):
        kernels.append("triton")
    return tuple(kernels)


def kernel_costs(
    num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool = False
) -> dict[str, float]:
    """Modelled time of each kernel that can run this call (`runnable_kernels`) on CPU, in microseconds."""
    width = bank.A.shape[1] + bank.BT.shape[1]  # d + o
    total_rank = bank.A.shape[0]
    costs = {}
    for kernel in runnable_kernels(bank, dtype, needs_grad):
        if kernel == "triton":  # a GPU kernel (on CPU only under Triton's interpreter, never picked by "auto")
            continue
        if kernel == "concat":
            macs = num_tokens * total_rank * width
            costs[kernel] = _FIXED_US[kernel] + macs / _MACS_PER_US[kernel] + total_rank * width / _FACTOR_READS_PER_US
        else:  # only the selected experts' products
            macs = num_tokens * k * bank.max_rank * width
            costs[kernel] = _FIXED_US[kernel] + macs / _MACS_PER_US[kernel]
    return costs


#: On CUDA, below this many concatenated rank rows, `concat`'s two GEMMs over every expert are launch-bound and
#: cost no more than the grouped kernel's sort and schedule (a conservative rule, not yet fitted on a GPU).
CUDA_CONCAT_MAX_RANK_ROWS = 256


def choose_kernel_cuda(bank: ExpertBank, dtype: torch.dtype, needs_grad: bool) -> str:
    """The documented rule for CUDA (docs/routing.md): `concat` for small libraries or with gradients, else the
    grouped Triton kernel, else `gather` (it reads only the selected experts)."""
    kernels = runnable_kernels(bank, dtype, needs_grad)
    if bank.A.shape[0] <= CUDA_CONCAT_MAX_RANK_ROWS:
        return "concat"
    if "triton" in kernels:
        return "triton"
    return "gather" if "gather" in kernels else "concat"


class KernelChoices:
    """A bounded memory of kernel choices per call shape: token counts bucketed to powers of two, least recently
    used entries dropped past `capacity` (one entry per prompt length would grow without bound)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._choices: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        self._lock = threading.Lock()  # a model serves threads: lookups reorder, insertions evict

    def __getstate__(self) -> dict:  # models are copied and pickled: a lock is not, a fresh one is made
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def key(num_tokens: int, k: int, dtype: torch.dtype, needs_grad: bool, device_type: str) -> tuple:
        return (1 << max(num_tokens - 1, 0).bit_length(), k, dtype, needs_grad, device_type)

    def get(self, key: tuple) -> str | None:
        with self._lock:
            choice = self._choices.get(key)
            if choice is not None:
                self._choices.move_to_end(key)
            return choice

    def put(self, key: tuple, choice: str) -> None:
        with self._lock:
            self._choices[key] = choice
            if len(self._choices) > self.capacity:
                self._choices.popitem(last=False)

    def clear(self) -> None:
        """Forget every choice (e.g. after what a kernel needs changed)."""
        with self._lock:
            self._choices.clear()

    def __len__(self) -> int:
        return len(self._choices)


def choose_kernel(num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool = False) -> str:
    """The kernel for this call, by device: on CPU the cheapest by `kernel_costs` (at the bucket's token count),
    on CUDA `choose_kernel_cuda`'s rule. Remembered per bank in a bounded `KernelChoices`."""
    device_type = bank.A.device.type
    key = KernelChoices.key(num_tokens, k, dtype, needs_grad, device_type)
    choice = bank.kernel_choices.get(key)
    if choice is None:
        if device_type == "cuda":
            choice = choose_kernel_cuda(bank, dtype, needs_grad)
        else:
            costs = kernel_costs(key[0], bank, k, dtype, needs_grad)
            choice = min(costs, key=costs.get)
        bank.kernel_choices.put(key, choice)
    return choice


_KERNEL_FUNCTIONS = {
    "concat": delta_concat, "gather": delta_gather, "sparse": delta_sparse, "native": delta_native,
    "triton": delta_triton,
}  # fmt: skip


def _needs_grad(bank: ExpertBank, *inputs: torch.Tensor) -> bool:
    """Whether a call must carry gradients: to its inputs, or to the experts' factors when they are trainable."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, bank.A, bank.BT))


def route(
    u: torch.Tensor,
    bank: ExpertBank,
    router_rows: torch.Tensor,
    standardized: bool,
    k: int,
    global_bias: torch.Tensor | None = None,
    kernel: str = "auto",
    out: torch.Tensor | None = None,
) -> tuple[Selection, torch.Tensor]:
    """GLIDER at one module for one call: the single entry point of a Glider layer.

    Local scores of the tokens u (N, d) against the router rows (E, d) (`phatgoose_rows` when `standardized`, else
    `arrow_rows`), plus the global bias (B, E) per group of rows (`combine_logits`), experts absent here masked,
    top-k and softmax (`select_top_k`), then the selected experts' products by the kernel resolved once for this
    call (`resolve_kernel`; the compiled one routes too). Adds into `out` (N, o) (zeros if None) and returns the
    selection with it.

    Differentiable in the router rows (the gates reach the loss through the chosen experts' softmax weights), in u
    and in the factors (when trainable): when gradients are needed the kernel is one that carries them.
    """
    needs_grad = _needs_grad(bank, u, router_rows)
    if not _warned_no_native and not needs_grad and u.dtype == torch.float32 and u.device.type == "cpu":
        _warn_without_native()
    chosen = resolve_kernel(kernel, u.shape[0], bank, k, u.dtype, needs_grad)
    if chosen == "native" and can_fuse_routing(router_rows, bank):
        return route_and_apply_native(u, router_rows, standardized, global_bias, k, bank, out)
    scored = u if u.dtype == router_rows.dtype else u.to(router_rows.dtype)
    local = standardized_dots(scored, router_rows) if standardized else arrow_dots(scored, router_rows)  # (N, E)
    selection = select_top_k(combine_logits(local, global_bias), bank.present, k)
    return selection, _KERNEL_FUNCTIONS[chosen](u, bank, selection, out)


_warned_no_native = False


def _warn_without_native() -> None:
    """Once per process: float32 CPU inference without the compiled kernel runs, correctly, on the slower torch
    kernels."""
    global _warned_no_native
    _warned_no_native = True
    if not native.available():
        warn_user(
            "peft-glider's compiled CPU kernel is not built (no C compiler, or no OpenMP, at install time): float32 "
            "CPU inference runs on the pure-torch kernels, correct but slower. Reinstall with gcc or clang to build it."
        )


def apply_experts(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, kernel: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Add `sum_j w_j * s_j * B_j A_j x` over each token's selected experts (a selection made elsewhere) into
    `out` (zeros if None). x (N, d).

    A forced kernel that cannot run this call (`runnable_kernels`: `gather` or `sparse` with mixed ranks, `sparse`
    or `native` in half precision or with gradients, `native` unbuilt or off CPU) falls back to `concat`, which
    runs everywhere.
    """
    n, k = selection.indices.shape
    kernel = resolve_kernel(kernel, n, bank, k, x.dtype, _needs_grad(bank, x, selection.weights))
    return _KERNEL_FUNCTIONS[kernel](x, bank, selection, out)


def resolve_kernel(
    kernel: str, num_tokens: int, bank: ExpertBank, k: int, dtype: torch.dtype, needs_grad: bool
) -> str:
    """The kernel a call runs: `choose_kernel`'s for "auto", a forced one where it can run, else `concat`."""
    if kernel == "auto":
        return choose_kernel(num_tokens, bank, k, dtype, needs_grad)
    if kernel not in _KERNEL_FUNCTIONS:
        raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
    return kernel if kernel in runnable_kernels(bank, dtype, needs_grad) else "concat"
