"""How long a request may be: the model's context window and the server's prompt limit.

A prompt plus its completion must fit the model's context (`max_position_embeddings`,
or GPT-2's `n_positions`), and a prompt must fit `--max-prompt-tokens`. The exact check
needs the token count, which only the engine thread knows after tokenizing; but a text
whose length alone rules it out is refused on the request thread, before it waits in the
queue or costs a tokenizer pass. That early check uses a sound lower bound: no token
covers more than `max_token_bytes` bytes of input, so a text of B bytes is at least
ceil(B / max_token_bytes) tokens. The bound is computed once per model at load time,
from the tokenizer's own description, and is switched off (None) for tokenizers whose
normalizer or pre-tokenizer can drop input or whose unknown token can cover a whole
word, where no such bound holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import APIError

# Normalizers that never shrink a text by more than this factor in UTF-8 bytes: Unicode
# normalization and lowercasing map a character to at least one byte (a 4-byte character
# at worst to 1), and composition joins at most 3 bytes per output byte (Hangul jamo).
_UNICODE_SHRINK = 4.0
_UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
# Where no sound bound holds, a text is still capped at this many bytes a token of the limit, so
# that tokenizing it stays bounded in time: real text averages 3 to 6 bytes a token.
UNBOUNDED_BYTES_PER_TOKEN = 64
# Pre-tokenizers that only split or map (never drop) the text.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation", "FixedLength"}


def context_length(config: dict[str, Any]) -> Optional[int]:
    """The model's context window in tokens, from its config (None when it states none)."""
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _normalizer_shrink(node: Optional[dict[str, Any]]) -> Optional[float]:
    """How many times fewer UTF-8 bytes the normalized text can have (None: unbounded)."""
    if node is None:
        return 1.0
    kind = node.get("type")
    if kind == "Sequence":
        factor = 1.0
        for child in node.get("normalizers", []):
            sub = _normalizer_shrink(child)
            if sub is None:
                return None
            factor *= sub
        return factor
    if kind == "Prepend":
        return 1.0
    if kind == "Replace":
        pattern, content = node.get("pattern", {}).get("String"), node.get("content", "")
        if pattern is None or not content:
            return None  # a regex, or a deletion
        return max(1.0, len(pattern.encode()) / len(content.encode()))
    if kind in _UNICODE_NORMALIZERS:
        return _UNICODE_SHRINK
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, NMT, unknown: may drop text


def _pre_tokenizer_keeps(node: Optional[dict[str, Any]]) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps(child) for child in node.get("pretokenizers", []))
    if kind not in _KEEPING_PRE_TOKENIZERS:
        return False  # Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit drop separators
    return str(node.get("behavior", "Isolated")).lower() != "removed"


def _byte_level(node: Optional[dict[str, Any]]) -> bool:
    if node is None:
        return False
    if node.get("type") == "Sequence":
        return any(_byte_level(child) for child in node.get("pretokenizers", []))
    return node.get("type") == "ByteLevel"


def max_input_bytes_per_token(tokenizer: Any) -> Optional[float]:
    """The most input bytes one token can stand for (None when no bound holds).

    Read from a fast tokenizer's JSON description: the longest vocabulary entry (in raw
    bytes: a byte-level entry's characters are one byte each, other entries count their
    UTF-8 bytes, an over-estimate for Metaspace and byte-fallback pieces), times what the
    normalizer can shrink the text by.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, TypeError, ValueError):
        return None
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind not in ("BPE", "Unigram"):
        return None  # WordPiece and WordLevel map a whole unknown word to one token
    if not model.get("byte_fallback") and (kind == "Unigram" or model.get("fuse_unk")):
        return None  # runs of unknown characters fuse into one token
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None  # such a token swallows any run of whitespace next to it
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _pre_tokenizer_keeps(spec.get("pre_tokenizer")):
        return None
    vocab = model.get("vocab") or {}
    pieces = vocab.keys() if isinstance(vocab, dict) else (entry[0] for entry in vocab)
    measure = len if _byte_level(spec.get("pre_tokenizer")) else (lambda piece: len(piece.encode()))
    longest = max((measure(piece) for piece in pieces), default=1)
    longest = max([longest, *(len(t.get("content", "").encode()) for t in added)])
    return max(longest, 1) * shrink


@dataclass(frozen=True)
class PromptLimits:
    """What bounds a request's length on one model: its context, the server limit, the byte bound."""

    context: Optional[int]  # the model's context window in tokens
    max_prompt_tokens: Optional[int]  # --max-prompt-tokens (None: no server limit)
    bytes_per_token: Optional[float]  # the most input bytes one token covers (None: no early check)

    @classmethod
    def for_model(cls, config: dict[str, Any], tokenizer: Any, max_prompt_tokens: int) -> "PromptLimits":
        return cls(context_length(config), max_prompt_tokens or None, max_input_bytes_per_token(tokenizer))

    def check(self, prompt_tokens: int, max_tokens: Optional[int], param: str, text_bytes: Optional[int] = None) -> None:
        """Raise a 400 `context_length_exceeded` unless the prompt, plus max_tokens when the
        request set it (else one token; 0 for a forward pass alone), fits. With `text_bytes`, `prompt_tokens` is the lower
        bound for a text of that many bytes, and the message says so."""
        what = "messages" if param == "messages" else "prompt"
        count = str(prompt_tokens) if text_bytes is None else f"at least {prompt_tokens}"
        why = "" if text_bytes is None else (
            f" ({text_bytes} bytes of text; no token of this model covers more than {self.bytes_per_token:g} bytes)"
        )
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise ContextLengthExceeded(
                f"This server accepts prompts of at most {self.max_prompt_tokens} tokens (--max-prompt-tokens). "
                f"However, your {what} resulted in {count} tokens{why}. Please reduce the length of the {what}.",
                param,
            )
        if self.context is None or prompt_tokens + (1 if max_tokens is None else max_tokens) <= self.context:
            return
        if not max_tokens:
            room = ", which leaves no room for a completion" if max_tokens is None else ""
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context} tokens. However, your {what} resulted in "
                f"{count} tokens{why}{room}. Please reduce the length of the {what}.",
                param,
            )
        total = prompt_tokens + max_tokens if text_bytes is None else f"at least {prompt_tokens + max_tokens}"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {self.context} tokens. However, you requested {total} tokens "
            f"({count} in the {what}{why}, {max_tokens} in the completion). Please reduce the length of the {what} "
            "or completion.",
            param,
        )

    def check_texts(self, texts: Sequence[str], max_tokens: Optional[int], param: str) -> None:
        """The early check on the request thread: refuse texts whose length alone cannot fit.

        Without a sound bytes-per-token bound the texts are capped in bytes instead
        (`UNBOUNDED_BYTES_PER_TOKEN` per token of the tighter limit), which keeps the
        tokenizer's work on the engine thread bounded all the same.
        """
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if self.bytes_per_token is not None:
            self.check(math.ceil(size / self.bytes_per_token), max_tokens, param, text_bytes=size)
            return
        limits = [n for n in (self.max_prompt_tokens, self.context) if n]
        if not limits or size <= min(limits) * UNBOUNDED_BYTES_PER_TOKEN:
            return
        what = "messages" if param == "messages" else "prompt"
        raise ContextLengthExceeded(
            f"This server tokenizes at most {min(limits) * UNBOUNDED_BYTES_PER_TOKEN} bytes of text for this model "
            f"({min(limits)} tokens at {UNBOUNDED_BYTES_PER_TOKEN} bytes each: its tokenizer sets no bound of its own). "
            f"However, your {what} has {size} bytes of text. Please reduce the length of the {what}.",
            param,
        )

    def completion_room(self, prompt_tokens: int, wanted: int) -> int:
        """max_tokens for a request that set none: the default, or what the context has left."""
        return wanted if self.context is None else max(1, min(wanted, self.context - prompt_tokens))


class ContextLengthExceeded(APIError):
    """OpenAI's answer to a prompt (plus completion) longer than the model or the server takes."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, status=400, param=param, code="context_length_exceeded")


def chat_texts(messages: Sequence[dict[str, str]]) -> list[str]:
    """The message texts every chat template renders whole: user messages.

    Templates may trim an assistant turn (reasoning removed) or drop a role they do not
    know, so only user content counts toward the lower bound.
    """
    return [m["content"] for m in messages if m.get("role") == "user"]
