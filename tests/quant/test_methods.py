"""The runtime's linear methods: loading compressed tensors through the layer's weight_loader (merged layers
included) and multiplying as the scheme says, against references written from the definitions in float64."""
import pytest
import torch

from lowbit.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from lowbit.quant.compressed import CompressedTensorsConfig
from lowbit.quant.formats import compress, dequantize
from lowbit.quant.methods import (fake_quant_fp8_per_token_group, fake_quant_fp8_static, fake_quant_int8_per_token,
                                  fake_quant_int8_per_token_group)
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.schemes import get_scheme


def test_int8_per_token_matches_definition():
    x = torch.randn(5, 64) * torch.tensor([1, 10, 100, 0.1, 3.0])[:, None]
    x[2, 7] = 1000.0
    ref = x.double()
    s = ref.abs().amax(-1, keepdim=True) / 127
    ref = torch.round(ref / s).clamp(-128, 127) * s
    assert torch.allclose(fake_quant_int8_per_token(x).double(), ref, rtol=1e-6, atol=1e-6)


def test_int8_per_token_group_matches_definition():
    """w8a8 --act-group-size 32: one scale per token and 32 features, a last partial group on its own."""
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(0)) * 3
    x[1, 40] = 500.0
    ref = x.double()
    out = torch.empty_like(ref)
    for g in range(0, 80, 32):
        part = ref[:, g:g + 32]
        s = part.abs().amax(-1, keepdim=True) / 127
        out[:, g:g + 32] = torch.round(part / s).clamp(-128, 127) * s
    assert torch.allclose(fake_quant_int8_per_token_group(x, 32).double(), out, rtol=1e-6, atol=1e-6)
    # the outlier costs only its own group: the others keep their own half step (500 / 254 where it shares a scale)
    err = (fake_quant_int8_per_token_group(x, 32)[1, :32] - x[1, :32]).abs().max()
    assert err <= x[1, :32].abs().max() / 254 * (1 + 1e-5) < 0.1


def test_fp8_static_clamps_at_448_scale_units():
    x = torch.tensor([[0.1, -2.0, 5.0, 1e4]])
    y = fake_quant_fp8_static(x, torch.tensor([0.01]))
    assert y[0, 3].item() == pytest.approx(4.48)  # saturates at 448 * scale
    assert y[0, 1].item() == pytest.approx(-2.0, rel=2 ** -3)


@pytest.mark.parametrize("static", [True, False])
def test_fp8_activations_match_compressed_tensors(static):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    torch.manual_seed(0)
    x = torch.randn(6, 256) * torch.rand(6, 1) * 10
    if static:
        args = QuantizationArgs(**get_scheme("w4a8").input_activations.to_dict())
        scale = torch.tensor([x.abs().max().item() / 300])  # some values saturate
        theirs = fake_quantize(x, scale, None, args)
        ours = fake_quant_fp8_static(x, scale)
    else:
        args = QuantizationArgs(**get_scheme("fp8-block").input_activations.to_dict())
        scale, zp = compute_dynamic_scales_and_zp(x, args, module=torch.nn.Module())
        theirs = fake_quantize(x, scale, zp, args)
        ours = fake_quant_fp8_per_token_group(x, 128)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_fp8_per_token_group_scales_each_group():
    x = torch.cat([torch.full((2, 128), 1000.0), torch.full((2, 128), 0.001)], dim=1)
    x[:, 5] = 3.0
    y = fake_quant_fp8_per_token_group(x, 128)
    assert torch.allclose(y[:, 128:], x[:, 128:], rtol=2 ** -3)  # small group keeps its precision
    assert torch.allclose(y, x, rtol=2 ** -3)


def _config(name, **opts):
    scheme = get_scheme(name, **opts)
    return scheme, CompressedTensorsConfig.from_dict({"quant_method": "compressed-tensors", "format": scheme.format,
                                                      "config_groups": {"g": scheme.config_group(["Linear"])}})


@pytest.mark.parametrize("name,opts", [("w4a16", {}), ("w4a16", {"symmetric": False, "group_size": 64}),
                                       ("w8a16", {}), ("w4a8", {}), ("w4a8", {"dynamic": True}),
                                       ("w4a8-int8", {}), ("w8a8", {}), ("fp8-block", {})])
def test_merged_layer_loads_parts_and_applies_the_scheme(name, opts):
    """gate_proj and up_proj quantized apart, loaded into one gate_up_proj: its weight is theirs stacked, and its
    output is the fake-quantized input times that weight."""
    scheme, cfg = _config(name, **opts)
    torch.manual_seed(0)
    parts = [torch.randn(128, 256) * 0.05, torch.randn(128, 256) * 0.05]
    layer = MergedColumnParallelLinear(256, [128, 128], quant_method=cfg.linear_method("mlp.gate_up_proj"),
                                       params_dtype=torch.float32, prefix="mlp.gate_up_proj")
    qws = [rtn_quantize(w, scheme.weights, torch.float32 if scheme.scale_bytes == 4 else torch.bfloat16)
           for w in parts]
    params = dict(layer.named_parameters())
    for shard, qw in enumerate(qws):
        tensors = compress(qw, scheme.format)
        a = scheme.input_activations
        if a is not None and not a.dynamic:
            tensors["input_scale"] = torch.tensor([0.01 * (shard + 1)])
        for local, t in tensors.items():
            params[local].weight_loader(params[local], t, shard)
    layer.quant_method.process_weights_after_loading(layer)
    expected_w = torch.cat([dequantize(q) for q in qws])
    assert torch.equal(layer.quant_method.dequantized_weight(layer), expected_w)
    x = torch.randn(7, 256)
    a = scheme.input_activations
    if a is None:
        xq = x
    elif not a.dynamic:
        assert layer.input_scale.item() == pytest.approx(0.02)  # the larger of the parts' scales
        xq = fake_quant_fp8_static(x, torch.tensor([0.02]))
    elif a.type == "int":
        xq = fake_quant_int8_per_token(x)
    else:
        xq = fake_quant_fp8_per_token_group(x, a.group_size or 256)
    assert torch.allclose(layer(x), xq @ expected_w.t(), atol=1e-5)


def test_misfit_tensor_is_refused():
    scheme, cfg = _config("w4a16")
    layer = ReplicatedLinear(256, 64, quant_method=cfg.linear_method("o_proj"), params_dtype=torch.float32,
                             prefix="o_proj")
    with pytest.raises(ValueError, match="weight_shape"):
        layer.weight_shape.weight_loader(layer.weight_shape, torch.tensor([64, 128]))
    with pytest.raises(ValueError, match="does not fit"):
        layer.weight_packed.weight_loader(layer.weight_packed, torch.zeros(64, 16, dtype=torch.int32))


def test_fp8_blocks_of_merged_parts_not_multiple_of_the_block():
    """q, k, v of 192, 64, 64 rows: each part keeps its own block scales (2 + 1 + 1 rows)."""
    scheme, cfg = _config("fp8-block")
    from lowbit.layers.linear import QKVParallelLinear
    layer = QKVParallelLinear(256, 64, 3, 1, quant_method=cfg.linear_method("self_attn.qkv_proj"),
                              params_dtype=torch.float32, prefix="self_attn.qkv_proj")
    torch.manual_seed(0)
    parts = [torch.randn(n, 256) for n in (192, 64, 64)]
    qws = [rtn_quantize(w, scheme.weights, torch.float32) for w in parts]
    params = dict(layer.named_parameters())
    for shard, qw in enumerate(qws):
        for local, t in compress(qw, scheme.format).items():
            params[local].weight_loader(params[local], t, shard)
    assert layer.weight_scale.shape == (4, 2)
    assert torch.equal(layer.quant_method.dequantized_weight(layer), torch.cat([dequantize(q) for q in qws]))


def _merged_fp8_block(sizes, device, dtype):
    """A merged fp8-block layer of parts `sizes` rows (K = 256), its weights loaded part by part, and the parts'
    dequantized weights."""
    scheme, cfg = _config("fp8-block")
    from lowbit.layers.linear import MergedColumnParallelLinear
    with torch.device(device):
        layer = MergedColumnParallelLinear(256, list(sizes), quant_method=cfg.linear_method("mlp.gate_up_proj"),
                                           params_dtype=dtype, prefix="mlp.gate_up_proj")
    torch.manual_seed(0)
    qws = [rtn_quantize(torch.randn(n, 256) * 0.05, scheme.weights, torch.float32) for n in sizes]
    params = dict(layer.named_parameters())
    for shard, qw in enumerate(qws):
        for local, t in compress(qw, scheme.format).items():
            params[local].weight_loader(params[local], t, shard)
    return layer, torch.cat([dequantize(q) for q in qws])


def test_fp8_block_parts_off_the_block_grid_become_a_product_each():
    """gate and up of 192 rows each (V2-Lite's dense MLP: 10944): a 128-row block would straddle them, so the kernel
    weight is one product per part, each with its own rows of block scales; [256, 64] (q_a and kv_a) stays one."""
    from lowbit.kernels import linear as kl
    layer, w = _merged_fp8_block((192, 192), "cpu", torch.float32)
    kern = kl.fp8_block_linear(layer.weight, layer.weight_scale, (128, 128), [192, 192])
    assert isinstance(kern, kl.ColumnParts) and [p.scale.shape[0] for p in kern.parts] == [2, 2]
    assert torch.equal(kern.dequantized(), w)
    layer, w = _merged_fp8_block((256, 64), "cpu", torch.float32)
    kern = kl.fp8_block_linear(layer.weight, layer.weight_scale, (128, 128), [256, 64])
    assert isinstance(kern, kl.UnpackedLinear) and torch.equal(kern.dequantized(), w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 kernels need a GPU")
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_fp8_block_parts_off_the_block_grid_run_in_the_kernels(monkeypatch, rows):
    """The merged layer of 192 + 192 rows on the kernel path: the per-token-group FP8 input times the parts'
    weights, every part's columns written (one row: decode; 300: the persistent prefill kernel)."""
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    from lowbit.kernels import linear as kl
    layer, w = _merged_fp8_block((192, 192), "cuda", torch.bfloat16)
    layer.quant_method.process_weights_after_loading(layer)
    assert isinstance(layer._kernel, kl.ColumnParts)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    expected = fake_quant_fp8_per_token_group(x.float(), 128) @ w.cuda().t()
    out = layer(x).float()
    assert out.shape == (rows, 384)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2


def test_a_layer_no_kernel_takes_is_named_once(monkeypatch, caplog):
    """Where kernels run, a quantized layer no kernel takes (w4a16 in groups of 16: the packed kernels' planes are
    32 wide) says so at load, once for all layers of its kind, as its decode would otherwise be slow unseen."""
    import logging

    pytest.importorskip("triton")  # (kernels_enabled: where Triton imports)
    from lowbit.quant import methods
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    monkeypatch.setattr(methods, "_WARNED", set())
    scheme, cfg = _config("w4a16", group_size=16)
    for i in range(2):
        prefix = f"model.layers.{i}.self_attn.o_proj"
        layer = ReplicatedLinear(256, 64, quant_method=cfg.linear_method(prefix), params_dtype=torch.float32,
                                 prefix=prefix)
        with caplog.at_level(logging.WARNING, logger="lowbit.quant.methods"):
            layer.quant_method.process_weights_after_loading(layer)
        assert getattr(layer, "_kernel", None) is None
    warned = [r.getMessage() for r in caplog.records if "reference path" in r.getMessage()]
    assert warned == ["model.layers.*.self_attn.o_proj (PackedLinearMethod, 64 x 256): no GPU kernel takes these "
                      "weights; the torch reference path dequantizes them on every call (slow)"]
    monkeypatch.setenv("LOWBIT_KERNELS", "0")  # the torch path by choice: nothing to say
    caplog.clear()
    methods._WARNED.clear()
    layer.quant_method.process_weights_after_loading(layer)
    assert not caplog.records


def test_recipe_default_with_options():
    """A recipe's default takes options as its groups do: w8a8 with activation groups for every layer."""
    from lowbit.quant.recipe import Recipe
    r = Recipe.from_dict({"default": {"scheme": "w8a8", "options": {"act_group_size": 32}}})
    assert r.default == get_scheme("w8a8", act_group_size=32) and r.default.input_activations.group_size == 32
    assert Recipe.from_dict({"default": "w8a8"}).default == get_scheme("w8a8")
    for bad, match in (({"scheme": "w8a8", "opts": {}}, "default is a scheme name"),
                       ({"scheme": "w8a8", "options": {"act_group_size": 16}}, "default: w8a8: activation groups")):
        with pytest.raises(ValueError, match=match):
            Recipe.from_dict({"default": bad})
