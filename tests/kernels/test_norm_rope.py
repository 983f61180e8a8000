"""RMSNorm and rotary kernels against float64 references, and against the torch layers they replace on CUDA.

On the CPU they run in Triton's interpreter in float32 and float16; on a GPU also in bfloat16."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from lowbit.kernels.norm_rope import rms_norm, rope  # noqa: E402
from lowbit.layers.norm import RMSNorm  # noqa: E402
from lowbit.layers.rotary import RotaryEmbedding  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# one rounding of the output: half an ulp of the dtype, relative to each value
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (7, 2048), (3, 1000)])
def test_rms_norm(dtype, rows, n):
    x = (torch.randn(rows, n, generator=gen(n)) * 3).to(dtype)
    w = (torch.rand(n, generator=gen(n + 1)) + 0.5).to(dtype)
    eps = 1e-6
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    out = rms_norm(x.to(DEV), w.to(DEV), eps)
    assert out.dtype == dtype and out.shape == x.shape
    # x / rms is rounded to the dtype before the weight multiplies it (as the HF models do), then the product: two
    # roundings, each at most half an ulp
    assert ((out.double().cpu() - ref).abs() <= 2 * ULP[dtype] * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (5, 2048)])
def test_add_rms_norm_equals_the_torch_layer(dtype, rows, n):
    """With a residual: the sum exactly as torch's add rounds it, and the norm of that sum as without one."""
    x = (torch.randn(rows, n, generator=gen(n)) * 3).to(dtype)
    r = (torch.randn(rows, n, generator=gen(n + 2)) * 3).to(dtype)
    w = (torch.rand(n, generator=gen(n + 1)) + 0.5).to(dtype)
    out, summed = rms_norm(x.to(DEV), w.to(DEV), 1e-6, residual=r.to(DEV))
    assert torch.equal(summed.cpu(), x + r)
    torch.testing.assert_close(out.cpu(), rms_norm(x + r, w, 1e-6) if DEV == "cpu" else
                               rms_norm((x + r).to(DEV), w.to(DEV), 1e-6).cpu(), rtol=0, atol=0)
    layer = RMSNorm(n, 1e-6)
    layer.weight.data = w
    ref_out, ref_sum = layer(x, r)  # the torch path (CPU, no kernels)
    assert torch.equal(ref_sum, summed.cpu())
    assert ((out.double().cpu() - ref_out.double()).abs() <= 2 * ULP[dtype] * ref_out.double().abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,residual", [(1, 64, False), (5, 2048, True), (3, 1000, True)])
def test_int8_rows_are_what_int8_per_token_gives_the_output(dtype, rows, n, residual):
    """int8_rows: the norm's output unchanged, and its int8 per-token codes and scales (attached to it, read back by
    int8_per_token without a launch) equal to those act_quant's own kernel computes from that output."""
    from lowbit.kernels import act_quant
    x = (torch.randn(rows, n, generator=gen(n)) * 3).to(dtype).to(DEV)
    w = (torch.rand(n, generator=gen(n + 1)) + 0.5).to(dtype).to(DEV)
    r = (torch.randn(rows, n, generator=gen(n + 2)) * 3).to(dtype).to(DEV) if residual else None
    plain = rms_norm(x, w, 1e-6, r)
    fused = rms_norm(x, w, 1e-6, r, int8_rows=True)
    if residual:
        assert torch.equal(plain[1], fused[1])
        plain, fused = plain[0], fused[0]
    assert torch.equal(plain, fused) and not hasattr(plain, "_int8_rows")
    q, s = act_quant.int8_per_token(fused)
    assert q is fused._int8_rows[0] and s is fused._int8_rows[1]  # the attached pair itself: no launch
    q_ref, s_ref = act_quant.int8_per_token(fused.clone())  # a copy carries nothing: quantized by its own kernel
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q64, s64 = act_quant.int8_per_token_ref(fused)
    assert torch.equal(q.cpu(), q64.cpu()) and torch.allclose(s.cpu(), s64.cpu(), rtol=1e-6)


def rope_ref(x, cos, sin, interleaved):
    xd, c, s = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    x1, x2 = (xd[..., 0::2], xd[..., 1::2]) if interleaved else xd.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,H,D", [(1, 16, 64), (5, 1, 64), (3, 4, 48), (2, 200, 64)])
def test_rope(dtype, interleaved, T, H, D):
    # x is a strided view, as q_pe is (the last rope features of each head's query)
    full = torch.randn(T, H, D + 32, generator=gen(T * H)).to(dtype)
    x = full[..., 32:]
    rot = RotaryEmbedding(D, 10000.0, interleaved=interleaved)
    cos, sin = rot.cos_sin(torch.arange(100, 100 + T), dtype)
    ref = rope_ref(x, cos, sin, interleaved)
    out = rope(x.to(DEV), cos.to(DEV), sin.to(DEV), interleaved)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err <= 2 * ULP[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="the layers take the kernels on CUDA only")
def test_layers_take_the_kernels_on_cuda(monkeypatch):
    """On CUDA the layers give what their torch forms give (LOWBIT_KERNELS=0), to the dtype's rounding."""
    x = torch.randn(9, 512, generator=gen(0)).to(torch.bfloat16).cuda()
    norm = RMSNorm(512).cuda().to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    rot = RotaryEmbedding(64, 10000.0, interleaved=True).cuda()
    q = torch.randn(9, 16, 64, generator=gen(1)).to(torch.bfloat16).cuda()
    pos = torch.arange(9, device="cuda")
    fused = norm(x), rot(pos, q, q[:, :1])
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    torch_forms = norm(x), rot(pos, q, q[:, :1])
    assert ((fused[0].float() - torch_forms[0].float()).abs() <= 2 ** -6 * torch_forms[0].float().abs() + 1e-3).all()
    for a, b in zip(fused[1], torch_forms[1]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
