"""The routing maths of GLIDER, in one place (see `docs/algorithm.md`).

Shapes: N tokens, d input features, o output features, E experts, k selected experts per token, R the sum of the
experts' ranks at one module (the experts' A factors are concatenated along the rank axis, B factors likewise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LN_EPS = 1e-5

#: The sparse kernels this module offers; "auto" picks one per call from the shapes.
KERNELS = ("auto", "grouped", "concat")

# Fixed cost of one expert's pair of small matmuls in the grouped kernel, in multiply-add equivalents: a launch
# overhead of roughly 10-20 microseconds on CPU. Decides "auto" between the two kernels.
_GROUPED_CALL_OVERHEAD = 200_000
# The padded grouped kernel gives up (and uses the concatenated-rank GEMMs) when padding every expert's group to
# the largest one would multiply the routed token copies by more than this.
_MAX_PADDING = 4


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


def standardized_dots(u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`LN(u) @ rows.T` for zero-mean rows (standardized gates): u (N, d), rows (E, d) -> (N, E).

    The mean of `u` drops out against zero-mean rows, so only its scale is needed: `(u @ rows.T) / std(u)`, with
    `var(u) = |u|^2 / d - mean(u)^2` from two reductions (no standardized copy of the tokens is made).
    """
    d = u.shape[-1]
    mean = u.sum(dim=-1, keepdim=True) / d
    mean_square = torch.linalg.vector_norm(u, dim=-1, keepdim=True).square() / d
    inverse_std = torch.rsqrt((mean_square - mean.square()).clamp_min(0.0) + LN_EPS)
    return (u @ rows.T) * inverse_std


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


def combine_logits(local: torch.Tensor, global_bias: torch.Tensor | None, tokens_per_row: int) -> torch.Tensor:
    """`local + alpha * global`, the per-row global bias (rows, E) repeated for each token of its row."""
    if global_bias is None:
        return local
    return local + global_bias.to(local.dtype).repeat_interleave(tokens_per_row, dim=0)


def auto_alpha(scores: torch.Tensor, threshold: float, held_in: float, held_out: float) -> torch.Tensor:
    """Per-row alpha (B,): `held_in` where the row's best global score reaches `threshold` (the query looks like
    one of the experts' tasks, so the global router should decide), else `held_out` (a mild prior)."""
    best = scores.max(dim=-1).values
    return torch.where(best >= threshold, torch.tensor(held_in), torch.tensor(held_out)).to(scores.dtype)


@dataclass
class ExpertBank:
    """The experts at one module, concatenated along the rank axis."""

    A: torch.Tensor  # (R, d)
    B: torch.Tensor  # (o, R)
    rank_expert: torch.Tensor  # (R,) long: which expert each rank row belongs to
    rank_scaling: torch.Tensor  # (R,) the LoRA scaling of that row's expert
    spans: list[tuple[int, int] | None]  # per expert: its [start, end) rows, None where it does not adapt here
    expert_slot: torch.Tensor  # (E,) long: position of each expert among those present here (-1 if absent)

    def __post_init__(self) -> None:
        ranks = {end - start for start, end in (span for span in self.spans if span is not None)}
        self.num_experts = len(self.spans)
        self.num_present = sum(span is not None for span in self.spans)
        self.uniform_rank = ranks.pop() if len(ranks) == 1 else None  # None for mixed ranks
        self._kernel_choice: dict[tuple[int, int], str] = {}


def _output(x: torch.Tensor, bank: ExpertBank, out: torch.Tensor | None) -> torch.Tensor:
    return x.new_zeros(x.shape[0], bank.B.shape[0]) if out is None else out


def delta_concat(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Two GEMMs over the concatenated ranks, unselected experts weighted zero; adds into `out` (N, o).

    Costs N * R * (d + o) and a fixed handful of calls: best when R is small (few experts) or N is small
    (decode), where call overhead rules.
    """
    n = x.shape[0]
    expert_weight = x.new_zeros(n, bank.num_experts).scatter_(1, selection.indices, selection.weights.to(x.dtype))
    coefficient = expert_weight[:, bank.rank_expert] * bank.rank_scaling  # (N, R)
    return _output(x, bank, out).addmm_((x @ bank.A.T) * coefficient, bank.B.T)


def delta_grouped(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Group the (token, choice) pairs by expert; each expert computes only its own tokens; adds into `out`.

    Costs N * k * r * (d + o) multiply-adds. With a rank shared by the experts present, the groups are padded
    to the largest group and computed by two batched GEMMs (a fixed number of calls whatever E), unless the
    routing is too unbalanced to pad; with mixed ranks, a loop over the experts that received tokens.
    """
    out = _output(x, bank, out)
    n, k = selection.indices.shape
    flat_expert = selection.indices.reshape(-1)  # (N*k,)
    order = torch.argsort(flat_expert, stable=True)
    tokens = order // k  # token of each pair, pairs grouped by expert
    weights = selection.weights.reshape(-1)[order].to(x.dtype)
    experts = flat_expert[order]
    rank = bank.uniform_rank
    if rank is not None:
        present = bank.A.shape[0] // rank
        slots = bank.expert_slot[experts]  # (N*k,) group of each pair
        counts = torch.bincount(slots, minlength=present)
        position = torch.arange(slots.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[slots]
        capacity = int(counts.max())
        if capacity * present > _MAX_PADDING * slots.numel():  # routing too unbalanced to pad: one dense pass
            return delta_concat(x, bank, selection, out)
        grouped_x = x.new_zeros(present, capacity, x.shape[1])
        grouped_x[slots, position] = x.index_select(0, tokens)
        hidden = torch.bmm(grouped_x, bank.A.view(present, rank, -1).transpose(1, 2))  # (P, C, r)
        grouped_w = x.new_zeros(present, capacity, 1)
        grouped_w[slots, position, 0] = weights * bank.rank_scaling[slots * rank]
        b_groups = bank.B.view(bank.B.shape[0], present, rank).permute(1, 2, 0)  # (P, r, o)
        grouped_y = torch.bmm(hidden * grouped_w, b_groups)  # (P, C, o)
        return out.index_add_(0, tokens, grouped_y[slots, position])
    counts = torch.bincount(flat_expert, minlength=bank.num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        chosen = tokens[start : start + count]
        row_start, row_end = bank.spans[expert]
        scale = weights[start : start + count, None] * bank.rank_scaling[row_start]
        hidden = (x.index_select(0, chosen) @ bank.A[row_start:row_end].T) * scale  # (count, r)
        out.index_add_(0, chosen, hidden @ bank.B[:, row_start:row_end].T)
        start += count
    return out


def delta_gated_single(x: torch.Tensor, bank: ExpertBank, expert: int, gate: torch.Tensor) -> torch.Tensor:
    """Phatgoose gate training form, one expert: `sigmoid(gate . x) * s_e * B_e A_e x` on the raw x. (N, d) -> (N, o)."""
    span = bank.spans[expert]
    if span is None:
        return x.new_zeros(x.shape[0], bank.B.shape[0])
    start, end = span
    probability = torch.sigmoid(x @ gate.to(x.dtype))  # (N,)
    hidden = (x @ bank.A[start:end].T) * (probability * bank.rank_scaling[start])[:, None]
    return hidden @ bank.B[:, start:end].T


def choose_kernel(num_tokens: int, bank: ExpertBank, k: int) -> str:
    """Pick the cheaper kernel from a cost model fitted to CPU measurements (docs/benchmarks.md): the
    concatenated-rank GEMMs cost N * R * (d + o); grouping costs a few memory passes over the N * k routed
    token copies plus a fixed overhead, and only pays off once R is several times k * r."""
    choice = bank._kernel_choice.get((num_tokens, k))
    if choice is None:
        width = bank.A.shape[1] + bank.B.shape[0]
        concat_cost = num_tokens * bank.A.shape[0] * width
        calls = 12 if bank.uniform_rank is not None else 4 * min(bank.num_present, num_tokens * k)
        grouped_cost = 160 * num_tokens * k * width + calls * _GROUPED_CALL_OVERHEAD
        choice = bank._kernel_choice[(num_tokens, k)] = "concat" if concat_cost <= grouped_cost else "grouped"
    return choice


def apply_experts(
    x: torch.Tensor, bank: ExpertBank, selection: Selection, kernel: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Add `sum_j w_j * s_j * B_j A_j x` over each token's selected experts into `out` (zeros if None). x (N, d)."""
    if kernel == "auto":
        kernel = choose_kernel(x.shape[0], bank, selection.indices.shape[1])
    if kernel == "concat":
        return delta_concat(x, bank, selection, out)
    if kernel == "grouped":
        return delta_grouped(x, bank, selection, out)
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
