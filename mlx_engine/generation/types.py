"""What the generation loop hands out each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TokenLogprob:
    token: int
    logprob: float


@dataclass
class GenerationResult:
    """One generated token.

    `text` is the new, UTF-8 complete text since the previous result (it may be empty
    while a multi-byte character or a possible stop string is held back). On the last
    result `finish_reason` is "stop" (end-of-sequence token or stop string) or "length".
    """

    text: str
    token: int
    step: int
    logprob: float
    top_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
