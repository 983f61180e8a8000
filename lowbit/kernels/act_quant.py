"""Activation quantization: int8 per token (or per token and group of features), FP8 e4m3 per token and group of
features, FP8 static per tensor.

Each returns (values, scales) with values * scales == x up to rounding; the GEMMs take both. One program per row (per
token) or per group: read once for its absmax and quantized from registers (ONE_PASS_MAX).
"""
from __future__ import annotations

import torch

from lowbit.kernels import cdiv, pdl

FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn
# A group (a whole row, per token) of up to this many features is read once and quantized from registers (R1's
# widest input, 18432, takes 32768 lanes: 64 values a thread in 16 warps); a longer one is read twice in 1024 steps.
# Decode quantizes one row at a time: a loop of dependent loads in one program cost about a microsecond a step.
ONE_PASS_MAX = 32768
GRID_BLOCK = 1024  # features per program of fp8_grid_rows
GROUPS_BLOCK = 1024  # features per program of int8_per_token_group


# ---------------------------------------------------------------------------------------------- references
def int8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 [M, K], float32 scales [M] (absmax / 127, round half to even): one group a row."""
    q, s = int8_per_token_group_ref(x, x.shape[1])
    return q, s[:, 0]


def int8_per_token_group_ref(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 [M, K], float32 scales [M, ceil(K / group_size)] (absmax / 127 per group, half to even)."""
    M, K = x.shape
    xf = torch.nn.functional.pad(x.float(), (0, -K % group_size)).view(M, -1, group_size)
    s = xf.abs().amax(dim=-1).clamp(min=1e-10) / 127.0
    q = torch.round(xf / s[..., None]).clamp(-128, 127).to(torch.int8)
    return q.view(M, -1)[:, :K].contiguous(), s


def fp8_per_token_group_ref(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> FP8 [M, K], float32 scales [M, ceil(K / group_size)] (absmax / 448 per group)."""
    M, K = x.shape
    xf = torch.nn.functional.pad(x.float(), (0, -K % group_size)).view(M, -1, group_size)
    s = xf.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, -1)[:, :K].contiguous(), s


def fp8_static_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> FP8 [M, K] through one calibrated per-tensor scale."""
    return (x.float() / scale.float().reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_grid_rows_ref(x: torch.Tensor, scales: torch.Tensor, row_experts: torch.Tensor | None = None,
                      row_div: int = 1) -> torch.Tensor:
    """Static FP8 quantization kept in x's dtype (e4m3 values are exact there): row i of the output is row
    i // row_div of x through the scale of expert row_experts[i] (all rows: scales[0] where row_experts is None;
    a negative expert, a slot no expert of this rank takes, through scales[0] too)."""
    n = x.shape[0] * row_div if row_experts is None else row_experts.numel()
    src = x[torch.arange(n, device=x.device) // row_div].float()
    e = torch.zeros(n, dtype=torch.long, device=x.device) if row_experts is None else row_experts.long().clamp(min=0)
    s = scales.float().reshape(-1)[e]
    return (src / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype)


# ---------------------------------------------------------------------------------------------- kernels
try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:  # the references above still serve the CPU
    triton = None

if triton is not None:
    @triton.jit
    def int8_codes(v, scale):
        """float32 v / scale -> int8, rounded half to even, as torch.round and vLLM's int8 kernels: a scale that is a
        power of two puts many 16-bit inputs exactly on a half (H100, 2026-11-23: 47 of 640 codes differed rounding
        up). What every int8 per-token quantization here computes (the GEMM quantizing its own row too)."""
        v = tl.div_rn(v, scale)
        r = tl.floor(v + 0.5)
        r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
        return tl.clamp(r, -128.0, 127.0).to(tl.int8)

    @triton.jit
    def absmax_scale(v, QMAX: tl.constexpr):
        """A group's scale from its float32 values (0 where masked off): absmax / QMAX (127 int8, 448 e4m3), at least
        1e-10 / QMAX. The one formula of every kernel that quantizes activations here or in the GEMMs."""
        return tl.maximum(tl.max(tl.abs(v), axis=0), 1e-10) / QMAX

    @triton.jit
    def quant_group_once(v, mask, q_ptr, s_ptr, TO_FP8: tl.constexpr):
        """A group held in registers (float32 v, 0 where masked off) -> its scale at s_ptr, its codes at q_ptr."""
        scale = absmax_scale(v, 448.0 if TO_FP8 else 127.0)
        tl.store(s_ptr, scale)
        _quant_group(v, mask, q_ptr, TO_FP8, scale)

    @triton.jit
    def _quant_group(v, mask, q_ptr, TO_FP8: tl.constexpr, scale):
        """v / scale -> int8 (round half to even) or e4m3, stored where mask."""
        if TO_FP8:
            q = tl.clamp(tl.div_rn(v, scale), -448.0, 448.0).to(tl.float8e4nv)
        else:
            q = int8_codes(v, scale)
        tl.store(q_ptr, q, mask=mask)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, num_groups,
                           GROUP: tl.constexpr, BLOCK: tl.constexpr, TO_FP8: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, group): GROUP features (a whole row for per-token) -> values and one scale. A group
        that fits one BLOCK is read once and quantized from registers; a longer one in BLOCK steps, read twice."""
        enter(PDL)
        row = tl.program_id(0)
        g = tl.program_id(1)
        start = g * GROUP
        if BLOCK >= GROUP:
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < K) & (cols < start + GROUP)
            v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            quant_group_once(v, mask, q_ptr + row * stride_q + cols, s_ptr + row * num_groups + g, TO_FP8)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, GROUP, BLOCK):
                cols = start + off + tl.arange(0, BLOCK)
                mask = (cols < K) & (cols < start + GROUP)
                v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = absmax_scale(amax, 448.0 if TO_FP8 else 127.0)
            tl.store(s_ptr + row * num_groups + g, scale)
            for off in range(0, GROUP, BLOCK):
                cols = start + off + tl.arange(0, BLOCK)
                mask = (cols < K) & (cols < start + GROUP)
                v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                _quant_group(v, mask, q_ptr + row * stride_q + cols, TO_FP8, scale)

    @triton.jit
    def _int8_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, num_groups, GROUP: tl.constexpr,
                            BLOCK: tl.constexpr, PDL: tl.constexpr, DEQUANT: tl.constexpr = False):
        """BLOCK features of one row, BLOCK // GROUP groups of them: each group's scale and codes as
        quant_group_once computes them (a program per group was one program per 32 features: 917K programs for
        4096 rows of 7168). DEQUANT: codes times their scale, rounded once to q's dtype, and no scales stored."""
        enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        v = tl.reshape(v, [BLOCK // GROUP, GROUP])
        scale = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-10) / 127.0  # (absmax_scale, per group)
        q = int8_codes(v, scale[:, None])
        if DEQUANT:
            out = tl.reshape(q.to(tl.float32) * scale[:, None], [BLOCK]).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + row * stride_q + cols, out, mask=cols < K)
        else:
            tl.store(q_ptr + row * stride_q + cols, tl.reshape(q, [BLOCK]), mask=cols < K)
            g = tl.program_id(1) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
            tl.store(s_ptr + row * num_groups + g, scale, mask=g < num_groups)

    @triton.jit
    def _fp8_grid_kernel(x_ptr, out_ptr, s_ptr, e_ptr, K, stride_x, stride_o, row_div,
                         HAS_E: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """BLOCK features of one output row: x's row (row // row_div) divided by its expert's scale, rounded to e4m3
        and stored in the output's 16-bit dtype (the w4a8 GEMM at small M then runs the 16-bit path: the same exact
        products). One load per program: a decode-sized input is a few rows, and a loop over a row's blocks in one
        program waited for each block's load in turn (H100, 2026-11-24: about 8 us for one 16384-wide row)."""
        enter(PDL)
        row = tl.program_id(0)
        e = 0
        if HAS_E:
            e = tl.maximum(tl.load(e_ptr + row), 0)
        s = tl.load(s_ptr + e)
        src = (row // row_div).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + src * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.clamp(tl.div_rn(v, s), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=cols < K)


def fp8_grid_rows(x: torch.Tensor, scales: torch.Tensor, row_experts: torch.Tensor | None = None,
                  row_div: int = 1) -> torch.Tensor:
    """The kernel of fp8_grid_rows_ref, one launch: x [M, K] -> [M * row_div or len(row_experts), K]."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    n = x.shape[0] * row_div if row_experts is None else row_experts.numel()
    out = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device)
    scales = scales.float().reshape(-1).contiguous()
    if n:
        block = min(triton.next_power_of_2(x.shape[1]), GRID_BLOCK)
        _fp8_grid_kernel[(n, cdiv(x.shape[1], block))](
            x, out, scales, row_experts if row_experts is not None else scales, x.shape[1], x.stride(0),
            out.stride(0), row_div, HAS_E=row_experts is not None, BLOCK=block, num_warps=4, **pdl.launch(x.device))
    return out


def _quant_rows(x: torch.Tensor, group: int, to_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    M, K = x.shape
    groups = cdiv(K, group)
    q = torch.empty(M, K, dtype=FP8 if to_fp8 else torch.int8, device=x.device)
    s = torch.empty(M, groups, dtype=torch.float32, device=x.device)
    if M:
        block = triton.next_power_of_2(group)
        if block > ONE_PASS_MAX:
            block = 1024
        _quant_rows_kernel[(M, groups)](x, q, s, K, x.stride(0), q.stride(0), groups, GROUP=group, BLOCK=block,
                                        TO_FP8=to_fp8, num_warps=max(4, min(16, block // 1024)), **pdl.launch(x.device))
    return q, s


def attach_int8_rows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """Give x [M, K] its int8 per-token quantization (q [M, K], s [M]), computed by the kernel that wrote x (an
    RMSNorm's): int8_per_token(x) returns it instead of a launch of its own. It stays with this tensor object only
    (a view, a copy or a new tensor is quantized anew), so it cannot go stale: layers do not write their inputs."""
    assert q.shape == x.shape and s.shape == (x.shape[0],)
    x._int8_rows = (q, s)


def attached_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What attach_int8_rows gave x, or None."""
    return getattr(x, "_int8_rows", None)


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of int8_per_token_ref: int8 [M, K], float32 scales [M]."""
    done = attached_int8_rows(x)
    if done is not None:
        return done
    q, s = _quant_rows(x, x.shape[1], to_fp8=False)
    return q, s.view(-1)


def int8_per_token_group(x: torch.Tensor, group_size: int, dequant: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel of int8_per_token_group_ref: int8 [M, K], float32 scales [M, ceil(K / group_size)], a program per
    row and GROUPS_BLOCK features (group_size a power of two up to it). dequant: ([M, K] in x's dtype, the codes
    times their scale rounded once, None): the activations as a 16-bit matrix product on dequantized weights takes
    them (prefill)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    assert group_size & (group_size - 1) == 0 and group_size <= GROUPS_BLOCK, group_size
    M, K = x.shape
    groups = cdiv(K, group_size)
    q = torch.empty(M, K, dtype=x.dtype if dequant else torch.int8, device=x.device)
    s = None if dequant else torch.empty(M, groups, dtype=torch.float32, device=x.device)
    if M:
        block = max(group_size, min(GROUPS_BLOCK, triton.next_power_of_2(K)))
        _int8_groups_kernel[(M, cdiv(K, block))](x, q, q if dequant else s, K, x.stride(0), q.stride(0), groups,
                                                 GROUP=group_size, BLOCK=block, DEQUANT=dequant, num_warps=4,
                                                 **pdl.launch(x.device))
    return q, s


def fp8_per_token_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of fp8_per_token_group_ref: FP8 [M, K], float32 scales [M, ceil(K / group_size)]."""
    return _quant_rows(x, group_size, to_fp8=True)
