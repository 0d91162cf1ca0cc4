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


def standardize(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """`(x - mean(x)) / sqrt(var(x) + eps)` over the last axis, without affine parameters."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def local_scores(u: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Phatgoose scores `LN(u) . LN(gate_e) / sqrt(d)`: u (N, d), gates (E, d) -> (N, E).

    `LN(gate_e)` has zero mean, so the mean of `u` drops out of the dot product and only `u`'s scale is needed:
    `LN(u) . LN(g) = (u . LN(g)) / sqrt(var(u) + eps)`. That saves standardizing every token.
    """
    d = u.shape[-1]
    var = u.var(dim=-1, keepdim=True, unbiased=False)  # (N, 1)
    return (u @ standardize(gates).T) / (torch.sqrt(var + LN_EPS) * math.sqrt(d))


def arrow_scores(u: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Arrow scores `|u . v_e| / T`: u (N, d), prototypes (E, d) unit vectors -> (N, E)."""
    return (u @ prototypes.T).abs() / temperature


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


def select_top_k(logits: torch.Tensor, present: torch.Tensor, k: int) -> Selection:
    """Mask experts absent from the module, keep the k largest logits, softmax over them.

    logits (N, E); present (E,) bool; k must not exceed the number of present experts.
    """
    masked = logits.masked_fill(~present, float("-inf"))
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

    @property
    def num_experts(self) -> int:
        return len(self.spans)


def delta_concat(x: torch.Tensor, bank: ExpertBank, selection: Selection) -> torch.Tensor:
    """Two GEMMs over the concatenated ranks, unselected experts weighted zero. x (N, d) -> (N, o).

    Costs N * R * (d + o): best when R is small (few experts) or N is small (decode), where call overhead rules.
    """
    n = x.shape[0]
    expert_weight = x.new_zeros(n, bank.num_experts).scatter_(1, selection.indices, selection.weights.to(x.dtype))
    coefficient = expert_weight[:, bank.rank_expert] * bank.rank_scaling  # (N, R)
    return ((x @ bank.A.T) * coefficient) @ bank.B.T


def delta_grouped(x: torch.Tensor, bank: ExpertBank, selection: Selection) -> torch.Tensor:
    """Group the (token, choice) pairs by expert; each expert computes only its own tokens. x (N, d) -> (N, o).

    Costs N * k * r * (d + o) plus a fixed overhead per expert that received tokens.
    """
    n, k = selection.indices.shape
    flat_expert = selection.indices.reshape(-1)  # (N*k,)
    order = torch.argsort(flat_expert, stable=True)
    pair_token = order // k  # token of each pair, grouped by expert
    pair_weight = selection.weights.reshape(-1)[order].to(x.dtype)
    counts = torch.bincount(flat_expert, minlength=bank.num_experts).tolist()
    out = x.new_zeros(n, bank.B.shape[0])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = pair_token[start : start + count]
        row_start, row_end = bank.spans[expert]
        scale = pair_weight[start : start + count, None] * bank.rank_scaling[row_start]
        hidden = (x[tokens] @ bank.A[row_start:row_end].T) * scale  # (count, r)
        out.index_add_(0, tokens, hidden @ bank.B[:, row_start:row_end].T)
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
    """Pick the cheaper kernel by a multiply-add count plus per-call overhead."""
    total_rank = bank.A.shape[0]
    width = bank.A.shape[1] + bank.B.shape[0]
    mean_rank = total_rank / sum(span is not None for span in bank.spans)
    concat_cost = num_tokens * total_rank * width
    active_experts = min(bank.num_experts, num_tokens * k)
    grouped_cost = num_tokens * k * mean_rank * width + active_experts * _GROUPED_CALL_OVERHEAD
    return "concat" if concat_cost <= grouped_cost else "grouped"


def apply_experts(x: torch.Tensor, bank: ExpertBank, selection: Selection, kernel: str = "auto") -> torch.Tensor:
    """`sum_j w_j * s_j * B_j A_j x` over each token's selected experts. x (N, d) -> (N, o)."""
    if kernel == "auto":
        kernel = choose_kernel(x.shape[0], bank, selection.indices.shape[1])
    if kernel == "concat":
        return delta_concat(x, bank, selection)
    if kernel == "grouped":
        return delta_grouped(x, bank, selection)
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
