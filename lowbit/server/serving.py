"""The generation endpoints: OpenAI requests in, engine requests out, and the engine's outputs back as one JSON
response or as server-sent events."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lowbit.sampling_params import SamplingParams
from lowbit.server.engine_loop import EngineLoop, QueueFullError
from lowbit.server.errors import APIError, bad_request, error_body
from lowbit.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatLogprobs, ChatResponseMessage, CompletionChoice,
                                    CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage,
                                    TokenLogprob, TopLogprob, Usage, _SamplingFields, random_id)
from lowbit.server.reasoning import REASONING_PARSERS

_DISCONNECT_POLL_S = 1.0


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token: (logprob, [(token_id, logprob), ...])
    finish_reason: str | None = None

    def add(self, out) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason = out.finish_reason


class _Submission:
    """The engine requests behind one HTTP request: n choices for each prompt, choice p * n + i being the i-th
    sample of prompt p, read back as (choice, output)."""

    def __init__(self, loop: EngineLoop, request_id: str, prompts: list[list[int]],
                 params: list[list[SamplingParams]], n: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice() for _ in range(len(prompts) * n)]
        self.index_of: dict[str, int] = {}
        for p, (ids, plist) in enumerate(zip(prompts, params)):
            for i, sp in enumerate(plist):
                rid = f"{request_id}-{p}-{i}"
                self.index_of[rid] = p * n + i
                loop.add(rid, ids, sp, self.queue)
        self.unfinished = set(self.index_of)

    def usage(self, num_prompt_tokens: int) -> Usage:
        return Usage.of(num_prompt_tokens, sum(len(c.token_ids) for c in self.choices))

    async def outputs(self, request: Request | None = None) -> AsyncIterator[tuple[int, object]]:
        """Outputs until every choice has finished, each also added to its choice. With `request`, a client that
        hangs up stops the wait (a streaming response is cancelled by the server instead)."""
        next_check = time.monotonic() + _DISCONNECT_POLL_S
        while self.unfinished:
            if request is None:
                out = await self.queue.get()
            else:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + _DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                try:
                    out = await asyncio.wait_for(self.queue.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
            if isinstance(out, BaseException):
                raise bad_request(str(out)) if isinstance(out, ValueError) else out
            if out.finished:
                self.unfinished.discard(out.request_id)
            c = self.index_of[out.request_id]
            self.choices[c].add(out)
            yield c, out

    async def collect(self, request: Request) -> list[_Choice]:
        """Every choice, whole (a response that is not streamed)."""
        try:
            async for _ in self.outputs(request):
                pass
        finally:
            self.abort()
        return self.choices

    def abort(self) -> None:
        """Abort the choices still running (the client left, or the response failed)."""
        for rid in self.unfinished:
            self.loop.abort(rid)
        self.unfinished.clear()


def _sse(payload) -> str:
    text = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {text}\n\n"


class Serving:
    def __init__(self, engine_loop: EngineLoop, model_name: str, reasoning_parser: str | None = None):
        self.loop = engine_loop
        self.engine = engine_loop.engine
        self.model_name = model_name
        self.reasoning = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ shared
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _max_tokens(self, num_prompt: int, requested: int | None) -> int:
        limit = self.engine.max_model_len
        max_tokens = requested if requested is not None else limit - num_prompt
        if num_prompt + max_tokens > limit or num_prompt >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                              f"completion). Please reduce the length of the prompt or completion.",
                              param="max_tokens", code="context_length_exceeded")
        return max_tokens

    @staticmethod
    def _params(req: _SamplingFields, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
        try:
            return [SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                   max_tokens=max_tokens, seed=None if req.seed is None else req.seed + i,
                                   stop=req.stop_list, stop_token_ids=list(req.stop_token_ids or []),
                                   ignore_eos=req.ignore_eos, logprobs=logprobs,
                                   min_tokens=min(req.min_tokens, max_tokens))
                    for i in range(req.n)]
        except ValueError as e:
            raise bad_request(str(e)) from None

    def _encode(self, prompt: str | list[int]) -> list[int]:
        try:
            return self.engine.encode(prompt)
        except ValueError as e:
            raise bad_request(str(e), param="prompt") from None

    def _submit(self, request_id: str, prompts: list[list[int]], params: list[list[SamplingParams]],
                n: int) -> _Submission:
        try:
            self.loop.check_capacity()
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full") from None
        return _Submission(self.loop, request_id, prompts, params, n)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return text

    def _stream(self, events: AsyncIterator[str], sub: _Submission | None) -> StreamingResponse:
        async def guarded():
            # Events whose outputs were already queued go out in one write: a stream that falls behind the engine
            # (many streams, one event loop) catches up in fewer sends, each of which costs the ASGI stack and a
            # socket write. SSE clients parse events, not writes.
            pending: list[str] = []
            try:
                async for event in events:
                    pending.append(event)
                    if sub is None or sub.queue.empty():
                        yield "".join(pending)
                        pending.clear()
            except APIError as e:
                pending.append(_sse(json.dumps(e.body())))
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
                pending.append(_sse(json.dumps(error_body(500, f"{type(e).__name__}: {e}"))))
            finally:
                if sub is not None:
                    sub.abort()
            yield "".join(pending) + _sse("[DONE]")
        return StreamingResponse(guarded(), media_type="text/event-stream")

    # ------------------------------------------------------------------ /v1/completions
    def _completion_logprobs(self, token_ids: list[int], entries: list, offset: int) -> CompletionLogprobs:
        """OpenAI's legacy logprobs; `entries[i]` is None (a prompt's first token) or (logprob, top)."""
        lp = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            text = self.token_text(tid)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            logprob, top = entry
            lp.token_logprobs.append(logprob)
            tops: dict[str, float] = {}
            for t, v in [*top, (tid, logprob)]:
                tops.setdefault(self.token_text(t), v)  # tokens that decode alike keep the best
            lp.top_logprobs.append(tops)
        return lp

    async def completion(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        prompts = [self._encode(p) for p in req.prompts()]
        max_tokens = [self._max_tokens(len(ids), req.max_tokens) for ids in prompts]
        want_lp = req.logprobs is not None
        params = [self._params(req, m, req.logprobs) if m > 0 else [] for m in max_tokens]
        prompt_lp: list[list | None] = [None] * len(prompts)
        if req.echo and want_lp:
            prompt_lp = [[None] + await self.loop.prompt_logprobs(ids, req.logprobs) for ids in prompts]
        prompt_text = [self.engine.tokenizer.decode(ids) if req.echo else "" for ids in prompts]
        request_id = random_id("cmpl")
        n = req.n
        sub = self._submit(request_id, prompts, params, n)
        for p in range(len(prompts)):
            if max_tokens[p] == 0:  # echo only: the prompt scored, nothing generated
                for i in range(n):
                    sub.choices[p * n + i].finish_reason = "length"
        num_prompt_tokens = sum(map(len, prompts))

        def lp_of(token_ids: list[int], entries: list, offset: int):
            return self._completion_logprobs(token_ids, entries, offset) if want_lp else None

        def chunk(c: int, text: str, logprobs, finish_reason) -> str:
            return _sse(CompletionResponse(id=request_id, model=self.model_name, choices=[
                CompletionChoice(index=c, text=text, logprobs=logprobs, finish_reason=finish_reason)]))

        if req.stream:
            async def events():
                if req.echo:
                    for c, ch in enumerate(sub.choices):
                        p = c // n
                        yield chunk(c, prompt_text[p], lp_of(prompts[p], prompt_lp[p], 0), ch.finish_reason)
                async for c, out in sub.outputs():
                    if out.new_text or out.finished or (want_lp and out.new_token_ids):
                        offset = len(prompt_text[c // n]) + len(sub.choices[c].text) - len(out.new_text)
                        yield chunk(c, out.new_text, lp_of(out.new_token_ids, out.logprobs, offset),
                                    out.finish_reason if out.finished else None)
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(CompletionResponse(id=request_id, model=self.model_name, choices=[],
                                                  usage=sub.usage(num_prompt_tokens)))
            return self._stream(events(), sub)

        result = []
        for c, ch in enumerate(await sub.collect(request)):
            p = c // n
            lp = None
            if want_lp:
                ids = (prompts[p] if req.echo else []) + ch.token_ids
                entries = (prompt_lp[p] if req.echo else []) + ch.logprobs
                lp = self._completion_logprobs(ids, entries, 0)
            result.append(CompletionChoice(index=c, text=prompt_text[p] + ch.text, logprobs=lp,
                                           finish_reason=ch.finish_reason))
        return JSONResponse(CompletionResponse(id=request_id, model=self.model_name, choices=result,
                                               usage=sub.usage(num_prompt_tokens)).model_dump())

    # ------------------------------------------------------------------ /v1/chat/completions
    def _chat_logprobs(self, token_ids: list[int], entries: list) -> ChatLogprobs:
        def item(tid: int, logprob: float) -> dict:
            text = self.token_text(tid)
            return dict(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
        return ChatLogprobs(content=[
            TokenLogprob(**item(tid, logprob), top_logprobs=[TopLogprob(**item(t, v)) for t, v in top])
            for tid, (logprob, top) in zip(token_ids, entries)])

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return self.engine.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (jinja raises its own)
            raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None

    async def chat(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        ids = self.chat_prompt(req)
        max_tokens = self._max_tokens(len(ids), req.requested_max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, logprobs)
        request_id = random_id("chatcmpl")
        sub = self._submit(request_id, [ids], [params], req.n)

        if req.stream:
            async def events():
                streams = [self.reasoning.streamer() if self.reasoning else None for _ in sub.choices]
                for c in range(req.n):
                    yield _sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=[
                        ChatChunkChoice(index=c, delta=DeltaMessage(role="assistant", content=""))]))
                async for c, out in sub.outputs():
                    reasoning, content = "", out.new_text
                    if streams[c] is not None:
                        reasoning, content = streams[c].feed(out.new_text)
                        if out.finished:
                            r, t = streams[c].finish()
                            reasoning, content = reasoning + r, content + t
                    lp = self._chat_logprobs(out.new_token_ids, out.logprobs) if logprobs is not None else None
                    if not (reasoning or content or out.finished or (lp and lp.content)):
                        continue
                    delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None)
                    yield _sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=[
                        ChatChunkChoice(index=c, delta=delta, logprobs=lp,
                                        finish_reason=out.finish_reason if out.finished else None)]))
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=[],
                                                   usage=sub.usage(len(ids))))
            return self._stream(events(), sub)

        result = []
        for c, ch in enumerate(await sub.collect(request)):
            if self.reasoning is not None:
                reasoning, content = self.reasoning.split(ch.text)
                message = ChatResponseMessage(content=content or None, reasoning_content=reasoning or None)
            else:
                message = ChatResponseMessage(content=ch.text)
            lp = self._chat_logprobs(ch.token_ids, ch.logprobs) if logprobs is not None else None
            result.append(ChatChoice(index=c, message=message, logprobs=lp, finish_reason=ch.finish_reason))
        return JSONResponse(ChatCompletionResponse(id=request_id, model=self.model_name, choices=result,
                                                   usage=sub.usage(len(ids))).model_dump())
