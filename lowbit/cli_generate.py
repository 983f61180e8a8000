"""`lowbit generate` and `lowbit chat`: offline generation from the command line."""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks started by torchrun")
    p.add_argument("--expert-parallel", action="store_true", help="routed experts partitioned across the ranks")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.add_argument("prompt", help="the prompt")


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--system", default=None, help="a system message")


def _params(args):
    from lowbit import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)


def run_generate(args) -> int:
    from lowbit import LLM
    params = _params(args)
    from lowbit.engine.parallel import is_first_rank
    llm = LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
              expert_parallel=args.expert_parallel)
    if not args.no_chat_template and getattr(llm.tokenizer, "chat_template", None):
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    if is_first_rank():
        print(out.text)
    return 0


def run_chat(args) -> int:
    """A read-eval-print loop that streams each reply token by token. Under torchrun rank 0 reads the input and
    the other ranks follow its batches."""
    from lowbit.config import EngineConfig
    from lowbit.engine.llm_engine import LLMEngine
    from lowbit.engine.parallel import is_first_rank, shutdown_parallel
    params = _params(args)
    engine = LLMEngine(args.model, dtype=args.dtype, device=args.device,
                       engine_config=EngineConfig(tensor_parallel_size=args.tensor_parallel_size,
                                                  expert_parallel=args.expert_parallel))
    if not is_first_rank():
        engine.follow()
        shutdown_parallel()
        return 0
    engine.lead()
    try:
        _chat_loop(engine, params, args.system)
    finally:
        engine.release_followers()
        shutdown_parallel()
    return 0


def _chat_loop(engine, params, system: str | None) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        messages.append({"role": "user", "content": line})
        rid = engine.add_request(engine.apply_chat_template(messages), params)
        reply = []
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid and out.new_text:
                    reply.append(out.new_text)
                    print(out.new_text, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
