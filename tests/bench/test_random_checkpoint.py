"""benchmarks/make_random_checkpoint.py: the geometries count the parameters the published models have, and what it
writes (bf16 or quantized) loads in lowbit's runtime with its strict completeness check."""
import importlib.util
import os

import pytest

from lowbit import LLM, SamplingParams

_spec = importlib.util.spec_from_file_location(
    "make_random_checkpoint", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                                           "make_random_checkpoint.py"))
mrc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mrc)

SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, kv_lora_rank=128,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, num_hidden_layers=2)


def test_geometries_count_the_published_parameters():
    assert round(mrc.num_parameters(mrc.GEOMETRIES["v2-lite"]) / 1e9, 1) == 15.7  # DeepSeek-V2-Lite: 15.7B
    r1 = dict(mrc.GEOMETRIES["r1"], num_hidden_layers=61, first_k_dense_replace=3)
    assert round(mrc.num_parameters(r1) / 1e9) == 671  # DeepSeek-R1 without its MTP layer: 671B


@pytest.mark.parametrize("geometry,scheme", [("v2-lite", "bf16"), ("v2-lite", "w4a16"), ("r1", "w8a8"),
                                             ("r1", "bf16")])
def test_written_checkpoint_loads_and_generates(tmp_path, geometry, scheme):
    cfg = dict(mrc.GEOMETRIES[geometry], **SMALL)
    if cfg["q_lora_rank"]:
        cfg["q_lora_rank"] = 128
    if cfg["n_group"] > 1:
        cfg.update(n_group=2, topk_group=1)
    out = mrc.write(cfg, str(tmp_path / "ckpt"), scheme, progress=False)
    assert os.path.exists(os.path.join(out, "config.json"))
    llm = LLM(out, device="cpu")
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    # every id is a word of the checkpoint's tokenizer, so a server streams text for each (lowbit bench counts it)
    assert len(out.text.split()) == sum(i != llm.engine.tokenizer.eos_token_id for i in out.token_ids)
