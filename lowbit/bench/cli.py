"""`lowbit bench`: TTFT, TPOT, inter-token latency and throughput of any OpenAI-compatible server."""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys

import httpx

from lowbit.bench.client import ENDPOINTS, OpenAIClient, list_models
from lowbit.bench.datasets import random_requests, sharegpt_requests
from lowbit.bench.metrics import summarize
from lowbit.bench.report import format_summary, plot, write_json
from lowbit.bench.runner import run_load


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument("--model", help="the model name the server serves (default: the first in its /v1/models)")
    p.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    p.add_argument("--dataset", nargs="+", default=["random"], metavar="random|sharegpt FILE",
                   help="random prompts of exact token lengths (default), or `sharegpt FILE`")
    p.add_argument("--input-len", type=int, default=1024, help="random: mean prompt tokens (default 1024)")
    p.add_argument("--output-len", type=int, default=None,
                   help="mean tokens to generate (random default 128; sharegpt default: each reply's length)")
    p.add_argument("--input-stdev", type=float, default=0.0, help="random: stdev of prompt tokens (default 0)")
    p.add_argument("--output-stdev", type=float, default=0.0, help="random: stdev of output tokens (default 0)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson or gamma arrivals (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrivals: 1 Poisson, < 1 burstier, > 1 more even")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    p.add_argument("--slo-ttft", type=float, metavar="MS", help="goodput: TTFT objective in ms")
    p.add_argument("--slo-tpot", type=float, metavar="MS", help="goodput: TPOT objective in ms")
    p.add_argument("--result-json", metavar="FILE", help="write the summary and every request here")
    p.add_argument("--plot", metavar="FILE.png", help="write latency distributions and throughput over time here")
    p.add_argument("--tokenizer", help="tokenizer folder or GGUF for exact prompt lengths (default: --model when "
                                       "it is a path, else the embedded default model's)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=None, help="seconds one request may take (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tokenizer(args):
    from lowbit.tokenizer import load_tokenizer
    if args.tokenizer:
        path = args.tokenizer
    elif args.model and os.path.exists(args.model):
        path = args.model
    else:
        from lowbit.default_model import default_model_path
        path = default_model_path()
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer files there; pass --tokenizer PATH")
    return tok


def _requests(args, tokenizer):
    kind, *rest = args.dataset
    if kind == "random" and not rest:
        return random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len or 128,
                               args.input_stdev, args.output_stdev, args.seed)
    if kind == "sharegpt" and len(rest) == 1:
        return sharegpt_requests(rest[0], tokenizer, args.num_prompts, args.output_len, args.seed)
    raise ValueError(f"--dataset {' '.join(args.dataset)}: expected `random` or `sharegpt FILE`")


async def _model_name(args) -> str:
    async with httpx.AsyncClient(timeout=30.0) as http:
        models = await list_models(http, args.base_url, args.api_key)
    if args.model:
        return args.model
    if not models:
        raise ValueError(f"{args.base_url} lists no models; pass --model")
    return models[0]


def run(args: argparse.Namespace) -> int:
    if args.num_prompts <= 0:
        raise ValueError(f"--num-prompts must be > 0, got {args.num_prompts}")
    model = asyncio.run(_model_name(args))  # fails fast, in one line, when the server is not there
    requests = _requests(args, _tokenizer(args))
    client = OpenAIClient(args.base_url, model, args.endpoint, args.ignore_eos, args.api_key, args.temperature)
    progress = not args.no_progress and sys.stderr.isatty()
    records, duration = asyncio.run(run_load(client, requests, args.request_rate, args.burstiness,
                                             args.concurrency, args.seed, progress, args.timeout))
    summary = summarize(records, duration, args.slo_ttft, args.slo_tpot)
    title = f"lowbit bench: {model}"
    print(format_summary(summary, title))
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    config.update(model=model, request_rate=None if math.isinf(args.request_rate) else args.request_rate,
                  url=client.url)
    if args.result_json:
        write_json(args.result_json, config, summary, records)
    if args.plot:
        plot(args.plot, records, summary, title)
    return 0 if summary["completed"] else 1
