"""What the GEMM kernels share around their K loop: which rows a program owns (dense: a block of M; grouped by
expert: a block of sorted token-slot ids, see moe.py) and how it writes them back (routing weight, split-K)."""
from __future__ import annotations

import torch

from lowbit.kernels import cdiv

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def program_rows(sorted_ptr, expert_ptr, pid_m, M, x_row_div, BM: tl.constexpr, MOE: tl.constexpr):
        """-> (ids: the output rows, their mask, the rows of x they read, the expert). The caller has returned
        already where pid_m is past the padded total of a grouped launch."""
        offs_m = pid_m * BM + tl.arange(0, BM)
        if MOE == 2:  # one token: program row pid_m is slot pid_m, its expert read from the router's ids
            e = tl.load(expert_ptr + pid_m).to(tl.int64)
            ids = pid_m + 0 * offs_m
            return ids, offs_m == pid_m * BM, ids // x_row_div, e
        elif MOE:
            ids = tl.load(sorted_ptr + offs_m)
            e = tl.load(expert_ptr + pid_m).to(tl.int64)
            return ids, ids < M, ids // x_row_div, e
        else:
            return offs_m, offs_m < M, offs_m, 0

    @triton.jit
    def one_token_expert(e, offs_n, n_mask, SUM_SLOTS: tl.constexpr):
        """A one-token (MOE == 2) program's expert as the router gave it -> (the expert, its columns' mask). Another
        rank's expert (-1) stays -1, for the program to skip (the caller zeroed its output row); with SUM_SLOTS it
        becomes expert 0 with every column masked off: no weights read, zeros added, the program still counted for
        the slots' sum (store_slot_sum)."""
        if SUM_SLOTS:
            n_mask = n_mask & ((tl.zeros_like(offs_n) + e) >= 0)
            e = tl.maximum(e, 0)
        return e, n_mask

    @triton.jit
    def gate_up_rows(pid_n, N, BN: tl.constexpr):
        """The 2 * BN weight rows of a fused gate/up program, interleaved: gate row j at 2j, up row N + j at 2j + 1
        (the output columns pid_n * BN + j); and their mask."""
        pair = tl.arange(0, 2 * BN)
        cols = pid_n * BN + pair // 2
        return cols + (pair % 2) * N, cols < N

    @triton.jit
    def silu_mul_pairs(acc, BM: tl.constexpr, BN: tl.constexpr):
        """[BM, 2 * BN] of interleaved (gate, up) columns -> silu(gate) * up [BM, BN]."""
        gate, up = tl.split(tl.reshape(acc, (BM, BN, 2)))
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def store_rows(out_ptr, acc, ids, row_mask, offs_n, n_mask, stride_om, rw_ptr,
                   ROUTED_WEIGHT: tl.constexpr, SPLIT_K: tl.constexpr):
        if ROUTED_WEIGHT:
            rw = tl.load(rw_ptr + ids, mask=row_mask, other=0.0)
            acc = acc * rw[:, None]
        out = out_ptr + ids[:, None] * stride_om + offs_n[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def add_parts(part_ptr, vals, mask, part, n_parts, part_stride, cnt_ptr, tile):
        """One of a tile's n_parts programs: stores its partial vals at part_ptr + part * part_stride; the last of
        them to finish (a counter per tile) adds all parts in part order (the same sum whichever finishes last) and
        sets the counter back to zero for the next launch (a CUDA graph replays the same counters). Returns (the sum,
        zero in the other programs; whether this program is the last, a tensor like mask)."""
        tl.store(part_ptr + part * part_stride, vals, mask=mask)
        tl.debug_barrier()  # every thread's partials are written before the counter releases them
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = (tl.zeros_like(mask.to(tl.int32)) + done) == n_parts - 1  # (a tensor: the interpreter wants one)
        total = tl.zeros_like(vals)
        for p in range(n_parts):
            total += tl.load(part_ptr + p * part_stride, mask=mask & last, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0, mask=done == n_parts - 1)
        return total, last

    @triton.jit
    def store_slot_sum(out_ptr, acc, ids, row_mask, offs_n, n_mask, rw_ptr, ws_ptr, cnt_ptr, N, pid_m, pid_n,
                       pid_k, SPLIT_K: tl.constexpr):
        """One token's down projection (MOE == 2: program row pid_m is slot pid_m) with its slots summed here rather
        than by moe_sum's launch: each slot's routed-weighted row (of K split pid_k: SPLIT_K partial sums a slot)
        goes to the workspace ws [slots * SPLIT_K, N] in float32, and the last program of a column block adds them
        in slot and split order and writes the token's row out [1, N]. Columns outside n_mask (another rank's
        expert) add zeros, whatever the product made of them."""
        rw = tl.load(rw_ptr + ids, mask=row_mask, other=0.0)
        vals = tl.sum(tl.where(row_mask[:, None] & n_mask[None, :], acc * rw[:, None], 0.0), axis=0)  # [BN]
        cols_ok = offs_n < N
        total, last = add_parts(ws_ptr + offs_n, vals, cols_ok, pid_m * SPLIT_K + pid_k,
                                tl.num_programs(0) * SPLIT_K, N, cnt_ptr, pid_n)
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=cols_ok & last)

    @triton.jit
    def store_split(out_ptr, acc, rows, row_mask, offs_n, n_mask, stride_om, ws_ptr, cnt_ptr, M, N,
                    pid_m, pid_n, pid_k, SPLIT_K: tl.constexpr):
        """A dense product's K split without a zeroed float32 output and a conversion after it (two launches each
        a few microseconds, as long as a small decode GEMM): each split's partial sums go to the workspace
        ws [SPLIT_K, M, N], and the last of a tile's splits adds them (add_parts) and writes the output in its
        dtype."""
        mask = row_mask[:, None] & n_mask[None, :]
        idx = rows[:, None] * N + offs_n[None, :]
        total, last = add_parts(ws_ptr + idx, acc, mask, pid_k, SPLIT_K, M * N, cnt_ptr,
                                pid_m * tl.num_programs(1) + pid_n)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=mask & last)


_COUNTERS: dict = {}
MAX_SPLIT_TILES = 1 << 20


def split_buffers(m: int, n: int, split_k: int, tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace [split_k, m, n] float32, the device's tile counters) for store_split. The counters are zeroed
    once per device and left at zero by every launch."""
    assert tiles <= MAX_SPLIT_TILES, f"{tiles} output tiles: more than the {MAX_SPLIT_TILES} split-K counters"
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return torch.empty(split_k, m, n, dtype=torch.float32, device=device), _COUNTERS[key]


def slot_sum_buffers(moe: tuple | None, out: torch.Tensor, routed_weights: torch.Tensor | None, n: int, grid: tuple,
                     fuse_silu: bool, split_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace [slots * split_k, n] float32, counters) for store_slot_sum: a one-token grouped launch (moe_mode
    2) of a projection without SiLU, its slots (and their K splits) routed-weighted into the token's one output
    row."""
    assert moe_mode(moe) == 2 and not fuse_silu, "slots are summed at one token, in the down projection"
    assert routed_weights is not None and out.shape[0] == 1, "the slots' sum: routing weights, one output row"
    return split_buffers(grid[0] * split_k, n, 1, grid[1], out.device)


def grid_and_rows(moe: tuple | None, m: int, n: int, bm: int, bn: int, split_k: int, dummy: torch.Tensor):
    """-> (grid, sorted_ids, block_expert, num_padded, rows): a grouped launch (moe = (sorted_ids, block_expert,
    num_padded, num_ids)) sizes its grid by the padded upper bound; one token's (moe = (None, slot_experts)) by its
    slots; a dense one by m rows and its K splits."""
    if moe is not None and moe[0] is None:  # one token (moe_mode 2): a program row per slot, (None, slot experts)
        slot_experts = moe[1]
        return (slot_experts.numel(), cdiv(n, bn), split_k), dummy, slot_experts, dummy, slot_experts.numel()
    if moe is not None:
        sorted_ids, block_expert, num_padded, num_ids = moe
        return (sorted_ids.numel() // bm, cdiv(n, bn), split_k), sorted_ids, block_expert, num_padded, num_ids
    return (cdiv(m, bm), cdiv(n, bn), split_k), dummy, dummy, dummy, m


def moe_mode(moe: tuple | None) -> int:
    """The kernels' MOE constant: 0 dense, 1 grouped by expert (sorted ids), 2 one token (a program row per slot)."""
    return 0 if moe is None else 2 if moe[0] is None else 1
