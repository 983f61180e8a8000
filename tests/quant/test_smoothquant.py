"""SmoothQuant: the float model computes exactly what it did (router included), and int8 activations with outlier
channels lose less."""
import torch

from lowbit.quant import layerwise, smoothquant
from lowbit.quant.calibrate import capture_inputs, embed
from lowbit.quant.checkpoint import SourceReader
from lowbit.quant.methods import fake_quant_int8_per_token
from lowbit.quant.recipe import Recipe
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.formats import dequantize
from lowbit.quant.schemes import get_scheme


def test_smoothing_reduces_int8_error_with_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, [3, 77, 200]] *= 60  # a few outlier channels, as LLM activations have
    w = torch.randn(128, 256) * 0.05
    args = get_scheme("w8a8").weights

    def error(xs, ws):
        y = fake_quant_int8_per_token(xs) @ dequantize(rtn_quantize(ws, args, torch.float32)).t()
        return ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item()

    s = smoothquant.smoothing_factors(x.abs().amax(0), [w], 0.5)
    assert torch.allclose((x / s) @ smoothquant.smooth_weight(w, s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    assert error(x / s, smoothquant.smooth_weight(w, s)) < 0.5 * error(x, w)


def _layer_outputs(src, layer_idx, alpha):
    reader = SourceReader(src)
    cfg = reader.model_config()
    prefix = f"model.layers.{layer_idx}"
    layer = layerwise.build_layer(cfg, layer_idx, torch.float32)
    names = layerwise.checkpoint_names(layer, prefix)
    tensors = reader.read(names)
    layerwise.load_layer(layer, prefix, tensors)
    specs = layerwise.linear_specs(layer, prefix, Recipe.from_scheme("w8a8"))
    seqs = [list(b"SmoothQuant keeps the float function."), list(range(40, 90))]
    state = embed(reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"], seqs, torch.float32)
    with capture_inputs(layer) as seen:
        before = layerwise.advance(layer, state, cfg).hidden
    inputs = {p: torch.cat(v) if v else torch.zeros(0, 1) for p, v in seen.items()}
    smoothed = dict(tensors)
    layerwise._smooth(smoothed, specs, inputs, prefix, alpha)
    fresh = layerwise.build_layer(cfg, layer_idx, torch.float32)
    layerwise.load_layer(fresh, prefix, smoothed)
    after = layerwise.advance(fresh, state, cfg).hidden
    return tensors, smoothed, before, after, prefix


def test_moe_layer_function_unchanged_router_included(tiny_deepseek):
    tensors, smoothed, before, after, p = _layer_outputs(tiny_deepseek, 2, 0.5)
    for norm in ("input_layernorm", "self_attn.q_a_layernorm", "post_attention_layernorm"):
        assert not torch.equal(tensors[f"{p}.{norm}.weight"], smoothed[f"{p}.{norm}.weight"]), norm
    assert not torch.equal(tensors[f"{p}.mlp.gate.weight"], smoothed[f"{p}.mlp.gate.weight"])  # compensated
    assert not torch.equal(tensors[f"{p}.mlp.experts.3.up_proj.weight"], smoothed[f"{p}.mlp.experts.3.up_proj.weight"])
    kv_norm = f"{p}.self_attn.kv_a_layernorm.weight"
    assert torch.equal(tensors[kv_norm], smoothed[kv_norm])  # kv_b_proj is absorbed into attention: not smoothed
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


def test_llama_layer_function_unchanged(tiny_llama):
    tensors, smoothed, before, after, p = _layer_outputs(tiny_llama, 1, 0.8)
    assert not torch.equal(tensors[f"{p}.input_layernorm.weight"], smoothed[f"{p}.input_layernorm.weight"])
    assert not torch.equal(tensors[f"{p}.mlp.up_proj.weight"], smoothed[f"{p}.mlp.up_proj.weight"])  # for down_proj
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
