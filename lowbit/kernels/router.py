"""The MoE router in two launches. `router_logits`: the logits x @ gate.T in float32, one launch where torch takes a
dtype copy of x (and of the weight, loaded in the model dtype) and a two-kernel fp32 GEMV. `route`: after the
logits, scores (softmax or sigmoid), the correction bias (noaux_tc), group-limited selection, top-k, the weights
normalized and scaled; the torch form (`route_ref`, the CPU path) takes about 18 launches per MoE layer for
DeepSeek-V3/R1's grouped sigmoid routing, at batch-1 decode each costing more than its work.
"""
from __future__ import annotations

import torch

from lowbit.kernels import pdl, triton_available


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64 reference of router_logits: x [T, D] @ weight [E, D].T -> [T, E]."""
    return x.double() @ weight.double().T


def route_ref(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, sigmoid: bool,
              bias: torch.Tensor | None, normalize: bool, scaling: float,
              shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (float32) -> (weights [T, K] float32, expert ids [T, K]). n_group > 1: only the experts of the
    topk_group best groups may be chosen, a group scored by its best choice (no bias) or its best two (bias).
    shared > 0: `shared` more slots for every token, experts E .. E + shared - 1 with weight 1 (the shared experts,
    where the fused MoE runs them as experts of its own)."""
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        grouped = choice.view(logits.shape[0], n_group, -1)  # [T, G, E/G]
        if bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        keep = group_scores.topk(topk_group, dim=-1)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]  # [T, K]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if shared:
        T, E = logits.shape
        extra = torch.arange(E, E + shared, device=ids.device).expand(T, shared)
        weights, ids = torch.cat([weights, weights.new_ones(T, shared)], 1), torch.cat([ids, extra], 1)
    return weights, ids

if triton_available():
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, E, stride_l, scaling,
                      E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                      TOPK_GROUP: tl.constexpr,
                      SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SHARED: tl.constexpr,
                      PDL: tl.constexpr):
        """One token. G > 1: groups of E / G experts, scored by their best (no bias) or best two (bias) choices;
        only the TOPK_GROUP best groups' experts may be chosen. Ties go to the lower index, as in torch.topk."""
        enter(PDL)
        t = tl.program_id(0)
        e = tl.arange(0, E_P)
        valid = e < E
        logits = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            scores = tl.where(valid, 1.0 / (1.0 + tl.exp(-logits)), 0.0)
        else:
            p = tl.exp(logits - tl.max(logits, axis=0))
            scores = p / tl.sum(p, axis=0)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
        if G > 1:
            per_group = E // G
            gid = e // per_group
            g_idx = tl.arange(0, G_P)
            group_scores = tl.full([G_P], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                member = gid == g
                c = tl.where(member, choice, float("-inf"))
                best = tl.max(c, axis=0)
                if HAS_BIAS:  # the sum of the group's two best
                    first = tl.argmax(c, axis=0)
                    best = best + tl.max(tl.where(e == first, float("-inf"), c), axis=0)
                group_scores = tl.where(g_idx == g, best, group_scores)
            keep = tl.zeros([E_P], dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                gbest = tl.argmax(group_scores, axis=0)
                keep = keep | (gid == gbest)
                group_scores = tl.where(g_idx == gbest, float("-inf"), group_scores)
            choice = tl.where(keep & valid, choice, float("-inf"))
        k_idx = tl.arange(0, K_P)
        top_w = tl.zeros([K_P], dtype=tl.float32)
        top_i = tl.zeros([K_P], dtype=tl.int64)
        for r in tl.static_range(K):
            i = tl.argmax(choice, axis=0)
            w = tl.sum(tl.where(e == i, scores, 0.0), axis=0)
            top_w = tl.where(k_idx == r, w, top_w)
            top_i = tl.where(k_idx == r, i.to(tl.int64), top_i)
            choice = tl.where(e == i, float("-inf"), choice)
        if NORM:
            top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
        tl.store(w_ptr + t * (K + SHARED) + k_idx, top_w * scaling, mask=k_idx < K)
        tl.store(ids_ptr + t * (K + SHARED) + k_idx, top_i, mask=k_idx < K)
        for j in tl.static_range(SHARED):  # the shared experts' slots, weight 1
            tl.store(w_ptr + t * (K + SHARED) + K + j, 1.0)
            tl.store(ids_ptr + t * (K + SHARED) + K + j, (E + j).to(tl.int64))

    @triton.jit
    def _logits_kernel(x_ptr, w_ptr, out_ptr, T, E, D, stride_x, stride_w,
                       BT: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        """out[t, e] = sum_d x[t, d] * w[e, d] in float32 for a [BT, BE] tile, D in chunks of BD. DOT (x and w of one
        16-bit dtype, BT, BE >= 16): tl.dot on the 16-bit operands, whose products are exact, accumulated in fp32;
        else the products in a [BT, BE, BD] float32 accumulator, summed over D at the end (few tokens: a GEMV)."""
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        e = tl.program_id(0) * BE + tl.arange(0, BE)
        w_rows = w_ptr + e[:, None] * stride_w
        # the router's weights (no kernel writes them) are read a chunk ahead, the first while the kernel before
        # finishes
        d = tl.arange(0, BD)
        w_next = tl.load(w_rows + d[None, :], mask=(e[:, None] < E) & (d[None, :] < D), other=0.0)  # [BE, BD]
        enter(PDL)
        if DOT:
            acc = tl.zeros([BT, BE], dtype=tl.float32)
        else:
            acc = tl.zeros([BT, BE, BD], dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            x = tl.load(x_ptr + t[:, None] * stride_x + d[None, :], mask=(t[:, None] < T) & (d[None, :] < D),
                        other=0.0)  # [BT, BD]
            w = w_next
            w_next = tl.load(w_rows + BD + d[None, :], mask=(e[:, None] < E) & (BD + d[None, :] < D), other=0.0)
            if DOT:
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if not DOT:
            acc = tl.sum(acc, axis=2)
        tl.store(out_ptr + t[:, None] * E + e[None, :], acc, mask=(t[:, None] < T) & (e[None, :] < E))


def _mma_tiles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """More than 16 tokens with x and the weight of one 16-bit dtype: tensor-core tiles (exact products)."""
    return x.shape[0] > 16 and x.dtype == weight.dtype and x.element_size() == 2


def logits_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether router_logits beats torch's dtype copies + fp32 GEMV (H100): up to 16 tokens, or up to 256 on
    tensor-core tiles; a prefill's logits are a GEMM for the matrix library."""
    return x.shape[0] <= 16 or (x.shape[0] <= 256 and _mma_tiles(x, weight))


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, D] (any float dtype, unit stride in D) @ weight [E, D].T (the gate, any float dtype) -> logits [T, E]
    float32, accumulated in float32, one launch, CUDA-graph capturable. More than 16 tokens with x and the weight of
    one 16-bit dtype: 16 x 32 tiles through tl.dot; else a GEMV, each program a block of up to 16 tokens against 1-2
    experts (E or E/2 programs stream the weight once)."""
    T, D = x.shape
    E = weight.shape[0]
    assert weight.shape[1] == D and x.stride(1) == 1 and weight.stride(1) == 1, \
        f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    out = torch.empty(T, E, dtype=torch.float32, device=x.device)  # [T, E]
    if not T:
        return out
    if _mma_tiles(x, weight):
        BT, BE, BD, dot = 16, 32, 256, True
    else:  # the accumulator [BT, BE, BD] at most 16K floats: 128 a thread
        BT, BE = min(triton.next_power_of_2(T), 16), triton.next_power_of_2(max(1, E // 128))
        BD, dot = min(triton.next_power_of_2(D), 16384 // (BT * BE), 2048), False
    _logits_kernel[(triton.cdiv(E, BE), triton.cdiv(T, BT))](x, weight, out, T, E, D, x.stride(0), weight.stride(0),
                                                           BT=BT, BE=BE, BD=BD, DOT=dot, num_warps=4,
                                                           **pdl.launch(x.device))
    return out


def route(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, sigmoid: bool,
          bias: torch.Tensor | None, normalize: bool, scaling: float,
          shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of route_ref: (weights [T, K + shared] float32, expert ids [T, K + shared] int64)."""
    T, E = logits.shape
    assert logits.stride(1) == 1 and E % n_group == 0 and top_k <= E, f"logits {tuple(logits.shape)}"
    weights = torch.empty(T, top_k + shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k + shared, dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, bias if bias is not None else logits, weights, ids, E, logits.stride(0),
                            float(scaling), E_P=triton.next_power_of_2(E), K=top_k, K_P=triton.next_power_of_2(top_k), G=n_group,
                            G_P=triton.next_power_of_2(n_group),
                            TOPK_GROUP=topk_group, SIGMOID=sigmoid, HAS_BIAS=bias is not None, NORM=normalize,
                            SHARED=shared, num_warps=4, **pdl.launch(logits.device))
    return weights, ids
