"""MLA's expanded prefill (each head's keys and values expanded from the latent, the GPU's path) against the absorbed
form (the CPU path), on the same cache and context: whole prompts, and new tokens after a cached prefix."""
import pytest
import torch

from lowbit.layers import attention


def _absorbed(attn, q_nope, q_pe, lat, pe, w_uk, w_uv):
    q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)
    return torch.einsum("thr,hvr->thv", attn(q_latent, q_pe, lat, pe), w_uv)


@pytest.mark.parametrize("prefix", [0, 13])
def test_expanded_prefill_equals_the_absorbed_form(prefix):
    g = torch.Generator().manual_seed(prefix)
    H, nope, dr, r, vd, bs = 4, 16, 8, 32, 12, 8
    lens = [21, 9]
    attn = attention.MLAAttention(H, r, dr, scale=(nope + dr) ** -0.5)
    ctx, blocks = attention.prefill_context([n + prefix for n in lens], bs, "cpu")
    w_uk = torch.randn(H, nope, r, generator=g, dtype=torch.float64) / r ** 0.5
    w_uv = torch.randn(H, vd, r, generator=g, dtype=torch.float64) / r ** 0.5
    outs = {}
    for form in ("absorbed", "expanded"):
        attn.bind_cache([torch.zeros(blocks, bs, 1, r + dr, dtype=torch.float64)])
        gg = torch.Generator().manual_seed(1)
        if prefix:  # the first `prefix` tokens of every sequence cached by an earlier step
            pre = attention.Context(is_prefill=True, slot_mapping=torch.cat(
                [attention.gather_slots(ctx.block_tables[i], prefix, bs) for i in range(len(lens))]))
            attention.store_kv(attn.kv_cache, torch.randn(len(lens) * prefix, 1, r + dr, generator=gg,
                                                          dtype=torch.float64), pre.slot_mapping)
        T = sum(lens)
        step = attention.Context(
            is_prefill=True, block_tables=ctx.block_tables, block_size=bs, query_lens=lens,
            context_lens_list=[n + prefix for n in lens], context_lens=ctx.context_lens,
            slot_mapping=torch.cat([attention.gather_slots(ctx.block_tables[i], n + prefix, bs)[prefix:]
                                    for i, n in enumerate(lens)]))
        q_nope, q_pe = (torch.randn(T, H, d, generator=gg, dtype=torch.float64) for d in (nope, dr))
        lat, pe = torch.randn(T, r, generator=gg, dtype=torch.float64), torch.randn(T, dr, generator=gg,
                                                                                   dtype=torch.float64)
        attention.set_context(step)
        try:
            if form == "absorbed":
                outs[form] = _absorbed(attn, q_nope, q_pe, lat, pe, w_uk, w_uv)
            else:
                outs[form] = attn.prefill_expanded(q_nope, q_pe, lat, pe, w_uk, w_uv)
        finally:
            attention.reset_context()
    assert outs["expanded"].shape == (sum(lens), H, vd)
    torch.testing.assert_close(outs["expanded"], outs["absorbed"], rtol=1e-9, atol=1e-9)


def test_expanded_prefill_only_where_it_fits(monkeypatch):
    """The expanded form is taken on the kernel path for a prefill whose longest sequence's keys and values fit
    EXPANDED_PREFILL_BYTES; decode steps, the CPU path, LOWBIT_MLA_PREFILL=absorbed and longer contexts keep the
    absorbed form."""
    attn = attention.MLAAttention(128, 512, 64, scale=1.0)
    attn.bind_cache([torch.zeros(4, 16, 1, 576, dtype=torch.bfloat16)])
    assert not attn.decode_kernel  # the CPU: no kernels
    attn.decode_kernel = True
    fits = 21845  # 2 x 128 heads x 21845 x 192 x 2 bytes <= 2 GiB < the same at 21846
    try:
        for lens, prefill, want in (([fits, 10], True, True), ([fits + 1], True, False), ([8], False, False)):
            attention.set_context(attention.Context(is_prefill=prefill, context_lens_list=lens, query_lens=lens))
            assert attn.prefills_expanded(192) == want, (lens, prefill)
        attention.set_context(attention.Context(is_prefill=True, context_lens_list=[8], query_lens=[8]))
        monkeypatch.setattr(attention, "EXPANDED_PREFILL", False)
        assert not attn.prefills_expanded(192)
    finally:
        attention.reset_context()


def test_mla_prefill_switch_takes_its_two_words_only():
    assert attention._mla_prefill_form("expanded") and not attention._mla_prefill_form("absorbed")
    with pytest.raises(ValueError, match="LOWBIT_MLA_PREFILL"):
        attention._mla_prefill_form("absorb")
