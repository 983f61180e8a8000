"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.config import EngineConfig
from lowbit.engine.llm_engine import LLMEngine
from lowbit.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list = field(default_factory=list)


class LLM:
    """A model loaded for offline generation. model=None loads the embedded default (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
                 **engine_kwargs):
        self.engine = LLMEngine(model, dtype=dtype, device=device, engine_config=EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt together (continuous batching); outputs in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, RequestOutput] = {
            rid: RequestOutput(p if isinstance(p, str) else None, [], "", [], None)
            for rid, p in zip(ids, prompts)}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                r = results[out.request_id]
                r.token_ids += out.new_token_ids
                r.text += out.new_text
                r.logprobs += out.logprobs
                if out.finished:
                    r.finish_reason = out.finish_reason
        for rid, p in zip(ids, prompts):
            results[rid].prompt_token_ids = self.engine.encode(p)
        return [results[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None
             ) -> list[RequestOutput]:
        """Generate replies to conversations, each given as OpenAI-style messages, through the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.engine.apply_chat_template(c) for c in convs], params)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position, [len(token_ids), vocab] float32."""
        return self.engine.logits(token_ids)
