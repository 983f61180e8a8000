"""benchmarks/layer_ratio.py's arithmetic on a known launch order: the decode graph's replay split by layer at each
layer's first RMSNorm, and the real-depth estimate from the parts (the GPU measurement itself runs on the device)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from layer_ratio import estimate  # noqa: E402
from profile_decode import by_layer  # noqa: E402


def r1_like_order(layer_us: list[float]) -> list[tuple[float, str, float]]:
    """A replay as R1's widths launch it: the embedding, then per layer three RMSNorms (input, q_a's, post-attention)
    among its projections, attention and MoE kernels; the final norm, the head and the argmax. Every kernel of layer
    i takes layer_us[i] / 10."""
    order = [(0.0, "indexSelectSmallIndex", 2.0)]
    names = ["_rms_norm_kernel", "gemm_q_a_kv_a", "_rms_norm_kernel", "gemm_q_b", "_prep_kernel",
             "_mla_decode_kernel", "_combine_kernel", "_out_kernel", "gemm_o", "_rms_norm_kernel"]
    for us in layer_us:
        order += [(0.0, name, us / len(names)) for name in names]
    order += [(0.0, "_rms_norm_kernel", 1.0), (0.0, "nvjet_head", 600.0), (0.0, "_chunk_max_kernel", 2.0)]
    return order


def test_by_layer_splits_at_each_layers_first_norm():
    parts = by_layer(r1_like_order([400.0, 300.0, 200.0]), 3)
    assert parts["before"] == pytest.approx(2.0)
    assert parts["layers"] == pytest.approx([400.0, 300.0, 200.0])
    assert parts["head"] == pytest.approx(603.0)


def test_by_layer_refuses_a_split_that_does_not_fit():
    """Two layers of three norms read as three layers: the norm count divides (7 = 3 x 2 + 1), but a layer without
    its attention decode gives it away; four layers: the count does not divide."""
    order = r1_like_order([400.0, 300.0])
    with pytest.raises(AssertionError, match="attention decodes"):
        by_layer(order, 3)
    with pytest.raises(AssertionError, match="RMSNorm launches"):
        by_layer(order, 4)


def test_estimate_scales_the_dense_and_moe_layers_to_the_real_depth():
    r = {"before": 2.0, "layers": [400.0, 300.0, 200.0], "head": 600.0, "dense_layers": 1}
    # the cut's one dense layer stands for R1's three, its two MoE layers' mean for the other 58
    assert estimate(r, 61, 3) == pytest.approx(2.0 + 3 * 400.0 + 58 * 250.0 + 600.0)
