"""The one-launch MoE router against the torch router (models/deepseek.py Gate) on the same logits: the same experts,
the same weights to float32 rounding; on the CPU in Triton's interpreter."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.router import route  # noqa: E402
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
