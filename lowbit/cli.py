"""`lowbit` command line: plan, quantize, eval, serve, bench, generate, chat.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
dispatches, importing a verb's module when that verb runs so `lowbit --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# verb -> (module, one-line help)
VERBS = {
    "generate": ("lowbit.cli_generate", "generate text offline from a prompt"),
    "chat": ("lowbit.cli_generate", "chat interactively, streaming tokens as they come"),
    "plan": ("lowbit.plan", "size a deployment: weight and KV bytes, fewest GPUs, layout"),
    "quantize": ("lowbit.quant.cli", "quantize a checkpoint to a low-bit scheme (compressed-tensors)"),
    "eval": ("lowbit.eval.cli", "measure what quantization cost: perplexity, KL divergence, top-1 agreement"),
    "serve": ("lowbit.server.cli", "serve an OpenAI-compatible API"),
    "bench": ("lowbit.bench.cli", "benchmark an OpenAI-compatible server: TTFT, TPOT, throughput"),
}


class CLIError(Exception):
    """An error the CLI reports as one line, exiting non-zero."""


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module, help_) in VERBS.items():
        if not _available(module):
            continue
        p = sub.add_parser(verb, help=help_, description=help_)
        mod = importlib.import_module(module)
        adder = getattr(mod, f"add_{verb}_arguments", None) or mod.add_arguments
        adder(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args.verb}", None) or mod.run
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, OSError, RuntimeError) as e:
        print(f"lowbit {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
