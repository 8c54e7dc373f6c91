"""Streaming parser for gpt-oss's Harmony output format.

A Harmony completion is a sequence of messages, each
`<|start|>{role}<|channel|>{channel}<|message|>{body}<|end|>` (the last one ends in
`<|return|>` or `<|call|>`). The chat template already writes `<|start|>assistant`, so
the model's own output begins inside a header. The `analysis` channel is the model's
reasoning and becomes `reasoning_content`; `final` (and `commentary`, or a message with
no channel) becomes the user-visible `content`.

The parse works on token ids, never on text: the structural markers are special tokens,
so a body that happens to contain the characters "<|channel|>" cannot confuse it, and
no marker or header text ever reaches the output. Bodies are detokenized incrementally
per message, holding back an incomplete UTF-8 sequence until the token that completes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping, Optional, Sequence

Decode = Callable[[Sequence[int]], str]

REASONING_CHANNELS = frozenset({"analysis"})
# Tokens of context kept before the undecoded tail, so a tokenizer whose decode depends
# on the preceding token (SentencePiece's leading space) still yields the right text.
_DECODE_CONTEXT = 4


class Route(str, Enum):
    """Where a generated token's text went."""

    CONTENT = "content"
    REASONING = "reasoning"
    STRUCTURE = "structure"  # a marker or header token: it produces no text


@dataclass(frozen=True)
class HarmonyTokens:
    """Ids of Harmony's structural special tokens in one tokenizer's vocabulary."""

    start: int
    message: int
    channel: int
    end: int
    return_: int
    call: Optional[int] = None
    constrain: Optional[int] = None

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int]) -> "HarmonyTokens":
        missing = [t for t in ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>") if t not in vocab]
        if missing:
            raise ValueError(f"The tokenizer has no Harmony token(s) {missing}; it is not a Harmony model.")
        return cls(
            start=vocab["<|start|>"],
            message=vocab["<|message|>"],
            channel=vocab["<|channel|>"],
            end=vocab["<|end|>"],
            return_=vocab["<|return|>"],
            call=vocab.get("<|call|>"),
            constrain=vocab.get("<|constrain|>"),
        )

    @property
    def message_enders(self) -> frozenset[int]:
        return frozenset(t for t in (self.end, self.return_, self.call) if t is not None)


@dataclass
class HarmonyDelta:
    """The text one token added to each output field."""

    content: str = ""
    reasoning: str = ""
    route: Route = Route.STRUCTURE

    def __add__(self, other: "HarmonyDelta") -> "HarmonyDelta":
        return HarmonyDelta(self.content + other.content, self.reasoning + other.reasoning, other.route)


class _State(str, Enum):
    HEADER = "header"  # after <|start|>: role, then optionally <|channel|> and the channel name
    MESSAGE = "message"  # after <|message|>: the body
    BETWEEN = "between"  # after <|end|>: waiting for the next <|start|>


@dataclass
class _IncrementalText:
    """Detokenizes a growing list of ids, handing out only complete characters."""

    decode: Decode
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix) :]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - _DECODE_CONTEXT)
        return delta


class HarmonyStreamParser:
    """Feed generated token ids one at a time; get each token's content/reasoning text.

    `in_header=True` (the default) matches a prompt that ends with `<|start|>assistant`.
    """

    def __init__(self, decode: Decode, tokens: HarmonyTokens, in_header: bool = True) -> None:
        self._decode = decode
        self._tokens = tokens
        self._state = _State.HEADER if in_header else _State.BETWEEN
        self._header_ids: list[int] = []
        self._channel_ids: Optional[list[int]] = None
        self._body: Optional[_IncrementalText] = None
        self._route = Route.CONTENT
        self.channel: Optional[str] = None

    def push(self, token: int) -> HarmonyDelta:
        t = self._tokens
        if token == t.start:
            delta = self._close_message()
            self._state, self._header_ids, self._channel_ids = _State.HEADER, [], None
            return delta
        if token in t.message_enders:
            delta = self._close_message()
            self._state = _State.BETWEEN
            return delta
        if token == t.message and self._state is _State.HEADER:
            self._open_message(self._parse_channel())
            return HarmonyDelta()
        if self._state is _State.HEADER:
            if token == t.channel:
                self._channel_ids = []
            elif token == t.constrain:
                pass  # `<|constrain|>json` follows the channel name; the name is its first word
            elif self._channel_ids is not None:
                self._channel_ids.append(token)
            else:
                self._header_ids.append(token)
            return HarmonyDelta()
        if token in (t.channel, t.message, t.constrain):
            # A marker where no header is open is malformed output; it is dropped, not shown.
            return HarmonyDelta()
        # Text outside any message (after <|end|>) is shown as an unlabelled message, not lost.
        body = self._body if self._body is not None else self._open_message(None)
        return self._emit(body.push(token))

    def finish(self) -> HarmonyDelta:
        """Hand out text still held back (an incomplete character at the very end)."""
        return self._close_message()

    def _parse_channel(self) -> Optional[str]:
        if self._channel_ids is None:
            return None
        words = self._decode(self._channel_ids).split()
        return words[0] if words else None

    def _open_message(self, channel: Optional[str]) -> _IncrementalText:
        self.channel = channel
        self._route = Route.REASONING if channel in REASONING_CHANNELS else Route.CONTENT
        self._body = _IncrementalText(self._decode)
        self._state = _State.MESSAGE
        return self._body

    def _close_message(self) -> HarmonyDelta:
        if self._body is None:
            return HarmonyDelta()
        text = self._body.flush()
        self._body = None
        delta = self._emit(text)
        delta.route = Route.STRUCTURE
        return delta

    def _emit(self, text: str) -> HarmonyDelta:
        if self._route is Route.REASONING:
            return HarmonyDelta(reasoning=text, route=Route.REASONING)
        return HarmonyDelta(content=text, route=Route.CONTENT)
