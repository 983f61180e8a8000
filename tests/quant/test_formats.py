"""The tensor layouts against the compressed-tensors library itself (its packers and decompressors)."""
import pytest
import torch

from lowbit.quant.formats import compress, decompress, dequantize, pack_int32, unpack_int32
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.schemes import get_scheme

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_bit_identical_to_compressed_tensors(bits, dim):
    g = torch.Generator().manual_seed(bits + dim)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    v = torch.randint(lo, hi, (24, 40), generator=g, dtype=torch.int8)
    ours = pack_int32(v, bits, dim=dim)
    theirs = ct_helpers.pack_to_int32(v, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, v.shape[dim], dim=dim), v)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, v.shape, packed_dim=dim), v)


def _ct_scheme(scheme):
    from compressed_tensors.quantization import QuantizationScheme
    return QuantizationScheme(**scheme.config_group(["Linear"]))


@pytest.mark.parametrize("name,opts", [
    ("w4a16", {}), ("w4a16", {"symmetric": False, "group_size": 32}), ("w8a16", {}),
    ("w8a16", {"symmetric": False, "group_size": 64}), ("w4a8", {}), ("w4a8-int8", {}), ("w8a8", {}),
    ("fp8-block", {}),
])
def test_compressed_tensors_decompresses_our_tensors_exactly(name, opts):
    from compressed_tensors.compressors import BaseCompressor
    scheme = get_scheme(name, **opts)
    torch.manual_seed(0)
    w = torch.randn(200, 256) * 0.05
    qw = rtn_quantize(w, scheme.weights, torch.float32)
    tensors = compress(qw, scheme.format)
    ours = decompress(tensors, scheme.weights, scheme.format)
    assert torch.equal(ours, dequantize(qw))
    theirs = BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(tensors), _ct_scheme(scheme))
    assert torch.equal(theirs["weight"].float(), ours)
    # and the rounding is what it should be: within half a step of the original
    step = {4: 0.05 * 4 / 7.5, 8: 0.05 * 4 / 127.5}[scheme.weights.num_bits] if scheme.weights.type == "int" else None
    err = (ours - w).abs().max().item()
    if step is not None:
        assert err <= step * (1.0 if scheme.weights.symmetric else 2.0)
    else:
        assert err <= w.abs().max().item() * 2 ** -4  # fp8 e4m3: 3 mantissa bits


def test_compressed_tensors_compresses_to_our_tensors():
    """Handing compressed-tensors our scale, its compressor produces exactly our packed tensors."""
    from compressed_tensors.compressors import BaseCompressor
    scheme = get_scheme("w4a16", group_size=64, symmetric=False)
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    qw = rtn_quantize(w, scheme.weights, torch.float32)
    ours = compress(qw, scheme.format)
    theirs = BaseCompressor.get_value_from_registry(scheme.format).compress(
        {"weight": w, "weight_scale": qw.scale, "weight_zero_point": qw.zero_point}, _ct_scheme(scheme))
    for k in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"):
        assert torch.equal(ours[k], theirs[k]), k


def test_bf16_scales_decompress_to_the_same_bf16_weights():
    from compressed_tensors.compressors import BaseCompressor
    scheme = get_scheme("w4a16")
    w = torch.randn(32, 256)
    qw = rtn_quantize(w, scheme.weights, torch.bfloat16)
    tensors = compress(qw, scheme.format)
    assert tensors["weight_scale"].dtype == torch.bfloat16
    theirs = BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(tensors), _ct_scheme(scheme))
    assert theirs["weight"].dtype == torch.bfloat16
    # the product of an int4 and a bf16 scale is exact in float32; bf16 rounds it once
    assert torch.equal(theirs["weight"], decompress(tensors, scheme.weights, scheme.format).to(torch.bfloat16))
