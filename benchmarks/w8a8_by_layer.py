"""Which layers' int8 per-token activations cost w8a8 its accuracy on the default model (issue #3): the w8a8 checkpoint
of benchmarks/w8a8_act_groups.py (GPTQ + rotate) evaluated on the float32 reference path with one kind of layer's
inputs left in float, and with down_proj's inputs quantized after an online rotation (a random orthogonal matrix, as
QuaRot's online Hadamard: y = (W Q)(Q^T x), only Q^T x quantized) or in groups of 128 features.

    python benchmarks/w8a8_by_layer.py [--workdir /tmp/w8a8-groups] [--max-tokens 2048]
Writes benchmarks/results/w8a8-by-layer-cpu-<date>.md. An experiment on the reference path: no kernel takes a rotation.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.eval.runner import evaluate  # noqa: E402
from lowbit.layers.linear import LinearBase  # noqa: E402
from lowbit.quant import methods  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PER_TOKEN = methods.fake_quant_int8_per_token


def orthogonal(n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotated_per_token(x: torch.Tensor, q: dict = {}) -> torch.Tensor:  # noqa: B006 - a cache of one matrix per width
    n = x.shape[-1]
    if n not in q:
        q[n] = orthogonal(n)
    return (PER_TOKEN(x.float() @ q[n]) @ q[n].t()).to(x.dtype)


def per_token_group(g: int):
    def fake_quant(x: torch.Tensor) -> torch.Tensor:
        T, n = x.shape
        xf = F.pad(x.float(), (0, -n % g)).view(T, -1, g)
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
        return (torch.round(xf / s).clamp(-128, 127) * s).view(T, -1)[:, :n].to(x.dtype)
    return fake_quant


VARIANTS = [  # label, layer-name suffix, what its inputs go through (None: float)
    ("every input per token (the scheme)", "", PER_TOKEN),
    ("down_proj inputs in float", "down_proj", None),
    ("o_proj inputs in float", "o_proj", None),
    ("qkv_proj inputs in float", "qkv_proj", None),
    ("gate_up_proj inputs in float", "gate_up_proj", None),
    ("down_proj inputs rotated online, then per token", "down_proj", rotated_per_token),
    ("down_proj inputs per token and 128 features", "down_proj", per_token_group(128)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/w8a8-groups")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    ckpt = os.path.join(args.workdir, "w8a8-gptq-rotate")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--scheme", "w8a8", "--algo", "gptq", "--rotate",
                        "--output", ckpt, "--quiet"], check=True)
    forward, current = LinearBase.forward, {"name": ""}

    def named_forward(self, x):  # the quant method's activation fake-quantizer sees which layer it serves
        current["name"] = self.prefix
        return forward(self, x)
    rows = []
    LinearBase.forward = named_forward
    try:
        for label, suffix, special in VARIANTS:
            def fake_quant(x, suffix=suffix, special=special):
                if suffix and current["name"].endswith(suffix):
                    return x if special is None else special(x)
                return PER_TOKEN(x)
            methods.fake_quant_int8_per_token = fake_quant
            report = evaluate([ckpt], reference="default", max_tokens=args.max_tokens, dtype="float32", device="cpu",
                              log=lambda *a: None)
            r = report["results"][0]
            rows.append((label, r["kld_mean"], r["top1_agreement"]))
            print(f"{label}: KLD {r['kld_mean']:.5f}, top-1 {100 * r['top1_agreement']:.1f}%", flush=True)
    finally:
        methods.fake_quant_int8_per_token, LinearBase.forward = PER_TOKEN, forward
    date = datetime.date.today().isoformat()
    lines = [f"# w8a8's activation error by layer: the default model, CPU, {date}", "",
             "`python benchmarks/w8a8_by_layer.py`: the checkpoint of `lowbit quantize --scheme w8a8 --algo gptq "
             f"--rotate`, {report['tokens']} tokens of the GPL-3 text, reference the default GGUF in float32. Q8_0 of "
             "the same weights measured 0.00153 on 4,096 tokens (weights only) and 0.00396 with its activations in "
             "Q8_0 too (`w8a8-act-groups-cpu-2026-11-23.md`).", "",
             "| activations | mean KLD | top-1 |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {kld:.5f} | {100 * top1:.1f}% |" for label, kld, top1 in rows]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"w8a8-by-layer-cpu-{date}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(path)


if __name__ == "__main__":
    main()
