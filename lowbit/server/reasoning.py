"""Reasoning parsers: split a reply into `reasoning_content` and `content`, whole or delta by delta.

DeepSeek-R1 thinks inside `<think>...</think>` before it answers. Its chat template may already end the prompt
with `<think>`, so the reply often starts inside the reasoning with no opening tag: everything before `</think>` is
reasoning, and a reply with no `</think>` at all is reasoning cut short (vLLM and SGLang read it the same way).
"""
from __future__ import annotations


class DeepSeekR1ReasoningParser:
    start_tag = "<think>"
    end_tag = "</think>"

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole reply."""
        head, found, content = text.partition(self.end_tag)
        if not found:
            head, content = text, ""
        before, _, after = head.partition(self.start_tag)
        return before + after, content

    def streamer(self) -> "ReasoningStreamer":
        return ReasoningStreamer(self)


class ReasoningStreamer:
    """Feeds a reply's text deltas through a parser; returns the (reasoning, content) each delta adds.

    A tag can arrive split across deltas ("</th" + "ink>"), so text that may be the start of a tag is held back
    until the next delta (or `finish`) decides it."""

    def __init__(self, parser: DeepSeekR1ReasoningParser):
        self.parser = parser
        self.text = ""
        self.reasoning_sent = 0
        self.content_sent = 0

    def _held_back(self) -> int:
        if self.parser.end_tag in self.text:
            return 0  # past the reasoning: the rest is content, tags or not
        tags = (self.parser.start_tag, self.parser.end_tag)
        return max((k for t in tags for k in range(1, len(t)) if self.text.endswith(t[:k])), default=0)

    def _emit(self, upto: int) -> tuple[str, str]:
        reasoning, content = self.parser.split(self.text[:upto])
        out = reasoning[self.reasoning_sent:], content[self.content_sent:]
        self.reasoning_sent, self.content_sent = len(reasoning), len(content)
        return out

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> tuple[str, str]:
        """What was held back, once the reply has ended."""
        return self._emit(len(self.text))


REASONING_PARSERS = {"deepseek-r1": DeepSeekR1ReasoningParser}
