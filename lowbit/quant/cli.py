"""`lowbit quantize`: a checkpoint to W4A8 / W4A8-INT8 / W8A8 / W8A16 / W4A16 / FP8-block, in compressed-tensors."""
from __future__ import annotations

import argparse

from lowbit.quant.schemes import SCHEMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="source: a Hugging Face folder (bf16/fp16, or DeepSeek's FP8) or a "
                                                 ".gguf file (default: the embedded SmolLM2-135M)")
    which = p.add_mutually_exclusive_group(required=True)
    names = ", ".join(s for s in SCHEMES if s != "bf16")
    which.add_argument("--scheme", help=f"one scheme for every linear layer: {names} (lm_head and the MoE router "
                                        f"stay unquantized)")
    which.add_argument("--recipe", metavar="FILE", help="a JSON/YAML recipe mapping module patterns to schemes")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write (new or empty; a rerun of "
                                                                          "the same command resumes it)")
    p.add_argument("--algo", choices=["gptq", "rtn"], default="gptq",
                   help="gptq (default; calibrated, error-compensating) or rtn (round to nearest)")
    p.add_argument("--group-size", type=int, default=None, help="weight group size of --scheme (default 128 for "
                                                                 "int4; needed when 128 does not divide a layer)")
    p.add_argument("--asym", action="store_true", help="asymmetric int weights with zero points (w4a16, w8a16)")
    p.add_argument("--dynamic", action="store_true", help="w4a8: per-token dynamic FP8 activation scales instead "
                                                          "of calibrated static ones")
    p.add_argument("--act-group-size", type=int, default=None, metavar="32",
                   help="w8a8: one int8 activation scale per token and 32 features (llama.cpp Q8_0's block) instead "
                        "of one per token; lowbit runs it, vLLM's int8 path takes per-token scales only")
    p.add_argument("--actorder", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: visit columns by decreasing activation energy (default on; groups and the "
                        "checkpoint layout are unchanged)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of the Hessian's mean "
                                                            "diagonal (default 0.01)")
    p.add_argument("--smoothquant", type=_alpha, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength (0..1, 0.5 typical) for schemes quantizing activations, or "
                        "auto: searched for each layer's groups of linears by their int8 output error")
    p.add_argument("--rotate", action="store_true",
                   help="turn the residual stream (and each head's values) by Hadamard rotations folded into the "
                        "weights, as QuaRot does offline: fewer activation outliers, the same float model; unties "
                        "a tied lm_head (llama, qwen2, qwen3)")
    p.add_argument("--online-hadamard", type=int, nargs="?", const=128, default=None, metavar="B",
                   help="turn each dense (and shared-expert) down_proj's input by a B x B block Hadamard at run time, "
                        "its weight by the inverse offline (compressed-tensors' R4 transform, which vLLM runs): the "
                        "int8 activations lose their outliers; meant for w8a8 (B: a power of two, default 128)")
    p.add_argument("--calib", metavar="FILE", default=None, help="calibration text (default: a built-in set)")
    p.add_argument("--num-calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--parts", type=int, default=1, help="split the layers among N processes or machines")
    p.add_argument("--rank", type=int, default=0, help="which part this process makes (0..N-1)")
    p.add_argument("--merge", nargs="*", metavar="PART_DIR", default=None,
                   help="finish a --parts run: gather the parts (folders of other machines, if any) into --output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}") from None


def _recipe(args):
    from lowbit.quant.recipe import Recipe
    if args.recipe:
        if args.group_size is not None or args.asym or args.dynamic or args.act_group_size is not None:
            raise ValueError("--group-size/--asym/--dynamic/--act-group-size apply to --scheme; a recipe sets them "
                             "per group (options: {group_size, symmetric, dynamic, act_group_size})")
        return Recipe.load(args.recipe)
    return Recipe.from_scheme(args.scheme, group_size=args.group_size, symmetric=False if args.asym else None,
                              dynamic=True if args.dynamic else None, act_group_size=args.act_group_size)


def run(args: argparse.Namespace) -> int:
    from lowbit.config import resolve_model_path
    from lowbit.quant.layerwise import QuantOptions
    from lowbit.quant.pipeline import Job, quantize
    job = Job(source=resolve_model_path(args.model), output=args.output, recipe=_recipe(args),
              opts=QuantOptions(algo=args.algo, damp=args.damp, actorder=args.actorder,
                                smoothquant=args.smoothquant, rotate=args.rotate,
                                online_hadamard=args.online_hadamard),
              calib_file=args.calib, num_calib_tokens=args.num_calib_tokens, seq_len=args.seq_len,
              parts=args.parts, rank=args.rank, merge=args.merge)
    if args.smoothquant is not None and not any(
            s.input_activations for s in ([g.scheme for g in job.recipe.groups] + [job.recipe.default]) if s):
        raise ValueError("--smoothquant applies to schemes that quantize activations (w8a8, w4a8, w4a8-int8)")
    quantize(job, progress=not args.quiet)
    return 0
