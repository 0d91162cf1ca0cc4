"""The selected experts' products on GPU, grouped by expert (Triton), for prefill and decode.

The idea of segmented LoRA kernels (Punica's SGMV): sort the (token, choice) pairs by expert, so every tile of
pairs shares one expert; a program loads its expert's factors once for the whole tile and computes, for its pairs
p = (token n, choice j) of expert e,

    pair_out[p] = w[n, j] * s_e * B_e (A_e x[n])          # (BLOCK_M, r) then (BLOCK_M, o), fp32 accumulation

without ever forming (tokens, E, o). The k pair outputs of a token are then summed in a fixed order (no atomics:
results do not depend on scheduling). Experts may have different ranks: each tile masks its expert's rank inside
`RANK_BLOCK`, the largest rank rounded up to a power of two (at least 16, the smallest `tl.dot`).

This module imports `triton`; `routing` imports it only when a CUDA tensor (or a test) needs it. Under Triton's
interpreter (`TRITON_INTERPRET=1`, CPU tensors) tiles are cast to float32 before `tl.dot`, which the interpreter
gets wrong for bfloat16 (see docs/routing.md); on a GPU, half-precision tiles go to `tl.dot` as they are.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 32  # pairs per tile
BLOCK_K = 64  # input features per step of the A product
BLOCK_N = 64  # output features per step of the B product


@triton.jit
def _grouped_lora_kernel(
    x_ptr, stride_x,  # (N, d) tokens
    a_ptr, stride_a,  # (R, d) all experts' A rows
    bt_ptr, stride_bt,  # (R, o) all experts' B rows (B transposed)
    row_start_ptr, rank_ptr,  # (E,) each expert's first row and rank
    tile_expert_ptr, tile_begin_ptr, tile_end_ptr,  # per tile: its expert, its pairs [begin, end) in sorted order
    pair_token_ptr, pair_weight_ptr, pair_slot_ptr,  # per sorted pair: token, w * s_e, position in pair_out
    out_ptr, stride_out,  # (N * k, o) float32 pair outputs
    num_experts, d, o,
    RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < num_experts:  # tiles past the schedule's end do nothing
        begin = tl.load(tile_begin_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        pairs = begin + tl.arange(0, BLOCK_M)
        pair_mask = pairs < end
        tokens = tl.load(pair_token_ptr + pairs, mask=pair_mask, other=0)
        weights = tl.load(pair_weight_ptr + pairs, mask=pair_mask, other=0.0)
        slots = tl.load(pair_slot_ptr + pairs, mask=pair_mask, other=0)
        first_row = tl.load(row_start_ptr + expert)
        rank = tl.load(rank_ptr + expert)
        ranks = tl.arange(0, RANK_BLOCK)
        rank_mask = ranks < rank

        hidden = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)  # A_e x for the tile's tokens
        for k0 in range(0, d, BLOCK_K):
            features = k0 + tl.arange(0, BLOCK_K)
            feature_mask = features < d
            x_tile = tl.load(
                x_ptr + tokens[:, None] * stride_x + features[None, :],
                mask=pair_mask[:, None] & feature_mask[None, :], other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            a_tile = tl.load(
                a_ptr + (first_row + ranks)[None, :] * stride_a + features[:, None],
                mask=rank_mask[None, :] & feature_mask[:, None], other=0.0,
            )  # (BLOCK_K, RANK_BLOCK)
            if DOT_FP32:
                x_tile, a_tile = x_tile.to(tl.float32), a_tile.to(tl.float32)
            hidden += tl.dot(x_tile, a_tile, input_precision=PRECISION)
        hidden = hidden * weights[:, None]
        if not DOT_FP32:
            hidden = hidden.to(bt_ptr.dtype.element_ty)

        for n0 in range(0, o, BLOCK_N):
            outputs = n0 + tl.arange(0, BLOCK_N)
            output_mask = outputs < o
            bt_tile = tl.load(
                bt_ptr + (first_row + ranks)[:, None] * stride_bt + outputs[None, :],
                mask=rank_mask[:, None] & output_mask[None, :], other=0.0,
            )  # (RANK_BLOCK, BLOCK_N)
            if DOT_FP32:
                bt_tile = bt_tile.to(tl.float32)
            result = tl.dot(hidden, bt_tile, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
            tl.store(
                out_ptr + slots[:, None] * stride_out + outputs[None, :], result,
                mask=pair_mask[:, None] & output_mask[None, :],
            )


def _schedule(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Pairs sorted by expert and the tiles over them, computed on the device without a host sync: the grid is
    sized by the most tiles there can be (`P / BLOCK_M + E`); the schedule marks the unused ones with expert E.

    Returns (order of the flat pairs, tile expert, tile begin, tile end), tiles as (T,) int32.
    """
    flat = indices.reshape(-1)  # (P,) expert of each pair, pair p = token * k + choice
    order = torch.argsort(flat, stable=True)  # (P,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    segment_end = torch.cumsum(counts, 0)  # (E,)
    segment_begin = segment_end - counts
    tiles_per_expert = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = torch.cumsum(tiles_per_expert, 0)  # (E,)
    max_tiles = flat.numel() // BLOCK_M + num_experts
    tile = torch.arange(max_tiles, device=flat.device)
    tile_expert = torch.searchsorted(tiles_end, tile, right=True)  # E for tiles past the schedule
    expert = tile_expert.clamp_max(num_experts - 1)
    local = tile - (tiles_end[expert] - tiles_per_expert[expert])
    tile_begin = segment_begin[expert] + local * BLOCK_M
    tile_end = segment_end[expert]
    return order, tile_expert.to(torch.int32), tile_begin.to(torch.int32), tile_end.to(torch.int32)


def add_selected_experts(
    x: torch.Tensor,
    A: torch.Tensor,
    BT: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # (row_start, rank, scaling), see ExpertBank.device_layout
    indices: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """`out[n] += sum_j weights[n, j] * scaling[e] * BT_e.T @ (A_e @ x[n])` with `e = indices[n, j]`, in place.

    The operands of the compiled CPU kernel (`native.add_selected_experts`), on the device of `x`: x (N, d) and
    out (N, o) with contiguous rows; A (R, d) and BT (R, o) in one dtype (float32, float16 or bfloat16); the layout:
    each expert's first row and rank (E,) int32 and its scaling (E,) on that device; indices (N, k) int64; weights
    (N, k); `max_rank` the largest rank. Accumulates in float32; float32 operands are multiplied in full precision (no TF32), like torch's default.
    """
    row_start, rank, scaling = layout
    n, k = indices.shape
    num_experts = row_start.shape[0]
    if n == 0:
        return out
    order, tile_expert, tile_begin, tile_end = _schedule(indices, num_experts)
    pair_token = (order // k).to(torch.int32)
    pair_weight = (weights.reshape(-1).float() * scaling.float()[indices.reshape(-1)])[order]
    pair_out = torch.empty(n * k, BT.shape[1], dtype=torch.float32, device=x.device)
    rank_block = max(16, triton.next_power_of_2(max_rank))
    _grouped_lora_kernel[(tile_expert.shape[0],)](
        x, x.stride(0), A, A.stride(0), BT, BT.stride(0),
        row_start, rank,
        tile_expert, tile_begin, tile_end,
        pair_token, pair_weight, order.to(torch.int32),
        pair_out, pair_out.stride(0),
        num_experts, x.shape[1], BT.shape[1],
        RANK_BLOCK=rank_block, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
        DOT_FP32=INTERPRETED or x.dtype == torch.float32, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out.add_(pair_out.view(n, k, -1).sum(dim=1).to(out.dtype))
