"""Batching changes nothing: prompts run together, or squeezed through a tiny KV pool with preemption, give
exactly the greedy tokens each gives alone, and the tokens Hugging Face's greedy generate gives."""
import pytest
import torch

from lowbit import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms",
    "def fibonacci(n):",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Hello",
    "The three primary colors are red, yellow and",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """The tokens up to and including the first EOS (Hugging Face stops there; ignore_eos runs on)."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def alone(default_llm):
    return [default_llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def test_batch_equals_alone(default_llm, alone):
    together = [o.token_ids for o in default_llm.generate(PROMPTS, GREEDY)]
    assert together == alone


def test_batch_with_preemption_equals_alone(alone):
    llm = LLM(device="cpu", num_kv_blocks=24, block_size=4)  # 96 token slots for 8 x ~30 tokens
    out = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == alone
    assert llm.engine.block_manager.num_free_blocks == 24


def test_bf16_int4_batch_equals_alone_and_answers_paris(default_llm_bf16):
    """The int4 GEMM's rows do not depend on the batch: the fast path batches exactly too."""
    alone = [default_llm_bf16.generate(p, GREEDY)[0].token_ids for p in PROMPTS]
    assert [o.token_ids for o in default_llm_bf16.generate(PROMPTS, GREEDY)] == alone
    out = default_llm_bf16.chat([{"role": "user", "content": "What is the capital of France?"}],
                                SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out[0].text


def test_greedy_equals_huggingface(default_hf, default_llm, alone):
    for prompt, ours in zip(PROMPTS, alone):
        ids = default_llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = default_hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        eos = default_hf.generation_config.eos_token_id
        assert until_eos(ours, eos) == until_eos(ref[0, len(ids):].tolist(), eos), prompt


def test_mla_batch_with_preemption_equals_alone_and_huggingface(tiny_checkpoints):
    path, hf = tiny_checkpoints["deepseek_v3"]
    prompts = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 9, 30, 5, 12)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, device="cpu")
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    tight = LLM(path, device="cpu", num_kv_blocks=12, block_size=4)
    assert [o.token_ids for o in tight.generate(prompts, params)] == alone
    assert tight.engine.scheduler.num_preemptions > 0
    for p, ours in zip(prompts, alone):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        eos = hf.generation_config.eos_token_id
        assert until_eos(ours, eos) == until_eos(ref[0, len(p):].tolist(), eos)
