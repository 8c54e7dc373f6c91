"""Tokens to text: incremental detokenizing, end-of-sequence and stop strings.

The loop (loop.py) hands out token ids; this turns each into the UTF-8-complete text it
adds and decides where the generation finishes, so no marker of a stop string and no
half of a multi-byte character ever reaches a caller.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


class StopStringMatcher:
    """Holds back text that could be the start of a stop string, so none leaks."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """The text each generated token adds, and the finish reason once the generation ends."""

    def __init__(self, detokenizer: Any, eos_token_ids: set[int], stop_strings: Sequence[str], max_tokens: int) -> None:
        self.detokenizer = detokenizer
        self.eos = eos_token_ids
        self.stopper = StopStringMatcher(stop_strings)
        self.max_tokens = max_tokens

    def push(self, token: int, n: int) -> tuple[str, Optional[str]]:
        """(new text, finish reason or None) for the n-th generated token (0-based)."""
        last = n + 1 == self.max_tokens
        if token in self.eos:
            self.detokenizer.finalize()
            return self.stopper.push(self.detokenizer.last_segment)[0] + self.stopper.flush(), "stop"
        self.detokenizer.add_token(token)
        if last:
            self.detokenizer.finalize()
        text, hit = self.stopper.push(self.detokenizer.last_segment)
        if hit:
            return text, "stop"
        if last:
            return text + self.stopper.flush(), "length"
        return text, None
