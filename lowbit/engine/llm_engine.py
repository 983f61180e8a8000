"""The engine: a scheduler, a model runner, a sampler and a tokenizer, advanced one step at a time.

`add_request` and `abort_request` may be called from any thread (the server's event loop); they are queued and
applied at the start of the next `step`, which only the engine's own thread calls.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import torch

from lowbit.config import EngineConfig, resolve_model_path
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.parallel import broadcast_from_first, init_parallel
from lowbit.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from lowbit.engine.sampler import Sampler
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence
from lowbit.models.loader import Checkpoint
from lowbit.sampling_params import SamplingParams
from lowbit.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer


@dataclass
class StepOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list = field(default_factory=list)  # per new token: (logprob, [(token_id, logprob), ...]) or None


class _Request:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.seq = seq
        self.detok = detok
        self.text = ""  # emitted so far


class LLMEngine:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", device=None,
                 engine_config: EngineConfig | None = None):
        path = resolve_model_path(model)
        self.model_path = path
        ckpt = Checkpoint(path)
        self.model_config = ckpt.model_config()
        self.engine_config = engine_config or EngineConfig()
        init_parallel(self.engine_config.tensor_parallel_size, self.engine_config.expert_parallel)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.model_config, self.device)
        self.tokenizer = load_tokenizer(path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config.eos_token_id, path)
        self.runner = ModelRunner(ckpt, self.model_config, self.engine_config, self.dtype, self.device)
        # one sequence of max_model_len must fit the whole cache, or preemption could never make room for it
        max_len = min(self.engine_config.max_model_len, self.model_config.max_position_embeddings,
                      self.runner.num_blocks * self.engine_config.block_size)
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.engine_config.block_size)
        self.scheduler = Scheduler(self.block_manager, self.engine_config.max_num_seqs,
                                   self.engine_config.max_num_batched_tokens, max_len)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (thread-safe); its tokens come out of later `step` calls."""
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len and len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_model_len={self.max_model_len}")
        seq = Sequence(ids, params, request_id)
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None)
        with self._lock:
            if seq.request_id in self._requests:
                raise ValueError(f"request id {seq.request_id!r} is already running")
            self._requests[seq.request_id] = req
            self._pending.append(("add", req))
        return seq.request_id

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))

    def _apply_pending(self) -> list[StepOutput]:
        outs = []
        with self._lock:
            pending, self._pending = self._pending, collections.deque()
        for kind, arg in pending:
            if kind == "add":
                self.scheduler.add(arg.seq)
            else:
                req = self._requests.pop(arg, None)
                if req is not None:
                    self.scheduler.finish(req.seq, "abort")
                    self.sampler.forget(req.seq.seq_id)
                    outs.append(self._output(req, [], "", []))
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for k, _ in self._pending if k == "add")

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StepOutput]:
        """Run one scheduled batch; return what each affected request produced."""
        outputs = self._apply_pending()
        if not self.scheduler.has_unfinished():
            return outputs
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return outputs
        logits = self.runner.run(seqs, is_prefill)  # [B, V]
        samples = self.sampler(logits, [s.params for s in seqs], [s.seq_id for s in seqs])
        for sample, tok in zip(samples, broadcast_from_first([r.token_id for r in samples])):
            sample.token_id = tok
        self.scheduler.postprocess(seqs, [r.token_id for r in samples], self.eos_token_ids)
        for seq, sample in zip(seqs, samples):
            req = self._requests[seq.request_id]
            new_text = self._detokenize(req)
            lp = [] if sample.logprob is None else [(sample.logprob, sample.top_logprobs or [])]
            outputs.append(self._output(req, [sample.token_id], new_text, lp))
        return outputs

    def _detokenize(self, req: _Request) -> str:
        """The request's new text. A stop string finishes the request and is cut off; text that may be the start of
        a stop string is held back until the next token decides it."""
        seq = req.seq
        if req.detok is None:
            return ""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and (ids[-1] in self.eos_token_ids
                                                    or ids[-1] in seq.params.stop_token_ids):
            ids = ids[:-1]  # the stop token itself is not text
        req.detok.update(ids)
        full, emitted = req.detok.text, len(req.text)
        end = len(full)
        stops = seq.params.stop
        if stops:
            start = max(0, emitted - max(map(len, stops)) + 1)
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                end = min(hits)
                self.scheduler.finish(seq, "stop")
            elif not seq.is_finished:
                end -= max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        delta = full[emitted:max(end, emitted)]
        req.text += delta
        return delta

    def _output(self, req: _Request, new_ids: list[int], new_text: str, logprobs: list) -> StepOutput:
        seq = req.seq
        if seq.is_finished:
            self._requests.pop(seq.request_id, None)
            self.sampler.forget(seq.seq_id)
        return StepOutput(seq.request_id, new_ids, new_text, seq.is_finished, seq.finish_reason,
                          seq.num_prompt_tokens, seq.num_output_tokens, logprobs)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of `token_ids`, [len, vocab] float32 (on the CPU)."""
        ids = self.encode(token_ids)
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed max_model_len={self.max_model_len}")
        if self.scheduler.has_unfinished():
            raise RuntimeError("logits() needs an idle engine")
        seq = Sequence(ids, SamplingParams(max_tokens=1))
        if not self.block_manager.can_allocate(seq):
            raise ValueError(f"{len(ids)} tokens do not fit the KV cache")
        self.block_manager.allocate(seq)
        try:
            return self.runner.run([seq], is_prefill=True, all_logits=True).cpu()
        finally:
            self.block_manager.deallocate(seq)
