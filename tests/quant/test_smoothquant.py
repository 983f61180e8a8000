"""SmoothQuant: the float model computes exactly what it did (router included), and int8 activations with outlier
channels lose less."""
import pytest
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


def _int8_error_functions():
    args = get_scheme("w8a8").weights
    return fake_quant_int8_per_token, lambda w: dequantize(rtn_quantize(w, args, torch.float32))


def test_search_picks_the_least_output_error():
    """The searched factors beat no smoothing and SmoothQuant's 0.5 on outlier channels, and are the best of the
    candidates by the error they report."""
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, [3, 77, 200]] *= 60
    w = torch.randn(128, 256) * 0.05
    qa, qw = _int8_error_functions()
    s, none, best = smoothquant.search_factors(x, [w], qa, qw)
    assert s is not None and best == smoothquant.output_error(x, [w], s, qa, qw)
    assert best < 0.5 * none
    assert best <= smoothquant.output_error(x, [w], smoothquant.smoothing_factors(x.abs().amax(0), [w], 0.5), qa, qw)
    assert all(best <= smoothquant.output_error(x, [w], c, qa, qw) for c in smoothquant.candidate_factors(x, [w]))


def test_search_leaves_the_inputs_alone_when_smoothing_hurts():
    """One token's huge value in one channel (a massive activation) makes that channel's factor huge at alpha 0.9:
    its weight column then takes over every row's scale, worse than the one noisy token, and the search answers
    None (no smoothing)."""
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[0, 5] = 1000.0
    w = torch.randn(32, 64) * 0.05
    qa, qw = _int8_error_functions()
    s, none, best = smoothquant.search_factors(x, [w], qa, qw, alphas=(0.9,))
    assert s is None and best == none


def test_o_proj_factors_are_shared_by_the_heads_of_a_kv_head():
    s = torch.arange(12.0)  # 4 query heads of 3 features, 2 kv heads: heads 0,1 read kv head 0; 2,3 kv head 1
    shared = smoothquant.share_across_heads(s, num_kv_heads=2, head_dim=3)
    assert shared.tolist() == [3, 4, 5, 3, 4, 5, 9, 10, 11, 9, 10, 11]
    assert smoothquant.kv_rows(shared, 2, 3).tolist() == [3, 4, 5, 9, 10, 11]


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
    layerwise._smooth(smoothed, specs, inputs, prefix, alpha, None if cfg.is_deepseek else cfg.head_dim)
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


@pytest.mark.parametrize("family,alpha", [("llama", 0.5), ("llama", "auto"), ("qwen2", "auto")])
def test_o_proj_smoothed_through_v_proj(tmp_path, family, alpha):
    """o_proj's input divided through v_proj's rows (its bias too, qwen2), with grouped-query heads sharing factors:
    the layer computes what it did."""
    from tests.quant.test_pipeline import make_family
    src = make_family(tmp_path, family)
    tensors, smoothed, before, after, p = _layer_outputs(src, 1, alpha)
    for name in ("self_attn.v_proj.weight", "self_attn.o_proj.weight") + (
            ("self_attn.v_proj.bias",) if family == "qwen2" else ()):
        assert not torch.equal(tensors[f"{p}.{name}"], smoothed[f"{p}.{name}"]), name
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
