"""One module's experts packed for the kernels, and what the kernels consume: `ExpertBank` (built once per set of
experts, `pack_experts` / `ExpertBank.from_factors` the one place that packs them), `Selection`, `LN_EPS`.

Shapes: E experts, R the sum of the experts' ranks at the module (A factors concatenated along the rank axis, B
factors likewise), d input and o output features.

With a resident-experts budget (`GliderConfig.max_resident_experts`) a bank holds the factors of the resident experts
only: `adapts` then says which experts adapt the module (what routing masks), the spans which of them are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import native
from .factors import LoraFactors

LN_EPS = 1e-5


@dataclass
class Selection:
    """The experts chosen for each token and their mixing weights."""

    indices: torch.Tensor  # (N, k) expert indices, best first
    weights: torch.Tensor  # (N, k) softmax over the selected logits


class Packed(NamedTuple):
    """One module's experts packed for the kernels (see `pack_experts`)."""

    A: torch.Tensor  # (R, d)
    BT: torch.Tensor  # (R, o)
    rank_expert: torch.Tensor  # (R,) long
    rank_scaling: torch.Tensor  # (R,)
    spans: list  # per expert: [start, end) of its rows, None where absent
    shift: torch.Tensor | None = None  # (E, o) DoRA's g - 1 per expert (0 for a plain LoRA); None without DoRA
    bias: torch.Tensor | None = None  # (E, o) the B factors' biases (0 where none); None without any

    def to(self, device: torch.device, dtype: torch.dtype | None) -> "Packed":
        """The packed tensors on `device`, the floating ones in `dtype` (None: kept)."""
        floating = {name: getattr(self, name) for name in ("A", "BT", "rank_scaling", "shift", "bias")}
        moved = {name: None if t is None else t.to(device, dtype=dtype) for name, t in floating.items()}
        return self._replace(rank_expert=self.rank_expert.to(device), **moved)


def _output_terms(experts: list[LoraFactors | None], kind: str, o: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(E, o): each expert's `kind` vector ("shift" or "bias"), zeros where it has none; None when no expert has."""
    rows = [None if factors is None else getattr(factors, kind) for factors in experts]
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros(o, dtype=dtype) if row is None else row.to(dtype) for row in rows])


def pack_experts(experts: list[LoraFactors | None], features: tuple[int, int] | None = None) -> Packed:
    """Concatenate the experts' factors along the rank axis, in routing order (None: absent from the module).

    Returns A (R, d), BT (R, o) in the first expert's dtype, rank_expert (R,) long, rank_scaling (R,), the spans
    `[start, end)` of each expert's rows (None where absent), and the experts' per-output terms (DoRA's shift, B's
    bias; None when no expert has one). DoRA experts come prepared (`factors.prepared_for_kernels`: B rescaled, the shift
    made). With no expert here, `features` (d, o) shapes the empty factors (float32)."""
    present = [factors for factors in experts if factors is not None]
    if not present:
        d, o = features
        return Packed(torch.zeros(0, d), torch.zeros(0, o), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                      [None] * len(experts))
    dtype = present[0].A.dtype
    spans, offset = [], 0
    for factors in experts:
        spans.append(None if factors is None else (offset, offset + factors.rank))
        offset += 0 if factors is None else factors.rank
    A = torch.cat([factors.A for factors in present], dim=0).to(dtype)
    BT = torch.cat([factors.B.T for factors in present], dim=0).to(dtype)
    rank_expert = torch.tensor([i for i, f in enumerate(experts) if f is not None for _ in range(f.rank)], dtype=torch.long)
    rank_scaling = torch.tensor([f.scaling for f in present for _ in range(f.rank)], dtype=dtype)
    o = BT.shape[1]
    return Packed(A, BT, rank_expert, rank_scaling, spans,
                  _output_terms(experts, "shift", o, dtype), _output_terms(experts, "bias", o, dtype))


def expert_slots(spans: list) -> torch.Tensor:
    """(E,) long: each expert's position among the experts present at the module, -1 where it is absent."""
    present = torch.tensor([span is not None for span in spans])
    return torch.where(present, present.long().cumsum(0) - 1, -1)


@dataclass(eq=False)  # compared and hashed by identity: kernel choices are kept per bank
class ExpertBank:
    """The experts at one module, concatenated along the rank axis (absent experts take no rows)."""

    A: torch.Tensor  # (R, d)
    BT: torch.Tensor  # (R, o): the B factors, transposed, so each rank's output direction is a contiguous row
    rank_expert: torch.Tensor  # (R,) long: which expert each rank row belongs to
    rank_scaling: torch.Tensor  # (R,) the LoRA scaling of that row's expert
    spans: list[tuple[int, int] | None]  # per expert: its [start, end) rows, None where its factors are not here
    expert_slot: torch.Tensor  # (E,) long: position of each expert among those present here (-1 if absent)
    # (E,) bool: the experts adapting the module, when not all of their factors are here (a resident-experts
    # budget); None: exactly the experts with factors here adapt it.
    adapts: torch.Tensor | None = None
    # (E, o) per-expert output terms, mixed by the routing weights (`kernels.output_terms`): DoRA's g - 1, which
    # multiplies the base layer's output W x, and the B factors' biases (times the scaling); None where no expert has
    shift: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.device, self.dtype = self.A.device, self.A.dtype  # where the factors were when the bank was made
        present = [span for span in self.spans if span is not None]
        ranks = {end - start for start, end in present}
        expert_scaling = [0.0 if span is None else float(self.rank_scaling[span[0]]) for span in self.spans]
        scalings = {scaling for scaling, span in zip(expert_scaling, self.spans) if span is not None}
        self.num_experts = len(self.spans)
        # whether some expert here adds a per-output term (DoRA, a biased B) beyond its low-rank product
        self.has_output_terms = self.shift is not None or self.bias is not None
        self.num_present = len(present)
        self.max_rank = max(ranks, default=0)
        self.uniform_rank = ranks.pop() if len(ranks) == 1 else None  # None for mixed ranks
        self.uniform_scaling = scalings.pop() if len(scalings) == 1 else None  # None for mixed scalings
        self.expert_scaling = torch.tensor(expert_scaling, dtype=self.A.dtype, device=self.A.device)  # (E,)
        adapting = self.expert_slot >= 0 if self.adapts is None else self.adapts
        self.num_adapting = int(adapting.sum())
        # Whether some experts adapting the module have no factors here: routing must then stay among those that do.
        self.partial = self.num_adapting > self.num_present
        # (E,) bool: the experts adapting this module, or None when all do (nothing to mask before top-k).
        self.present = None if self.num_adapting == self.num_experts else adapting
        # Each expert's first row and rank (0 where absent), for the compiled kernel.
        self.expert_row_start = torch.tensor([0 if span is None else span[0] for span in self.spans])  # (E,)
        self.expert_rank = torch.tensor([0 if span is None else span[1] - span[0] for span in self.spans])  # (E,)
        self.native_ready = (  # whether the compiled kernel can read these factors
            native.available()
            and self.num_present > 0
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
        self._device_layout: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_factors(cls, experts: list[LoraFactors | None]) -> "ExpertBank":
        """The bank of these experts (None: absent from the module), packed in routing order (`pack_experts`)."""
        packed = pack_experts(experts)
        return cls(**packed._asdict(), expert_slot=expert_slots(packed.spans))

    def adapting(self, index: int) -> bool:
        """Whether expert `index` adapts this module (its factors here or not)."""
        return bool(self.adapts[index]) if self.adapts is not None else self.spans[index] is not None

    def factors_of(self, index: int) -> LoraFactors | None:
        """Expert `index`'s factors here (views of this bank's rows), or None when they are not here."""
        span = self.spans[index]
        if span is None:
            return None
        start, end = span
        rows = {kind: None if terms is None else terms[index] for kind, terms in (("shift", self.shift), ("bias", self.bias))}
        return LoraFactors(self.A[start:end], self.BT[start:end].T, float(self.expert_scaling[index]), **rows)

    def _terms_appended(self, kind: str, factors: LoraFactors | None) -> torch.Tensor | None:
        terms, row = getattr(self, kind), None if factors is None else getattr(factors, kind)
        if terms is None and row is None:
            return None
        o = self.BT.shape[1]
        if terms is None:
            terms = torch.zeros(self.num_experts, o, dtype=self.dtype, device=self.device)
        row = torch.zeros(o, dtype=self.dtype, device=self.device) if row is None else row.to(self.device, self.dtype)
        return torch.cat([terms, row[None]])

    def appended(self, factors: LoraFactors | None) -> Packed:
        """The packed tensors with one more expert after the others (None: absent here), in this bank's dtype and
        device. The factors of an expert absent here are the same tensors, not copies."""
        index, rows = self.num_experts, self.A.shape[0]
        terms = {kind: self._terms_appended(kind, factors) for kind in ("shift", "bias")}
        if factors is None:
            return Packed(self.A, self.BT, self.rank_expert, self.rank_scaling, [*self.spans, None], **terms)
        new = lambda values, dtype=self.dtype: torch.full((factors.rank,), values, dtype=dtype, device=self.device)  # noqa: E731
        return Packed(
            torch.cat([self.A, factors.A.to(self.device, self.dtype)]),
            torch.cat([self.BT, factors.B.T.to(self.device, self.dtype)]),
            torch.cat([self.rank_expert, new(index, torch.long)]),
            torch.cat([self.rank_scaling, new(factors.scaling, self.rank_scaling.dtype)]),
            [*self.spans, (rows, rows + factors.rank)],
            **terms,
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
        others = [i for i in range(self.num_experts) if i != index]
        terms = {kind: None if getattr(self, kind) is None else getattr(self, kind)[others] for kind in ("shift", "bias")}
        return Packed(A, BT, rank_expert - (rank_expert > index).long(), rank_scaling, spans, **terms)

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
