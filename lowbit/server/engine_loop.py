"""One background thread runs the engine for every HTTP request at once (continuous batching across requests).

Handlers on the event loop hand requests to the thread through an inbox and get each step's outputs back on an
asyncio.Queue per HTTP request. Only this thread calls `LLMEngine.step` (and `logits`); the event loop never
blocks on the model.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from lowbit.sampling_params import SamplingParams
from lowbit.server.metrics import Metrics

logger = logging.getLogger("lowbit.server")


class QueueFullError(Exception):
    """The waiting queue holds --max-waiting requests already."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shutting down or crashed)."""


@dataclass
class _Tracked:
    """A request in flight: where its outputs go and when it arrived (for TTFT and latency)."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first_token: float | None = None


@dataclass
class _ScoreJob:
    token_ids: list[int]
    top_k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _deliver(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the event loop has closed: nobody is listening


def _put_all(items: list) -> None:
    """A step's outputs into their requests' queues, in one callback on the event loop (a callback each, and so a
    wake-up of the loop each, cost 64 wake-ups a step at 64 streams)."""
    for queue, out in items:
        queue.put_nowait(out)


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return  # the handler gave up (client gone)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineLoop:
    def __init__(self, engine, metrics: Metrics | None = None, max_waiting: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: dict[str, tuple[list[int], SamplingParams]] = {}  # not yet given to the engine
        self._aborts: list[str] = []
        self._scores: list[_ScoreJob] = []
        self._tracked: dict[str, _Tracked] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + len(self._adds)

    def check_capacity(self) -> None:
        """Raise QueueFullError when the waiting queue is at its limit."""
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"the server has {self.num_waiting} requests waiting (--max-waiting "
                                 f"{self.max_waiting}); retry later")

    def add(self, request_id: str, token_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> None:
        """Queue a request; its StepOutputs (or an exception) will be put on `queue`."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        tracked = _Tracked(asyncio.get_running_loop(), queue, time.monotonic())
        with self._lock:
            self._tracked[request_id] = tracked
            self._adds[request_id] = (token_ids, params)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (a no-op for one already finished)."""
        with self._lock:
            t = self._tracked.pop(request_id, None)
            if self._adds.pop(request_id, None) is None:
                self._aborts.append(request_id)
        self._wake.set()
        if t is not None and self.metrics:
            self.metrics.observe_finished("abort", None if t.first_token is None else t.first_token - t.arrival,
                                          time.monotonic() - t.arrival, 0)

    async def prompt_logprobs(self, token_ids: list[int], top_k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each prompt token after the first: (its logprob given the tokens before it, the top_k
        [(token_id, logprob)] there). Runs between steps when no request is running."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        job = _ScoreJob(token_ids, top_k, loop, loop.create_future())
        with self._lock:
            self._scores.append(job)
        self._wake.set()
        return await job.future

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is still in flight and stop the thread."""
        error = EngineDeadError("the server is shutting down")
        with self._lock:
            self._stopping = True
            tracked, self._tracked = self._tracked, {}
            self._aborts += [rid for rid in tracked if rid not in self._adds]
            self._adds.clear()
            jobs, self._scores = self._scores, []
        for t in tracked.values():
            _deliver(t.loop, t.queue.put_nowait, error)
        for job in jobs:
            _deliver(job.loop, _resolve, job.future, None, error)
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            self._wake.clear()
            stopping = self._take_inbox()
            if self._scores and not self.engine.has_unfinished():
                self._run_scores()
                continue  # the requests held back for it are admitted on the next pass
            if self.engine.has_unfinished():
                self._step()
            elif stopping:
                return
            else:
                self._wake.wait()

    def _take_inbox(self) -> bool:
        """Hand new requests and aborts to the engine; returns whether the loop is stopping."""
        with self._lock:
            aborts, self._aborts = self._aborts, []
            # a waiting score job needs an idle engine: hold new requests back until it has run
            adds = {} if self._scores else self._adds
            if adds:
                self._adds = {}
            stopping = self._stopping
        for rid in aborts:
            self.engine.abort_request(rid)
        for rid, (ids, params) in adds.items():
            try:
                self.engine.add_request(ids, params, rid)
            except ValueError as e:
                self._fail(rid, e)
        return stopping

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            logger.exception("engine step failed")
            with self._lock:
                failed = list(self._tracked)
            for rid in failed:
                self._fail(rid, e)
                self.engine.abort_request(rid)
            return
        now = time.monotonic()
        batch = 0
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up of each event loop per step
        for out in outputs:
            batch += bool(out.new_token_ids)
            with self._lock:
                t = self._tracked.pop(out.request_id, None) if out.finished else self._tracked.get(out.request_id)
            if t is None:
                continue  # aborted by its handler
            if out.new_token_ids and t.first_token is None:
                t.first_token = now
                if self.metrics:
                    self.metrics.prompt_tokens.inc(out.num_prompt_tokens)
            if self.metrics:
                self.metrics.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    ttft = None if t.first_token is None else t.first_token - t.arrival
                    self.metrics.observe_finished(out.finish_reason, ttft, now - t.arrival, out.num_output_tokens)
            deliveries.setdefault(t.loop, []).append((t.queue, out))
        for loop, items in deliveries.items():
            _deliver(loop, _put_all, items)
        if self.metrics:
            self.metrics.observe_step(self.engine.num_running, self.num_waiting, self.engine.kv_cache_usage, batch)

    def _run_scores(self) -> None:
        with self._lock:
            jobs, self._scores = self._scores, []
        for job in jobs:
            try:
                result = self._score(job.token_ids, job.top_k)
            except Exception as e:  # noqa: BLE001 - reported to the request that asked
                _deliver(job.loop, _resolve, job.future, None, e)
            else:
                _deliver(job.loop, _resolve, job.future, result)

    def _score(self, token_ids: list[int], top_k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        logprobs = torch.log_softmax(self.engine.logits(token_ids)[:-1], dim=-1)  # [L-1, V]
        nxt = torch.tensor(token_ids[1:], dtype=torch.long)  # [L-1]
        chosen = logprobs.gather(1, nxt[:, None])[:, 0].tolist()  # [L-1]
        if top_k > 0:
            vals, ids = logprobs.topk(top_k, dim=-1)  # [L-1, k]
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in chosen]
        return list(zip(chosen, tops))

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            t = self._tracked.pop(request_id, None)
        if t is not None:
            _deliver(t.loop, t.queue.put_nowait, error)
