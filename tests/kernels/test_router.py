"""The MoE router's two launches: its logits against a float64 reference, and the one-launch router against the torch
router (models/deepseek.py Gate) on the same logits: the same experts, the same weights to float32 rounding; on the
CPU in Triton's interpreter."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.router import route, router_logits, router_logits_ref  # noqa: E402
from lowbit.layers import moe as moe_layer  # noqa: E402
from lowbit.models.deepseek import Gate  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROUTERS = {  # name -> (experts, top_k, groups, groups kept, scoring, method, normalize, scaling)
    "deepseek-v3/r1": (256, 8, 8, 4, "sigmoid", "noaux_tc", True, 2.5),
    "deepseek-v2-lite": (64, 6, 1, 1, "softmax", "greedy", False, 1.0),
    "deepseek-v2": (160, 6, 8, 3, "softmax", "group_limited_greedy", False, 16.0),
    "small grouped": (12, 3, 4, 2, "sigmoid", "noaux_tc", True, 1.0),
}


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("shared", [0, 2])
def test_router_matches_the_torch_gate(name, T, shared):
    """shared: the shared experts' slots appended (experts E, E + 1 with weight 1), as the fused MoE takes them."""
    E, K, G, TG, scoring, method, norm, scaling = ROUTERS[name]
    cfg = SimpleNamespace(num_experts_per_tok=K, n_group=G, topk_group=TG, scoring_func=scoring, topk_method=method,
                          norm_topk_prob=norm, routed_scaling_factor=scaling, n_routed_experts=E, hidden_size=E)
    gate = Gate(cfg)
    gate.weight.data = torch.eye(E)  # the logits are the input
    g = torch.Generator().manual_seed(E * T)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.data = torch.rand(E, generator=g) * 0.1
    logits = torch.randn(T, E, generator=g) * 2
    want_w, want_ids = gate(logits, shared)
    assert want_ids.shape == (T, K + shared)
    assert torch.equal(want_ids[:, K:], torch.arange(E, E + shared).expand(T, shared))
    assert torch.equal(want_w[:, K:], torch.ones(T, shared))
    bias = gate.e_score_correction_bias
    got_w, got_ids = route(logits.to(DEV), K, G if G > 1 else 1, TG, scoring == "sigmoid",
                           None if bias is None else bias.to(DEV), norm and K > 1, scaling, shared)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
    assert torch.equal(got_ids.cpu(), want_ids)
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-6)


LOGITS_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("E", [8, 64])
@pytest.mark.parametrize("D", [64, 200, 2048])
@pytest.mark.parametrize("dtype", LOGITS_DTYPES)
@pytest.mark.parametrize("w_fp32", [False, True])
def test_router_logits_match_float64(T, E, D, dtype, w_fp32):
    """T = 17: a partial token block, through tl.dot where x and the weight share a 16-bit dtype; D = 200 ends in a
    partial chunk; x a view with a wider row stride; the weight in x's dtype (as loaded) or float32. Bound: float32
    accumulation over D (seen: 4e-7 on an H100's tensor cores, 2e-7 elsewhere)."""
    g = torch.Generator().manual_seed(T * E + D)
    x = torch.randn(T, D + 8, generator=g).to(DEV, dtype)[:, :D]  # [T, D], row stride D + 8
    w = (torch.randn(E, D, generator=g) / D ** 0.5).to(DEV, torch.float32 if w_fp32 else dtype)  # [E, D]
    got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    want = router_logits_ref(x, w)
    scale = router_logits_ref(x.abs(), w.abs())  # [T, E] sum |x| |w|
    err = ((got.double() - want).abs() / scale).max().item()
    assert err < 1e-6, err


def test_gate_takes_the_logits_kernel_for_decode_batches(monkeypatch):
    """LOWBIT_KERNELS=1: decode batches through router_logits (x and the weight in float16: up to 256 tokens), a
    prefill through the matrix library; the same experts and weights as the torch gate either way."""
    E, D = 16, 32
    cfg = SimpleNamespace(num_experts_per_tok=4, n_group=4, topk_group=2, scoring_func="sigmoid",
                          topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, n_routed_experts=E,
                          hidden_size=D)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    gate.weight.data = torch.randn(E, D, generator=g).half()  # the model dtype
    gate.e_score_correction_bias.data = torch.rand(E, generator=g) * 0.1
    gate.to(DEV)
    calls = []
    monkeypatch.setattr(moe_layer, "router_logits", lambda x, w: calls.append(x.shape[0]) or router_logits(x, w))
    for T in (3, 17, 257):
        x = torch.randn(T, D, generator=g).half().to(DEV)
        monkeypatch.setenv("LOWBIT_KERNELS", "0")
        want_w, want_ids = gate(x)
        monkeypatch.setenv("LOWBIT_KERNELS", "1")
        got_w, got_ids = gate(x)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert calls == [3, 17]
