"""GPTQ: exact where the answer is known, and better than rounding where it should be."""
import pytest
import torch

from lowbit.quant.formats import dequantize
from lowbit.quant.gptq import gptq_quantize, hessian
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.schemes import get_scheme


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    scales = torch.rand(d, generator=g) * 3 + 0.1  # uneven channel magnitudes, as in real activations
    return (torch.randn(n, d, generator=g) @ mix) * scales


def test_hessian_is_two_over_n_xtx():
    x = torch.randn(50, 8, dtype=torch.float64)
    assert torch.allclose(hessian(x).double(), 2 / 50 * x.t() @ x, atol=1e-5)


@pytest.mark.parametrize("name,opts", [("w4a16", {"group_size": 32}), ("w8a8", {}),
                                       ("w4a16", {"group_size": 32, "symmetric": False}), ("fp8-block", {})])
def test_uncorrelated_inputs_give_round_to_nearest(name, opts):
    """With H diagonal there is no error to spread: GPTQ must round exactly as RTN does."""
    args = get_scheme(name, **opts).weights
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    h = torch.diag(torch.rand(256) + 0.5)
    g, r = gptq_quantize(w, h, args, torch.float32), rtn_quantize(w, args, torch.float32)
    assert torch.equal(g.values.float(), r.values.float()) and torch.equal(g.scale, r.scale)


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_well_below_rtn(actorder, symmetric):
    args = get_scheme("w4a16", group_size=64, symmetric=symmetric).weights
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.02
    x = correlated_inputs(2048, 256)
    y = x @ w.t()
    err = {}
    for algo in ("rtn", "gptq"):
        qw = rtn_quantize(w, args, torch.float32) if algo == "rtn" else gptq_quantize(
            w, hessian(x), args, torch.float32, actorder=actorder)
        err[algo] = ((x @ dequantize(qw).t() - y) ** 2).mean().item()
    assert err["gptq"] < (0.5 if actorder else 0.7) * err["rtn"], err


def test_act_order_keeps_contiguous_groups_and_helps():
    args = get_scheme("w4a16", group_size=64).weights
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02
    x = correlated_inputs(2048, 256, seed=3)
    qw = gptq_quantize(w, hessian(x), args, torch.float32, actorder=True)
    assert qw.scale.shape == (64, 4)  # groups are the original column ranges: no g_idx needed
    # every stored value decodes with its own group's scale: dequantize reproduces the weights GPTQ chose
    assert (dequantize(qw) - w).abs().max() < 0.02 * 5


def test_dead_inputs_and_damping():
    args = get_scheme("w4a16", group_size=32).weights
    x = torch.randn(10, 64)  # fewer samples than inputs: H is singular until damped
    x[:, 5] = 0
    stats = {}
    qw = gptq_quantize(torch.randn(16, 64), hessian(x), args, torch.float32, stats=stats)
    assert stats["damp"] >= 0.01
    assert (qw.values[:, 5] == 0).all()  # a column no input ever reaches is zeroed


def test_lazy_batch_size_does_not_change_the_result():
    """Blocks only batch the updates: any block size gives the same quantization (up to float rounding)."""
    args = get_scheme("w4a16", group_size=64).weights
    torch.manual_seed(4)
    w = torch.randn(32, 256) * 0.02
    x = correlated_inputs(1024, 256, seed=5)
    h = hessian(x)
    errs = [((x @ (dequantize(gptq_quantize(w, h, args, torch.float32, block_size=bs)) - w).t()) ** 2).mean().item()
            for bs in (32, 64, 128, 256)]
    assert max(errs) < 1.03 * min(errs), errs
