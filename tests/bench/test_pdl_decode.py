"""benchmarks/pdl_decode.py's arithmetic on known graph timings: a MoE layer as the difference of two depths, its
ratio to the first mode and to bf16 in the same mode, and whether the greedy tokens agreed (the GPU measurement itself
runs on the device)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from pdl_decode import report  # noqa: E402


def timings(two: dict, four: dict, same: bool = True) -> dict:
    return {2: {m: {"graph_us": us, "spread_us": 0.5} for m, us in two.items()} | {"same_tokens": True},
            4: {m: {"graph_us": us, "spread_us": 0.5} for m, us in four.items()} | {"same_tokens": same}}


def test_report_takes_a_moe_layer_as_the_difference_of_two_depths(tmp_path):
    res = {"bf16": timings({0: 350.0, 3: 348.0}, {0: 570.0, 3: 548.0}),
           "w4a16": timings({0: 318.0, 3: 308.0}, {0: 458.0, 3: 440.0}, same=False)}
    path = report(res, "v2-lite", [2, 4], [0, 3], "Test GPU", str(tmp_path))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in open(path) if line.startswith("| bf16") or line.startswith("| w4a16")}
    # graph 2 layers, graph 4 layers, MoE layer, vs mode 0, vs bf16 in the same mode, greedy tokens
    assert rows[("bf16", "0")] == ["350.0", "570.0", "110.0", "1.00x", "1.00x", "yes"]
    assert rows[("bf16", "3")] == ["348.0", "548.0", "100.0", "1.10x", "1.00x", "yes"]
    assert rows[("w4a16", "0")] == ["318.0", "458.0", "70.0", "1.00x", "1.57x", "NO"]
    assert rows[("w4a16", "3")] == ["308.0", "440.0", "66.0", "1.06x", "1.52x", "NO"]
    assert os.path.exists(path[:-3] + ".json")
