"""Which layers' int8 per-token activations cost w8a8 its accuracy on the default model (issue #3): the w8a8 checkpoint
of benchmarks/w8a8_act_groups.py (GPTQ + rotate) evaluated on the float32 reference path with one kind of layer's
inputs left in float, and with down_proj's inputs quantized after an online rotation (a random orthogonal matrix, as
QuaRot's online Hadamard: y = (W Q)(Q^T x), only Q^T x quantized) or in groups of 128 features.

    python benchmarks/w8a8_by_layer.py [--workdir /tmp/w8a8-groups] [--max-tokens 2048] [--online-hadamard B]
                                       [--per-layer [I ...]]
Writes benchmarks/results/w8a8-by-layer-cpu-<date>[-oh<B>].md; --online-hadamard B measures the checkpoint made with
it (the down_proj rows measure its turned inputs), --per-layer adds each decoder layer's inputs in float. An
experiment on the reference path: no kernel takes these variants.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from w8a8_act_groups import int8_per_token_group, w8a8_checkpoint, write_report  # noqa: E402

from lowbit.eval.runner import evaluate  # noqa: E402
from lowbit.layers.linear import LinearBase  # noqa: E402
from lowbit.quant import methods  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PER_TOKEN = methods.fake_quant_int8_per_token


@functools.cache
def orthogonal(n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotated_per_token(x: torch.Tensor) -> torch.Tensor:
    q = orthogonal(x.shape[-1])
    return (PER_TOKEN(x.float() @ q) @ q.t()).to(x.dtype)


VARIANTS = [  # label, layer-name suffix, what its inputs go through (None: float)
    ("every input per token (the scheme)", "", PER_TOKEN),
    ("every input in float (weights only)", ".", None),
    ("down_proj inputs in float", "down_proj", None),
    ("o_proj inputs in float", "o_proj", None),
    ("qkv_proj inputs in float", "qkv_proj", None),
    ("gate_up_proj inputs in float", "gate_up_proj", None),
]
DOWN_PROJ_VARIANTS = [  # without an online rotation of down_proj's inputs in the checkpoint
    ("down_proj inputs rotated online, then per token", "down_proj", rotated_per_token),
    ("down_proj inputs per token and 128 features", "down_proj", int8_per_token_group(128)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/w8a8-groups")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--online-hadamard", type=int, metavar="B",
                    help="the checkpoint takes --online-hadamard B (down_proj's inputs turned at run time)")
    ap.add_argument("--per-layer", type=int, nargs="*", default=None, metavar="I",
                    help="also each decoder layer's inputs in float, one at a time (only layers I ... if given)")
    ap.add_argument("--text", default=None, metavar="FILE",
                    help="the text scored (default: the GPL-3 text lowbit eval scores; a calibration text such as "
                         "lowbit/data/calib_apache2.txt ranks layers without looking at the evaluation's tokens)")
    ap.add_argument("--layers-only", action="store_true", help="with --per-layer: only the per-layer rows")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    ckpt, recipe = w8a8_checkpoint(args.workdir, online_hadamard=args.online_hadamard)
    variants = VARIANTS + ([] if args.online_hadamard else DOWN_PROJ_VARIANTS)
    if args.layers_only:
        variants = VARIANTS[:1]  # (the scheme's own row, what each layer's gain is read against)
    if args.per_layer is not None:
        with open(os.path.join(ckpt, "config.json")) as f:
            layers = args.per_layer or range(json.load(f)["num_hidden_layers"])
        variants += [(f"layer {i}'s inputs in float", f"model.layers.{i}.", None) for i in layers]
    forward, current = LinearBase.forward, {"name": ""}

    def named_forward(self, x):  # the quant method's activation fake-quantizer sees which layer it serves
        current["name"] = self.prefix
        return forward(self, x)
    rows = []
    date = datetime.date.today().isoformat()
    name = f"w8a8-by-layer-cpu-{date}" + (f"-oh{args.online_hadamard}" if args.online_hadamard else "") + (
        f"-{os.path.splitext(os.path.basename(args.text))[0]}" if args.text else "")
    text_label = f"`{args.text}`" if args.text else "the GPL-3 text"


    def save(tokens: int) -> None:  # after every row: a run stopped early keeps what it measured
        lines = [f"# w8a8's activation error by layer: the default model, CPU, {date}", "",
                 f"`python benchmarks/w8a8_by_layer.py {' '.join(sys.argv[1:])}`: the checkpoint of "
                 f"`lowbit quantize {' '.join(recipe)}`, {tokens} tokens of {text_label}, reference the default "
                 "GGUF in float32. Q8_0 of the same weights measured 0.00153 on 4,096 tokens (weights only) and "
                 "0.00396 with its activations in Q8_0 too (`w8a8-act-groups-cpu-2026-11-23.md`).", "",
                 "| activations | mean KLD | top-1 |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {kld:.5f} | {100 * top1:.1f}% |" for label, kld, top1 in rows]
        write_report(args.out, name + ".md", lines)
    LinearBase.forward = named_forward
    try:
        for label, suffix, special in variants:
            def fake_quant(x, suffix=suffix, special=special):
                layer = current["name"]
                if suffix and (layer.endswith(suffix) or suffix.endswith(".") and layer.startswith(suffix)
                               or suffix == "."):
                    return x if special is None else special(x)
                return PER_TOKEN(x)
            methods.fake_quant_int8_per_token = fake_quant
            report = evaluate([ckpt], reference="default", text_path=args.text, max_tokens=args.max_tokens,
                              dtype="float32", device="cpu", log=lambda *a: None)
            r = report["results"][0]
            rows.append((label, r["kld_mean"], r["top1_agreement"]))
            print(f"{label}: KLD {r['kld_mean']:.5f}, top-1 {100 * r['top1_agreement']:.1f}%", flush=True)
            save(report["tokens"])
    finally:
        methods.fake_quant_int8_per_token, LinearBase.forward = PER_TOKEN, forward

if __name__ == "__main__":
    main()
