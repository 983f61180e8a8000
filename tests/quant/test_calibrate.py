"""Calibration plumbing: a layer run on its own matches the whole model, and every linear's input is captured
(MLA's absorbed kv_b_proj included)."""
import torch

from lowbit import LLM
from lowbit.quant import layerwise
from lowbit.quant.calibrate import CalibState, calibration_sequences, capture_inputs, embed, rms_norm
from lowbit.quant.checkpoint import SourceReader


def test_calibration_sequences():
    seqs = calibration_sequences(list(range(100)), 50, 16)
    assert [len(s) for s in seqs] == [16, 16, 16, 2] and seqs[1][0] == 16


def test_layers_run_alone_reproduce_the_model(tiny_deepseek):
    """Embedding, then each layer standalone on the previous one's output, then the final norm and head: the
    runtime's logits."""
    reader = SourceReader(tiny_deepseek)
    cfg = reader.model_config()
    seqs = [list(range(5, 40)), list(b"hello calibration")]
    t = reader.read(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    state = embed(t["model.embed_tokens.weight"], seqs, torch.float32)
    for i in range(cfg.num_hidden_layers):
        layer = layerwise.build_layer(cfg, i, torch.float32)
        layerwise.load_layer(layer, f"model.layers.{i}", reader.read(layerwise.checkpoint_names(
            layer, f"model.layers.{i}")))
        with capture_inputs(layer) as seen:
            state = layerwise.advance(layer, state, cfg)
        kv_b = seen["self_attn.kv_b_proj"]
        assert len(kv_b) == 1 and kv_b[0].shape == (state.hidden.shape[0], cfg.kv_lora_rank)
        if cfg.is_moe_layer(i):  # each token reaches num_experts_per_tok experts
            assert sum(sum(x.shape[0] for x in seen[f"mlp.experts.{e}.gate_up_proj"]) for e in range(8)) == \
                cfg.num_experts_per_tok * state.hidden.shape[0]
    logits = rms_norm(state.hidden, t["model.norm.weight"], cfg.rms_norm_eps) @ t["lm_head.weight"].t()
    llm = LLM(tiny_deepseek, device="cpu", num_kv_blocks=16)
    for k, s in enumerate(seqs):
        start = sum(len(x) for x in seqs[:k])
        assert torch.allclose(logits[start:start + len(s)], llm.logits(s), atol=1e-4)


def test_mtp_layer_reads_normalized_hidden_and_next_tokens(tiny_deepseek):
    reader = SourceReader(tiny_deepseek)
    cfg = reader.model_config()
    n = cfg.num_hidden_layers
    layer = layerwise.build_layer(cfg, n, torch.float32)
    layerwise.load_layer(layer, f"model.layers.{n}", reader.read(layerwise.checkpoint_names(layer,
                                                                                          f"model.layers.{n}")))
    state = CalibState(torch.randn(12, cfg.hidden_size), [list(range(7)), list(range(20, 25))])
    norm = reader.read(["model.norm.weight"])["model.norm.weight"]
    with capture_inputs(layer) as seen:
        out = layerwise.advance(layer, state, cfg, prev_norm=norm)
    assert out.seqs == [list(range(1, 7)), list(range(21, 25))] and out.hidden.shape == (10, cfg.hidden_size)
    eh = seen["eh_proj"][0]  # [enorm(embed(t+1)), hnorm(norm(h_t))]
    h = rms_norm(rms_norm(state.hidden[[0, 1, 2, 3, 4, 5, 7, 8, 9, 10]], norm, cfg.rms_norm_eps),
                 layer.hnorm.weight, cfg.rms_norm_eps)
    assert torch.allclose(eh[:, cfg.hidden_size:], h, atol=1e-5)
