"""GGUF 4-bit weights as stored: Q4_0 / Q4_1 codes, scales and mins read from the blocks, their dequantization against
the gguf package's, their mapping onto torch's CPU int4 GEMM, and the linear method that uses it."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.layers.linear import LinearBase
from lowbit.quant import gguf as lg

N, K = 48, 96  # 3 groups of 32 inputs; N a multiple of 16, as the int4 GEMM needs


def _tensor(kind: str, seed: int = 0, rows: int = N):
    """A GGUF reader entry of random weights quantized to `kind` by the gguf package, and its dequantization."""
    import gguf
    from gguf.quants import dequantize, quantize
    w = np.random.default_rng(seed).normal(size=(rows, K)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = quantize(w, qtype)
    t = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=qtype, shape=np.array([K, rows]), data=blocks)
    return t, torch.from_numpy(dequantize(blocks, qtype).astype(np.float32).reshape(rows, K))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_stored_q4_dequantizes_as_gguf_does(kind):
    t, ref = _tensor(kind)
    codes, scale, low = lg.stored_q4(t, "model.layers.0.self_attn.o_proj.weight", {"model_type": "qwen2"})
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and codes.shape == (N, K)
    assert scale.shape == low.shape == (N, K // 32)
    assert torch.equal(lg.unpack_codes(lg.pack_codes(codes)), codes)
    assert torch.equal(lg.dequant_q4(lg.pack_codes(codes), scale, low), ref)  # bit for bit


def test_stored_q4_undoes_llamas_row_permutation():
    t, _ = _tensor("Q4_1")
    cfg = {"model_type": "llama", "num_attention_heads": 3, "num_key_value_heads": 3}
    name = "model.layers.0.self_attn.q_proj.weight"
    codes, scale, low = lg.stored_q4(t, name, cfg)
    assert torch.equal(lg.dequant_q4(lg.pack_codes(codes), scale, low), lg.dequantized(t, name, cfg))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_int4pack_holds_the_stored_weight(kind):
    """In float32 the int4 GEMM's (code - 8) * s + z is the stored scale * code + min (up to rounding min + 8s)."""
    t, ref = _tensor(kind, seed=1)
    codes, scale, low = lg.stored_q4(t, "x.weight", {"model_type": "qwen2"})
    weight, scales_zeros = lg.int4pack(lg.pack_codes(codes), scale, low, torch.float32)
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K), weight, 32, scales_zeros).T  # [N, K]
    assert (w - ref).abs().max() <= 1e-6 * ref.abs().max()


def _layer(dtype: torch.dtype, kind: str = "Q4_1") -> tuple[LinearBase, torch.Tensor]:
    """A merged two-part layer (as gate/up) of Q4 weights loaded through its weight_loader, and its float32 weight."""
    layer = LinearBase(K, [N, N], tp_dim=0, quant_method=lg.Q4LinearMethod(), params_dtype=dtype, prefix="t")
    refs = []
    for shard in range(2):
        t, ref = _tensor(kind, seed=10 + shard)
        codes, scale, low = lg.stored_q4(t, "x.weight", {"model_type": "qwen2"})
        for name, value in (("weight_packed", lg.pack_codes(codes)), ("weight_scale", scale), ("weight_min", low)):
            getattr(layer, name).weight_loader(getattr(layer, name), value, shard)
        refs.append(ref)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, torch.cat(refs)


def test_q4_linear_float32_is_the_dequantized_weight():
    layer, w = _layer(torch.float32)
    assert layer._int4 is None
    assert torch.equal(layer.quant_method.dequantized_weight(layer), w)
    x = torch.randn(5, K)
    assert torch.equal(layer(x), F.linear(x, w))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_linear_bfloat16_runs_the_int4_gemm(kind):
    layer, w = _layer(torch.bfloat16, kind)
    assert layer._int4 is not None and layer._dequant is None
    x = torch.randn(5, K).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 2 * N)
    ref = x.double() @ w.double().T  # the bf16 inputs times the stored weight, in float64
    # bf16 rounds the scales, the zeros and the output: well under a percent of the output's range
    assert (y.double() - ref).abs().max() <= 0.01 * ref.abs().max()
    assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(5)]), y)  # rows do not depend on the batch
