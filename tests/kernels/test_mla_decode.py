"""Paged MLA decode kernel against its float64 reference (the engine with it: test_gqa_decode.py)."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit.kernels import mla_decode as md  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.mark.parametrize("rank,rope,heads", [(32, 8, 20), (128, 32, 16)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16 if GPU else torch.float16])
def test_mla_decode_matches_reference(rank, rope, heads, splits, dtype):
    g = torch.Generator().manual_seed(rank + splits)
    page, blocks = 16, 24
    lens = torch.tensor([1, 17, 70, 33, 5])  # odd lengths, one shorter than a page, one row only
    tables = torch.stack([torch.randperm(blocks, generator=g)[:6] for _ in lens])
    cache = torch.randn(blocks, page, 1, rank + rope, generator=g)
    q = torch.randn(len(lens), heads, rank + rope, generator=g)
    ref = md.mla_decode_ref(q.to(dtype), cache.to(dtype), tables, lens, 0.1, rank)
    out = md.mla_decode(q.to(dtype).to(DEV), cache.to(dtype).to(DEV), tables.to(DEV), lens.to(DEV), 0.1, rank,
                        num_splits=splits, block_n=16)
    assert out.shape == (len(lens), heads, rank) and out.dtype == dtype
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)



@pytest.mark.parametrize("S,B,H,D", [(16, 1, 16, 512), (3, 5, 20, 32), (1, 2, 3, 40), (5, 33, 8, 128)])
def test_split_combine_matches_torch(S, B, H, D):
    """The one-launch merge of the context splits against torch's softmax over their log-sum-exps, with splits that
    saw no context (lse -inf) among them."""
    from lowbit.kernels import split_kv
    g = torch.Generator().manual_seed(S * B + D)
    partial = torch.randn(S, B, H, D, generator=g)
    lse = torch.randn(S, B, H, generator=g) * 3
    if S > 1:
        lse[S - 1] = float("-inf")  # the last split of every row saw nothing (short contexts)
        partial[S - 1] = 0.0
    ref = split_kv.combine_ref(partial, lse)
    out = split_kv.combine(partial.to(DEV), lse.to(DEV), torch.float32)
    assert out.shape == (B, H, D)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
