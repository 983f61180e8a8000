"""Round-to-nearest against a float64 reference written from the definition."""
import pytest
import torch

from lowbit.quant.formats import dequantize
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.schemes import get_scheme


def reference_int(w, bits, group, symmetric):
    """Per (row, group) min-max quantization in float64, straight from the definition."""
    w = w.double()
    out_f, in_f = w.shape
    g = w.view(out_f, in_f // group, group)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = g.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    q = torch.round(g / scale + zp).clamp(qmin, qmax)
    return ((q - zp) * scale).view(out_f, in_f)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_group_rtn_matches_the_definition(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    scheme = get_scheme("w4a16" if bits == 4 else "w8a16", group_size=32, symmetric=symmetric)
    ours = dequantize(rtn_quantize(w, scheme.weights, torch.float32)).double()
    ref = reference_int(w, bits, 32, symmetric)
    # float32 scales vs float64: a value may sit on a rounding boundary; nearly all agree exactly
    close = (ours - ref).abs() < 1e-5
    assert close.float().mean() > 0.995
    assert (ours - w.double()).abs().max() <= (ref - w.double()).abs().max() + 1e-5


def test_channel_scales_and_shapes():
    scheme = get_scheme("w8a8")
    w = torch.randn(24, 64)
    qw = rtn_quantize(w, scheme.weights, torch.bfloat16)
    assert qw.values.dtype == torch.int8 and qw.scale.shape == (24, 1) and qw.scale.dtype == torch.bfloat16
    assert (qw.values.float().abs().amax(dim=1) >= 127).all()  # each row's extreme uses the full range


def test_fp8_block_scales():
    scheme = get_scheme("fp8-block")
    w = torch.randn(300, 200)
    qw = rtn_quantize(w, scheme.weights, torch.float32)
    assert qw.values.dtype == torch.float8_e4m3fn and qw.scale.shape == (3, 2)
    assert torch.allclose(qw.scale[0, 0], w[:128, :128].abs().max() / 448)
    rel = ((dequantize(qw) - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 0.04


def test_group_size_must_divide_the_input():
    with pytest.raises(ValueError, match="group size"):
        rtn_quantize(torch.randn(4, 96), get_scheme("w4a16").weights)
