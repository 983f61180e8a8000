"""`lowbit serve`: the OpenAI-compatible server on one engine, with uvicorn.

Under torchrun (`--tensor-parallel-size N`, `--expert-parallel`) rank 0 serves HTTP, schedules and samples, and
broadcasts each batch; the other ranks run the same forward on their shards. torchrun forwards SIGTERM to every
rank: rank 0 drains its requests, then releases the others, and every rank exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

from lowbit.server.reasoning import REASONING_PARSERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients put in `model` (default: the model's file or folder name)")
    p.add_argument("--api-key", default=os.environ.get("LOWBIT_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $LOWBIT_API_KEY, else no key)")
    p.add_argument("--max-model-len", type=int, default=4096, help="most tokens of prompt plus completion")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="most tokens in one prefill step")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks started by torchrun that split attention, dense layers and vocabulary")
    p.add_argument("--expert-parallel", action="store_true", help="routed experts partitioned across the ranks")
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="return <think>...</think> as reasoning_content")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="answer 429 while this many requests wait for a place in the batch")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="answer 413 to larger request bodies")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before aborting them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _served_name(args, model_path: str) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is not None:
        return args.model
    return os.path.splitext(os.path.basename(model_path))[0]


def run(args) -> int:
    import uvicorn

    from lowbit.config import EngineConfig
    from lowbit.engine.llm_engine import LLMEngine
    from lowbit.engine.parallel import is_first_rank, shutdown_parallel
    from lowbit.server.api import ServerSettings, build_app
    from lowbit.server.engine_loop import EngineLoop
    from lowbit.server.metrics import Metrics

    for name in ("port", "max_waiting", "max_body_bytes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(args.model, dtype=args.dtype, device=args.device, engine_config=EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_gb=args.kv_cache_memory_gb,
        tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel,
        enforce_eager=args.enforce_eager))
    if not is_first_rank():
        # torchrun forwards SIGTERM and SIGINT to every rank: rank 0 drains its requests, then releases this one
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.follow()
        shutdown_parallel()
        return 0
    engine.lead()
    settings = ServerSettings(model_name=_served_name(args, engine.model_path), api_key=args.api_key or None,
                              max_body_bytes=args.max_body_bytes, reasoning_parser=args.reasoning_parser)
    metrics = Metrics(settings.model_name)
    engine_loop = EngineLoop(engine, metrics, max_waiting=args.max_waiting)
    app = build_app(engine_loop, settings, metrics)

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # requests on open connections get 503 from now on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; a graceful stop is a normal exit
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"lowbit serve: {settings.model_name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        _DrainingServer(config).run()
    finally:
        engine_loop.shutdown()
        engine.release_followers()
        shutdown_parallel()
    return 0
