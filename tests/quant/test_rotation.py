"""Rotating the residual stream: the matrices are orthogonal Hadamard ones, a lone outlier channel spreads evenly,
and the rotated checkpoint computes what the original does (Hugging Face's own model as the oracle)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.quant import rotation


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 576, 896, 1536])
def test_hadamard_orders(n):
    h = rotation.hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_rotation_matrix_is_orthogonal_and_fixed_by_its_seed():
    for n in (576, 6):  # 6 has no Hadamard matrix: a random orthogonal one
        q = rotation.rotation_matrix(n)
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(q, rotation.rotation_matrix(n)) and not torch.equal(q, rotation.rotation_matrix(n, 1))
    assert rotation.hadamard(6) is None


def test_a_lone_outlier_channel_spreads_evenly():
    q = rotation.rotation_matrix(576)
    x = torch.zeros(576, dtype=torch.float64)
    x[247] = 100.0
    assert torch.allclose((x @ q).abs(), torch.full((576,), 100.0 / 24, dtype=torch.float64))


def _rotated_checkpoint(src, dst, cfg):
    """Every unit of a llama-family checkpoint rotated as `lowbit quantize --rotate` does, written untied."""
    t = load_file(os.path.join(src, "model.safetensors"))
    q = rotation.rotation_matrix(cfg["hidden_size"])
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    qh = rotation.rotation_matrix(head_dim, 1)
    out = rotation.rotate_embedding({"model.embed_tokens.weight": t["model.embed_tokens.weight"]}, q)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update(rotation.rotate_layer({n: v for n, v in t.items() if n.startswith(p + ".")}, p, q, qh,
                                         cfg["num_attention_heads"], cfg["num_key_value_heads"]))
    out.update(rotation.rotate_head({n: v for n, v in t.items() if n in ("model.norm.weight", "lm_head.weight")}
                                    | {"model.embed_tokens.weight": t["model.embed_tokens.weight"]}, q))
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(dict(config, tie_word_embeddings=False), f)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_rotated_model_computes_the_same(tmp_path, family):
    """Norm weights away from 1, qwen2's q/k/v biases and qwen3's q/k norms included; the rotated weights really
    differ (no norm weight left but 1s) and Hugging Face's model gives the same logits."""
    import transformers
    from tests.quant.conftest import LLAMA
    cls, cfg_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)}[family]
    cfg = dict(LLAMA, num_hidden_layers=2, head_dim=32)
    torch.manual_seed(0)
    model = cls(cfg_cls(**cfg)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "src"))
    rot = _rotated_checkpoint(str(tmp_path / "src"), str(tmp_path / "rot"), cfg)
    assert torch.equal(rot["model.layers.1.post_attention_layernorm.weight"], torch.ones(cfg["hidden_size"]))
    assert "lm_head.weight" in rot and not torch.allclose(rot["lm_head.weight"], rot["model.embed_tokens.weight"])
    other = cls.from_pretrained(str(tmp_path / "rot"), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"Rotations fold into the weights.")])
    with torch.no_grad():
        a, b = model(ids).logits, other(ids).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()


def test_a_deepseek_layer_is_refused():
    q, qh = rotation.rotation_matrix(8), rotation.rotation_matrix(4)
    with pytest.raises(ValueError, match="llama, qwen2 and qwen3"):
        rotation.rotate_layer({"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.zeros(4, 8)},
                              "model.layers.0", q, qh, 2, 2)


def test_value_rotation_alone_is_exact_under_gqa():
    """QuaRot's R2 by itself (the residual stream left as it is): each kv head's v_proj rows turned by Qh^T and the
    o_proj columns of every query head turned by Qh; with 4 query heads sharing 2 kv heads the logits are unchanged,
    and o_proj's input (the attention output) is really turned: its columns changed."""
    import transformers
    from tests.quant.conftest import LLAMA
    cfg = transformers.LlamaConfig(**dict(LLAMA, num_hidden_layers=2))
    assert cfg.num_attention_heads == 2 * cfg.num_key_value_heads
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    qh = rotation.rotation_matrix(head_dim, rotation.SEED + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            v, o = layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight
            v.copy_(rotation.rotate_head_outputs(v, qh, cfg.num_key_value_heads))
            o_before = o.clone()
            o.copy_(rotation.rotate_head_inputs(o, qh, cfg.num_attention_heads))
            assert (o - o_before).abs().max() > 0.1 * o_before.abs().max()
        ids = torch.tensor([list(b"Each head's values turn.")])
        a, b = ref(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
