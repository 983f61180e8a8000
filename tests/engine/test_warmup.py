"""The start-up prefill warm-up (run on GPUs so that no request compiles a kernel) covers the token-count buckets
and the largest batch, and leaves generation unchanged: it only writes cache blocks no sequence owns yet."""
import torch

from lowbit import LLM, SamplingParams
from lowbit.engine.cuda_graphs import warm_up_prefill


def test_warm_up_covers_buckets_and_changes_nothing(tiny_checkpoints):
    path, _ = tiny_checkpoints["deepseek_v3"]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 19)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(path, device="cpu", num_kv_blocks=32)
    runner = llm.engine.runner
    counts = warm_up_prefill(runner.model, 8192, runner.num_blocks, runner.block_size, runner.device)
    assert {1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 255, 256, 257} <= set(counts)
    limit = runner.num_blocks * runner.block_size
    assert max(counts) == limit  # the largest batch the cache holds, too (as sequences of 256 tokens)
    after = [o.token_ids for o in llm.generate(prompts, params)]
    fresh = [o.token_ids for o in LLM(path, device="cpu", num_kv_blocks=32).generate(prompts, params)]
    assert after == fresh
