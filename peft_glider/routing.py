"""The routing maths of GLIDER (see `docs/algorithm.md`) and `route`, the one entry point of a Glider layer: local
scores, the global bias, top-k and softmax, then the selected experts' products by the kernel the call resolves.

Shapes: N tokens, d input features, o output features, E experts, k selected experts per token, R the sum of the
experts' ranks at one module. The experts are packed in `bank`, their products computed in `kernels`, the kernel
chosen in `kernel_choice`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import native
from ._warnings import warn_user
from .bank import LN_EPS, ExpertBank, Selection
from .kernel_choice import resolve_kernel, token_bucket
from .kernels import KERNEL_FUNCTIONS, bind_native_routing, can_fuse_routing, route_and_apply_native

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
    """`LN(u) @ rows.T` for zero-mean rows (standardized gates): u (N, d), rows (E, d) -> (N, E); or per group of
    tokens, u (B, T, d) and rows (B, M, d) -> (B, T, M).

    The mean of `u` drops out against zero-mean rows, so only its scale is needed: `(u @ rows.T) / std(u)`, with
    `d var(u) = |u|^2 - (sum u)^2 / d` from two fast reductions, no standardized copy of the tokens (torch's fused
    `var_mean` is ten times slower on CPU). A few tokens (decoding) take one fused layer norm instead.
    """
    d = u.shape[-1]
    if u.numel() <= _LAYER_NORM_MAX_FEATURES:
        return torch.nn.functional.layer_norm(u, (d,), eps=LN_EPS) @ rows.mT
    total = u.sum(dim=-1, keepdim=True)  # (N, 1)
    d_variance = torch.addcmul(torch.linalg.vector_norm(u, dim=-1, keepdim=True).square(), total, total, value=-1 / d)
    # Rounding can leave the variance a hair below zero for constant tokens: clamp it to zero.
    inverse_std = torch.rsqrt(d_variance.clamp_min(0.0) / d + LN_EPS)  # (N, 1)
    return (u @ rows.mT).mul_(inverse_std)


def arrow_rows(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """`v_e / T`, (E, d), from unit prototypes v_e: what tokens are multiplied with (once per prototype update)."""
    return prototypes / temperature


def arrow_dots(u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Arrow scores `|u . v_e| / T = |u . (v_e / T)|` from `arrow_rows`: u (N, d), rows (E, d) -> (N, E); or
    per group, u (B, T, d) and rows (B, M, d) -> (B, T, M)."""
    return (u @ rows.mT).abs()


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of `B @ A` (d,), from the factors only: A (r, d), B (o, r).

    With `A.T = Q R` (Q: d x r orthonormal), `B @ A = (B @ R.T) @ Q.T`; if `B @ R.T = U S V.T` then the right
    singular vectors of `B @ A` are `Q @ V`. Only r x r and o x r decompositions are needed. The sign is arbitrary.
    """
    Q, R = torch.linalg.qr(A.T.to(torch.float64))  # (d, r), (r, r)
    _, _, Vh = torch.linalg.svd(B.to(torch.float64) @ R.T, full_matrices=False)
    return (Q @ Vh[0]).to(A.dtype)


def select_top_k(logits: torch.Tensor, present: torch.Tensor | None, k: int) -> Selection:
    """Mask experts absent from the module, keep the k largest logits, softmax over them.

    logits (N, E); present (E,) bool, or None when every expert adapts the module; k must not exceed the
    number of present experts.
    """
    masked = logits if present is None else logits.masked_fill(~present, float("-inf"))
    top_logits, indices = masked.topk(k, dim=-1)
    return Selection(indices=indices, weights=torch.softmax(top_logits, dim=-1))


def candidate_experts(scores: torch.Tensor, present: torch.Tensor | None, m: int) -> torch.Tensor:
    """Each row's `m` experts of best global score among those present at a module: scores (B, E), present (E,)
    bool or None (all) -> (B, m) expert indices. Where fewer than m are present, absent ones fill the rest (their
    logits are masked later)."""
    masked = scores if present is None else scores.masked_fill(~present.to(scores.device), float("-inf"))
    return masked.topk(m, dim=-1).indices


@dataclass
class Candidates:
    """Each group's candidate experts at one module with what scoring them needs, gathered once per call
    (`gather_candidates`) and reused by every forward of the call (each decoding step)."""

    indices: torch.Tensor  # (B, M) expert indices
    rows: torch.Tensor  # (B, M, d) their router rows
    bias: torch.Tensor  # (B, 1, M) their global bias
    absent: torch.Tensor | None  # (B, 1, M) bool: candidates not adapting the module (fewer than M do); None: none
    source: torch.Tensor  # (E, d) what the rows were gathered from: the router rows, or the gates (`rows_of`)


def gather_candidates(
    scores: torch.Tensor,
    global_bias: torch.Tensor,
    source: torch.Tensor,
    present: torch.Tensor | None,
    m: int,
    rows_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    row_index: torch.Tensor | None = None,
) -> Candidates:
    """Each group's `candidate_experts` (by the global scores (B, E)), their router rows and their global bias from
    `global_bias` (B, E), on the rows' device. The rows are gathered from `source` (E, d): the router rows, or, with
    `rows_of`, the gates, whose candidates' rows it computes (each row depends on its own gate only, so this equals
    gathering from all E rows without computing them). `row_index` (E,): each expert's row of `source` when it
    holds only some experts' (a resident-experts budget; -1 for the others, whose gathered rows are another
    expert's: routing masks them, or `check_resident` refuses the call)."""
    indices = candidate_experts(scores, present, m).to(source.device)
    absent = None if present is None else ~present[indices].unsqueeze(1)
    gathered = source[indices if row_index is None else row_index[indices].clamp_min(0)]  # (B, M, d)
    rows = gathered if rows_of is None else rows_of(gathered.reshape(-1, gathered.shape[-1])).view(gathered.shape)
    bias = global_bias.to(source.device).gather(1, indices).to(rows.dtype).unsqueeze(1)
    return Candidates(indices, rows, bias, absent if absent is not None and absent.any() else None, source)


def select_among_candidates(u: torch.Tensor, candidates: Candidates, standardized: bool, k: int) -> Selection:
    """Top-k and softmax over each group's candidate experts only: the local scores of the tokens u (N, d), in B
    consecutive groups (as in `combine_logits`), against the candidates' router rows, plus their global bias.
    Returns expert indices into all E experts."""
    groups = candidates.indices.shape[0]
    tokens = u.view(groups, -1, u.shape[-1])  # (B, T, d)
    rows = candidates.rows  # (B, M, d)
    local = standardized_dots(tokens, rows) if standardized else arrow_dots(tokens, rows)  # (B, T, M)
    logits = local + candidates.bias
    if candidates.absent is not None:
        logits = logits.masked_fill(candidates.absent, float("-inf"))
    top_logits, chosen = logits.topk(k, dim=-1)  # (B, T, k) positions among the candidates
    indices = candidates.indices.unsqueeze(1).expand(-1, tokens.shape[1], -1).gather(2, chosen)
    return Selection(indices=indices.reshape(-1, k), weights=torch.softmax(top_logits, dim=-1).reshape(-1, k))


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


def _needs_grad(bank: ExpertBank, *inputs: torch.Tensor) -> bool:
    """Whether a call must carry gradients: to its inputs, or to the experts' factors when they are trainable."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, bank.A, bank.BT))


class FusedRoute:
    """A decision of `route` that a call keeps per bank (in its `bindings`): for these router rows and global bias
    (the same tensors), k, router, kernel setting and token-count bucket, the compiled kernel routes, bound once
    (`bind_native_routing`). The call's later forwards through the module (each decoding step) reuse it and skip
    the kernel choice, the operands' checks and the binding (~6 microseconds a module). Rows change identity when
    the gates change, so a stale decision never serves."""

    __slots__ = ("router_rows", "global_bias", "kernel", "tokens_bucket", "bound")

    def __init__(
        self, router_rows: torch.Tensor, global_bias: torch.Tensor | None, kernel: str, tokens_bucket: int,
        bound: "native.RouteAndAdd",
    ) -> None:  # fmt: skip
        self.router_rows, self.global_bias, self.kernel = router_rows, global_bias, kernel
        self.tokens_bucket, self.bound = tokens_bucket, bound  # the binding holds k and `standardize` itself

    def serves(
        self, u: torch.Tensor, bank: ExpertBank, router_rows: torch.Tensor, global_bias: torch.Tensor | None,
        standardized: bool, k: int, kernel: str,
    ) -> bool:  # fmt: skip
        """Whether `route` with these arguments would make this decision again."""
        return (
            router_rows is self.router_rows
            and global_bias is self.global_bias
            and k == self.bound.k
            and standardized == self.bound.standardize
            and kernel == self.kernel
            and u.dtype is torch.float32
            and token_bucket(u.shape[0]) == self.tokens_bucket
            and not _needs_grad(bank, u, router_rows)
        )


def route(
    u: torch.Tensor,
    bank: ExpertBank,
    router_rows: torch.Tensor,
    standardized: bool,
    k: int,
    global_bias: torch.Tensor | None = None,
    kernel: str = "auto",
    out: torch.Tensor | None = None,
    candidates: Candidates | None = None,
    bindings: dict | None = None,
    want_selection: bool = True,
) -> tuple[Selection | None, torch.Tensor]:
    """GLIDER at one module for one call: the single entry point of a Glider layer.

    Local scores of the tokens u (N, d) against the router rows (E, d) (`phatgoose_rows` when `standardized`, else
    `arrow_rows`), plus the global bias (B, E) per group of rows (`combine_logits`), experts absent here masked,
    top-k and softmax (`select_top_k`), then the selected experts' products by the kernel resolved once for this
    call (`resolve_kernel`; the compiled one routes too). Adds into `out` (N, o) (zeros if None) and returns the
    selection with it. With `candidates` (gathered from these router rows and the global bias by
    `gather_candidates`), only those experts are scored (`select_among_candidates`). `bindings`: the call's own
    dict, where it keeps its compiled routing decisions per bank (`FusedRoute`) for its later forwards. Without
    `want_selection` (no trace records it), the compiled kernel keeps the selection to itself and None is returned
    in its place.

    Differentiable in the router rows (the gates reach the loss through the chosen experts' softmax weights), in u
    and in the factors (when trainable): when gradients are needed the kernel is one that carries them.
    """
    if bindings is not None and torch.compiler.is_compiling():
        bindings = None  # torch.compile traces the general path: its fake tensors have no addresses to bind
    if bindings is not None and candidates is None:
        fused = bindings.get(bank)
        if fused is not None and fused.serves(u, bank, router_rows, global_bias, standardized, k, kernel):
            return route_and_apply_native(u, fused.bound, bank, out, want_selection)
    if bank.partial and candidates is None:
        raise RuntimeError(
            "This Glider adapter holds only some experts' factors (max_resident_experts) and this call has no "
            "candidates: run it inside route(...) or global_scores(...) with GliderConfig(candidates=M), so that "
            "its experts are made resident when it begins."
        )
    needs_grad = _needs_grad(bank, u, router_rows)
    if not _warned_no_native and not needs_grad and u.dtype == torch.float32 and u.device.type == "cpu":
        _warn_without_native()
    chosen = resolve_kernel(kernel, u.shape[0], bank, k, u.dtype, needs_grad)
    scored = u if u.dtype == router_rows.dtype else u.to(router_rows.dtype)
    if candidates is not None:
        selection = select_among_candidates(scored, candidates, standardized, k)
        return selection, KERNEL_FUNCTIONS[chosen](u, bank, selection, out)
    if chosen == "native" and can_fuse_routing(router_rows, bank):
        bound = bind_native_routing(router_rows, standardized, global_bias, k, bank)
        if bindings is not None:
            bindings[bank] = FusedRoute(router_rows, global_bias, kernel, token_bucket(u.shape[0]), bound)
        return route_and_apply_native(u, bound, bank, out, want_selection)
    local = standardized_dots(scored, router_rows) if standardized else arrow_dots(scored, router_rows)  # (N, E)
    selection = select_top_k(combine_logits(local, global_bias), bank.present, k)
    return selection, KERNEL_FUNCTIONS[chosen](u, bank, selection, out)


_warned_no_native = False


def check_resident(bank: ExpertBank, candidates: Candidates) -> None:
    """Under a resident-experts budget, a call may only route among experts whose factors are here: refuse
    candidates that were not made resident when the call began (never route to missing factors)."""
    indices = candidates.indices
    missing = bank.expert_slot[indices] < 0
    if bank.present is not None:
        missing &= bank.present[indices]
    if bool(missing.any()):
        raise RuntimeError(
            "A Glider call's candidate experts are not resident (max_resident_experts): their factors are made "
            "resident when route(...) or global_scores(...) is entered; route inside one."
        )


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
    return KERNEL_FUNCTIONS[kernel](x, bank, selection, out)
