"""An engine that replies with a script, one text piece per step: the server's wiring tested in-process, with
replies a 135M model would never write (DeepSeek-R1's <think> tags)."""
from __future__ import annotations

import collections
import threading
from types import SimpleNamespace

from lowbit.engine.llm_engine import StepOutput


class FakeTokenizer:
    eos_token = bos_token = pad_token = "<eos>"
    chat_template = "{{ messages }}"

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, **_):
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text, **_):
        return list(range(len(text.split())))


class FakeEngine:
    max_model_len = 1000

    def __init__(self, script: list[str]):
        self.script = script
        self.tokenizer = FakeTokenizer(script)
        self.model_config = SimpleNamespace(vocab_size=len(script))
        self._lock = threading.Lock()
        self._pending = collections.deque()
        self._running: dict[str, list] = {}  # request id -> [prompt length, tokens emitted, max_tokens]

    def encode(self, prompt):
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [0] * len(messages)

    def add_request(self, prompt, params, request_id):
        with self._lock:
            self._pending.append(("add", request_id, len(prompt), params.max_tokens))

    def abort_request(self, request_id):
        with self._lock:
            self._pending.append(("abort", request_id, 0, 0))

    def has_unfinished(self):
        return bool(self._pending or self._running)

    @property
    def num_running(self):
        return len(self._running)

    @property
    def num_waiting(self):
        return 0

    @property
    def kv_cache_usage(self):
        return 0.1 * len(self._running)

    def step(self):
        with self._lock:
            pending, self._pending = self._pending, collections.deque()
        outs = []
        for kind, rid, n_prompt, max_tokens in pending:
            if kind == "add":
                self._running[rid] = [n_prompt, 0, min(max_tokens, len(self.script))]
            elif self._running.pop(rid, None) is not None:
                outs.append(StepOutput(rid, [], "", True, "abort", 0, 0))
        for rid, state in list(self._running.items()):
            n_prompt, i, limit = state
            state[1] += 1
            done = state[1] >= limit
            if done:
                del self._running[rid]
            reason = ("stop" if state[1] == len(self.script) else "length") if done else None
            outs.append(StepOutput(rid, [i], self.script[i], done, reason, n_prompt, state[1]))
        return outs
