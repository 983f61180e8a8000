"""The glue around the paged MLA decode (mla_decode.py) in three launches where there were eight per layer at
batch-1 decode: the RMSNorm of the kv latent, two rope launches, the q_nope x W_UK and o_latent x W_UV einsums (a bmm
each), two torch.cat and the index_copy into the paged cache (V2-Lite geometry, four layers, bf16 on an H100,
2026-11-23: 103 -> 83 kernels per decode step, 0.943 -> 0.744 ms per token with CUDA graphs).

- mla_store_kv  kv_a_proj_with_mqa's output [T, R + DR] -> the cache rows [rms_norm(latent) | rope(k_pe)]
- mla_q_prep    q [T, H, nope + DR] -> mla_decode's query [T, H, R + DR]: [q_nope @ W_UK | rope(q_pe)]
- mla_out       the attention-weighted latent [T, H, R] x W_UV -> o_proj's input [T, H * V]
- mla_prep      mla_store_kv and mla_q_prep in one launch (decode runs this)

Each computes in float32 and rounds once, the norm and rope as norm_rope's kernels round (bit for bit in the
interpreter; on a GPU ptxas may fuse the rotation's products into FMAs in another order, float32's last bit); the
float64 references below are the tests' oracles.
"""
from __future__ import annotations

import torch

from lowbit.kernels import cdiv, pdl, triton_available


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """float64 rotation of x [T, H, DR] by cos / sin [T, DR/2]."""
    x, c, s = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def mla_store_kv_ref(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """float64 reference: the cache rows [T, R + DR] mla_store_kv writes for kv_a [T, R + DR]."""
    R = norm_weight.shape[0]
    lat = kv_a[:, :R].double()  # [T, R]
    lat = lat / torch.sqrt(lat.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    return torch.cat([lat, _rope_ref(kv_a[:, None, R:], cos, sin, interleaved)[:, 0]], dim=-1)


def mla_q_prep_ref(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """float64 reference of mla_q_prep: [T, H, R + DR]."""
    nope = w_uk.shape[1]
    q_lat = torch.einsum("thd,hdr->thr", q[..., :nope].double(), w_uk.double())  # [T, H, R]
    return torch.cat([q_lat, _rope_ref(q[..., nope:], cos, sin, interleaved)], dim=-1)


def mla_out_ref(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """float64 reference of mla_out: [T, H * V]."""
    return torch.einsum("thr,hvr->thv", o_latent.double(), w_uv.double()).flatten(1)


if triton_available():
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter, prefetch

    from lowbit.kernels.split_kv import dot

    @triton.jit
    def _rotate(base, i, mask, c, s, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """The rope features at `base`, pairs i, rotated by c / s (float32): (x1 c - x2 s, x2 c + x1 s), x1/x2 the
        even/odd features (interleaved) or the two halves, as norm_rope._rope_kernel computes them."""
        if INTERLEAVED:
            x1 = tl.load(base + 2 * i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _store_kv_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, N, stride_kv, stride_c, eps,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         INTERLEAVED: tl.constexpr, PDL: tl.constexpr):
        enter(PDL)
        _store_kv_row(tl.program_id(0), kv_ptr, w_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, N, stride_kv, stride_c,
                      eps, HALF, BLOCK, BLOCK_HALF, INTERLEAVED)

    @triton.jit
    def _prep_kernel(kv_ptr, kw_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, N, stride_kv, stride_c, eps,
                     q_ptr, uk_ptr, out_ptr, T, stride_qt, stride_qh, stride_ot, stride_oh, H, R_BLOCKS,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                     NOPE: tl.constexpr, R: tl.constexpr, NOPE_P: tl.constexpr, BT: tl.constexpr,
                     BR: tl.constexpr, PDL: tl.constexpr):
        """mla_store_kv's and mla_q_prep's programs in one launch (they read different inputs and write different
        outputs): the first q-prep tiles, then one program a token for the cache."""
        pid = tl.program_id(0)
        n_q = tl.cdiv(T, BT) * H * R_BLOCKS
        if pid < n_q:  # W_UK's [NOPE, BR] tile asked of L2 while the kernel before finishes (a 128-byte line a row)
            k = tl.minimum(tl.arange(0, NOPE_P), NOPE - 1)
            prefetch(uk_ptr + ((pid // R_BLOCKS) % H) * NOPE * R + k * R + (pid % R_BLOCKS) * BR, PDL)
        enter(PDL)
        if pid < n_q:
            _q_prep_tile(pid // (H * R_BLOCKS), (pid // R_BLOCKS) % H, pid % R_BLOCKS, q_ptr, uk_ptr, cos_ptr,
                         sin_ptr, out_ptr, T, stride_qt, stride_qh, stride_ot, stride_oh, stride_c, NOPE, R, HALF,
                         NOPE_P, BLOCK_HALF, BT, BR, INTERLEAVED)
        else:
            _store_kv_row(pid - n_q, kv_ptr, kw_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, N, stride_kv, stride_c,
                          eps, HALF, BLOCK, BLOCK_HALF, INTERLEAVED)

    @triton.jit
    def _store_kv_row(t, kv_ptr, w_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, N, stride_kv, stride_c, eps,
                      HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      INTERLEAVED: tl.constexpr):
        """One token: its cache row [rms_norm(latent) * w | rope(k_pe)], N the latent's width; the norm as
        norm_rope._rms_norm_kernel rounds it (x / rms to the dtype, then times the weight)."""
        row = kv_ptr + t * stride_kv
        dst = cache_ptr + tl.load(slots_ptr + t).to(tl.int64) * (N + 2 * HALF)
        ty = cache_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(row + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (w * y).to(ty), mask=mask)
        i = tl.arange(0, BLOCK_HALF)
        i_mask = i < HALF
        c = tl.load(cos_ptr + t * stride_c + i, mask=i_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_c + i, mask=i_mask, other=0.0).to(tl.float32)
        o1, o2 = _rotate(row + N, i, i_mask, c, s, HALF, INTERLEAVED)
        tl.store(dst + N + i, o1.to(ty), mask=i_mask)
        tl.store(dst + N + HALF + i, o2.to(ty), mask=i_mask)

    @triton.jit
    def _q_prep_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_c, NOPE: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr, NOPE_P: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, INTERLEAVED: tl.constexpr,
                       PDL: tl.constexpr):
        enter(PDL)
        _q_prep_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
                     T, stride_qt, stride_qh, stride_ot, stride_oh, stride_c, NOPE, R, HALF, NOPE_P, BLOCK_HALF, BT, BR,
                     INTERLEAVED)

    @triton.jit
    def _q_prep_tile(tb, h, rb, q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, stride_qt, stride_qh, stride_ot,
                     stride_oh, stride_c, NOPE: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr,
                     NOPE_P: tl.constexpr, BLOCK_HALF: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr,
                     INTERLEAVED: tl.constexpr):
        """BT tokens of head h: columns [rb * BR, +BR) of q_nope @ W_UK[h]; the first column block also rotates
        their q_pe into columns R.. of the output."""
        t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
        t_mask = t < T
        k = tl.arange(0, NOPE_P)
        r = rb * BR + tl.arange(0, BR)
        q_base = q_ptr + t[:, None] * stride_qt + h * stride_qh
        a = tl.load(q_base + k[None, :], mask=t_mask[:, None] & (k[None, :] < NOPE), other=0.0)  # [BT, NOPE_P]
        w = tl.load(w_ptr + h * NOPE * R + k[:, None] * R + r[None, :], mask=(k[:, None] < NOPE) & (r[None, :] < R),
                    other=0.0)  # [NOPE_P, BR]
        ty = out_ptr.dtype.element_ty
        o_base = out_ptr + t[:, None] * stride_ot + h * stride_oh
        tl.store(o_base + r[None, :], dot(a, w).to(ty), mask=t_mask[:, None] & (r[None, :] < R))
        if rb == 0:
            i = tl.arange(0, BLOCK_HALF)[None, :]
            m = t_mask[:, None] & (i < HALF)
            c = tl.load(cos_ptr + t[:, None] * stride_c + i, mask=m, other=0.0).to(tl.float32)  # [BT, BLOCK_HALF]
            s = tl.load(sin_ptr + t[:, None] * stride_c + i, mask=m, other=0.0).to(tl.float32)
            o1, o2 = _rotate(q_base + NOPE, i, m, c, s, HALF, INTERLEAVED)
            tl.store(o_base + R + i, o1.to(ty), mask=m)
            tl.store(o_base + R + HALF + i, o2.to(ty), mask=m)

    @triton.jit
    def _out_kernel(o_ptr, w_ptr, out_ptr, T, stride_ot, stride_oh, stride_out, R: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, LINES: tl.constexpr, STEP: tl.constexpr,
                    PDL: tl.constexpr):
        """BT tokens of head h: columns h * V + [vb * BV, +BV) of the output, o_latent[:, h] @ W_UV[h]^T. The
        program's W_UV rows (LINES lines of STEP elements each) are asked of L2 while the kernel before finishes."""
        tb = tl.program_id(0)
        h = tl.program_id(1)
        vb = tl.program_id(2)
        v = vb * BV + tl.arange(0, BV)
        v_mask = v < V
        prefetch(w_ptr + (h * V + tl.where(v_mask, v, 0))[:, None] * R
                 + tl.minimum(tl.arange(0, LINES) * STEP, R - 1)[None, :], PDL)
        enter(PDL)
        t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
        t_mask = t < T
        k = tl.arange(0, BK)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for k0 in range(0, R, BK):
            kk = k0 + k
            a = tl.load(o_ptr + t[:, None] * stride_ot + h * stride_oh + kk[None, :],
                        mask=t_mask[:, None] & (kk[None, :] < R), other=0.0)  # [BT, BK]
            w = tl.load(w_ptr + (h * V + v[:, None]) * R + kk[None, :], mask=v_mask[:, None] & (kk[None, :] < R),
                        other=0.0)  # [BV, BK]
            acc += dot(a, tl.trans(w))
        tl.store(out_ptr + t[:, None] * stride_out + h * V + v[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & v_mask[None, :])


def _tile(n: int, most: int) -> int:
    """A power-of-two tile over n columns: at least 16 (tl.dot's least), at most `most`."""
    return min(most, max(16, triton.next_power_of_2(n)))


def _store_kv_shape(kv_a, norm_weight, cos, sin, cache, slots) -> tuple[int, int, int]:
    """mla_store_kv's arguments checked -> (tokens, latent rank, rope pairs)."""
    T, D = kv_a.shape
    R = norm_weight.shape[0]
    half = (D - R) // 2
    assert kv_a.stride(1) == 1 and kv_a.dtype == cache.dtype and cache.is_contiguous() and cache.shape[-1] == D, \
        f"kv_a {tuple(kv_a.shape)} {kv_a.dtype} vs cache {tuple(cache.shape)} {cache.dtype}"
    assert D - R == 2 * half and cos.shape == (T, half) and cos.stride() == sin.stride() and cos.stride(1) == 1 \
        and slots.shape == (T,), f"kv_a {tuple(kv_a.shape)}, rank {R}, cos {tuple(cos.shape)}"
    return T, R, half


def _q_prep_shape(q, w_uk, cos, sin) -> tuple[int, int, int, int, int]:
    """mla_q_prep's arguments checked -> (tokens, heads, nope features, latent rank, rope pairs)."""
    T, H, D = q.shape
    _, nope, R = w_uk.shape
    half = (D - nope) // 2
    assert w_uk.shape[0] == H and w_uk.is_contiguous() and w_uk.dtype == q.dtype and q.stride(2) == 1, \
        f"q {tuple(q.shape)} {q.dtype} vs w_uk {tuple(w_uk.shape)} {w_uk.dtype}"
    assert D - nope == 2 * half and cos.shape == (T, half) and cos.stride() == sin.stride() and cos.stride(1) == 1, \
        f"q {tuple(q.shape)}, cos {tuple(cos.shape)}"
    return T, H, nope, R, half


def mla_store_kv(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_a [T, R + DR] (kv_a_proj_with_mqa's output, unit stride in the last dim), norm_weight [R], cos / sin
    [T, DR/2], cache [N, page, 1, R + DR], slots [T] flat cache slots: cache row slots[t] <-
    [rms_norm(kv_a[t, :R]) * norm_weight | rope(kv_a[t, R:])], in one launch."""
    T, R, half = _store_kv_shape(kv_a, norm_weight, cos, sin, cache, slots)
    if T:
        block = triton.next_power_of_2(R)
        # the warps of rms_norm's launch: the same reduction tree, so the same sum on a GPU too
        _store_kv_kernel[(T,)](kv_a, norm_weight, cos, sin, slots, cache, R, kv_a.stride(0), cos.stride(0), eps,
                               HALF=half, BLOCK=block, BLOCK_HALF=triton.next_power_of_2(half),
                               INTERLEAVED=interleaved, num_warps=min(16, max(1, block // 512)),
                               **pdl.launch(kv_a.device))


def mla_q_prep(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """q [T, H, nope + DR] (unit stride in the last dim; a view is fine), w_uk [H, nope, R], cos / sin [T, DR/2]
    -> mla_decode's query [T, H, R + DR] in q's dtype: [q_nope @ w_uk per head | rope(q_pe)], one launch."""
    T, H, nope, R, half = _q_prep_shape(q, w_uk, cos, sin)
    out = torch.empty(T, H, R + 2 * half, dtype=q.dtype, device=q.device)
    if T and H:
        br = _tile(R, 64)
        _q_prep_kernel[(cdiv(T, 16), H, cdiv(R, br))](
            q, w_uk, cos, sin, out, T, q.stride(0), q.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            NOPE=nope, R=R, HALF=half, NOPE_P=max(16, triton.next_power_of_2(nope)),
            BLOCK_HALF=triton.next_power_of_2(half), BT=16, BR=br, INTERLEAVED=interleaved, num_warps=4,
            **pdl.launch(q.device))
    return out


def mla_prep(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
             interleaved: bool, cache: torch.Tensor, slots: torch.Tensor, q: torch.Tensor,
             w_uk: torch.Tensor) -> torch.Tensor:
    """mla_store_kv(kv_a, ...) and mla_q_prep(q, w_uk, ...) in one launch, the same results (their launches each cost
    about 2-4 us at batch-1 decode, more than their work): returns mla_q_prep's query. The launch takes
    mla_store_kv's warps (the norm's reduction tree of rms_norm's launch)."""
    T, R, half = _store_kv_shape(kv_a, norm_weight, cos, sin, cache, slots)
    _, H, nope, r_q, half_q = _q_prep_shape(q, w_uk, cos, sin)
    assert (r_q, half_q) == (R, half), f"q {tuple(q.shape)} / w_uk {tuple(w_uk.shape)} vs kv_a {tuple(kv_a.shape)}"
    out = torch.empty(T, H, R + 2 * half, dtype=q.dtype, device=q.device)
    if T and H:
        block = triton.next_power_of_2(R)
        br = _tile(R, 64)
        r_blocks = cdiv(R, br)
        _prep_kernel[(cdiv(T, 16) * H * r_blocks + T,)](
            kv_a, norm_weight, cos, sin, slots, cache, R, kv_a.stride(0), cos.stride(0), eps,
            q, w_uk, out, T, q.stride(0), q.stride(1), out.stride(0), out.stride(1), H, r_blocks,
            HALF=half, BLOCK=block, BLOCK_HALF=triton.next_power_of_2(half), INTERLEAVED=interleaved,
            NOPE=nope, R=R, NOPE_P=max(16, triton.next_power_of_2(nope)), BT=16, BR=br,
            num_warps=min(16, max(1, block // 512)), **pdl.launch(kv_a.device))
    return out


def mla_out(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_latent [T, H, R] (unit stride in the last dim), w_uv [H, V, R] -> [T, H * V] in o_latent's dtype:
    out[t, h * V + v] = sum_r o_latent[t, h, r] w_uv[h, v, r], o_proj's input in one launch."""
    T, H, R = o_latent.shape
    V = w_uv.shape[1]
    assert w_uv.shape == (H, V, R) and w_uv.is_contiguous() and w_uv.dtype == o_latent.dtype \
        and o_latent.stride(2) == 1, f"o_latent {tuple(o_latent.shape)} vs w_uv {tuple(w_uv.shape)}"
    out = torch.empty(T, H * V, dtype=o_latent.dtype, device=o_latent.device)
    if T and H:
        bv = _tile(V, 64)
        _out_kernel[(cdiv(T, 16), H, cdiv(V, bv))](o_latent, w_uv, out, T, o_latent.stride(0), o_latent.stride(1),
                                                    out.stride(0), R=R, V=V, BT=16, BV=bv, BK=_tile(R, 64),
                                                    LINES=triton.next_power_of_2(cdiv(R * w_uv.element_size(), 128)),
                                                    STEP=128 // w_uv.element_size(), num_warps=4,
                                                    **pdl.launch(o_latent.device))
    return out
