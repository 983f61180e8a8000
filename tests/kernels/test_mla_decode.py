"""Paged MLA decode kernel against its float64 reference, and the engine's greedy decode with it against without."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit import LLM, SamplingParams  # noqa: E402
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


def test_engine_decodes_with_the_kernel(tiny_checkpoints, monkeypatch):
    path, _ = tiny_checkpoints["deepseek_v3"]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 21, 9)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    ref = [o.token_ids for o in LLM(path, device=DEV, dtype="float32").generate(prompts, params)]
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    llm = LLM(path, device=DEV, dtype="float32")
    attn = llm.engine.runner.model.model.layers[0].self_attn.attn
    assert attn.decode_kernel
    assert [o.token_ids for o in llm.generate(prompts, params)] == ref
