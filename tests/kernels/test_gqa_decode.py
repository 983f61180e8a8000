"""Paged grouped-query decode kernel against its float64 reference, and the engine's greedy decode with the decode
kernels against without (MLA: DeepSeek-V3; GQA: Llama, Qwen3)."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import gqa_decode as gd  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (9, 3, 32), (4, 4, 128)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16 if GPU else torch.float16])
def test_gqa_decode_matches_reference(heads, kv_heads, dim, splits, dtype):
    g = torch.Generator().manual_seed(heads * dim + splits)
    page, blocks = 16, 24
    lens = torch.tensor([1, 17, 70, 33, 5])
    tables = torch.stack([torch.randperm(blocks, generator=g)[:6] for _ in lens])
    k = torch.randn(blocks, page, kv_heads, dim, generator=g)
    v = torch.randn(blocks, page, kv_heads, dim, generator=g)
    q = torch.randn(len(lens), heads, dim, generator=g)
    ref = gd.gqa_decode_ref(q.to(dtype), k.to(dtype), v.to(dtype), tables, lens, dim ** -0.5)
    out = gd.gqa_decode(q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV), tables.to(DEV),
                        lens.to(DEV), dim ** -0.5, num_splits=splits, block_n=16)
    assert out.shape == (len(lens), heads, dim) and out.dtype == dtype
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("variant", ["deepseek_v3", "llama", "qwen3"])
def test_engine_decodes_with_the_kernel(tiny_checkpoints, monkeypatch, variant):
    path, _ = tiny_checkpoints[variant]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 21, 9)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    ref = [o.token_ids for o in LLM(path, device=DEV, dtype="float32").generate(prompts, params)]
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    llm = LLM(path, device=DEV, dtype="float32")
    assert llm.engine.runner.model.model.layers[0].self_attn.attn.decode_kernel
    assert [o.token_ids for o in llm.generate(prompts, params)] == ref
