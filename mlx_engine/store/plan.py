"""From documents to batches of token windows: the deterministic order every run replays.

Per-document mode (the default): a document is tokenized alone (with the tokenizer's
BOS where it adds one) and cut into windows of `context_size` tokens; window w holds
positions [w*C, (w+1)*C) of its document, so a row's `pos` is its position in the
document and its activations are those of a run over that window alone. Windows are
batched in corpus order; a batch is right-padded by the recorder.

Packed mode (SAELens' style): the documents' token streams are concatenated and cut
into full windows of C tokens, with no mask between documents: a token attends to the
documents before it in its window, so its rows differ from a per-document run.

The stream is a pure function of (corpus, tokenizer, settings), so a resumed run
replays it and skips the batches already stored. Each batch names the documents first
read while it was formed, which is how documents.jsonl is written exactly once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .corpus import Document


@dataclass
class Window:
    """One model input row: tokens and, per token, its document and position in that document."""

    tokens: np.ndarray  # int32 [L]
    doc: np.ndarray  # int64 [L]
    pos: np.ndarray  # int32 [L]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Batch:
    """Windows run in one forward pass, and the documents read while forming it (number, document)."""

    index: int
    windows: list[Window]
    documents: list[tuple[int, Document]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(w) for w in self.windows)


def _document_windows(number: int, tokens: np.ndarray, context: int) -> Iterator[Window]:
    for start in range(0, len(tokens), context):
        piece = tokens[start : start + context]
        yield Window(piece, np.full(len(piece), number, np.int64), np.arange(start, start + len(piece), dtype=np.int32))


def _packed_windows(stream: Iterable[tuple[int, np.ndarray]], context: int) -> Iterator[Window]:
    """Full windows of `context` tokens over the concatenated documents; the last may be shorter."""
    parts: list[Window] = []
    filled = 0
    for number, tokens in stream:
        offset = 0
        while offset < len(tokens):
            take = min(context - filled, len(tokens) - offset)
            piece = tokens[offset : offset + take]
            parts.append(Window(piece, np.full(take, number, np.int64), np.arange(offset, offset + take, dtype=np.int32)))
            filled += take
            offset += take
            if filled == context:
                yield _join(parts)
                parts, filled = [], 0
    if parts:
        yield _join(parts)


def _join(parts: list[Window]) -> Window:
    return Window(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "doc", "pos")))


def plan_batches(
    documents: Iterable[Document],
    tokenize: Callable[[str], list[int]],
    *,
    context_size: int,
    batch_size: int,
    packed: bool = False,
    max_tokens: Optional[int] = None,
) -> Iterator[Batch]:
    """Batches of at most `batch_size` windows, `max_tokens` rows in all (None: the whole corpus)."""
    read: list[tuple[int, Document]] = []

    def token_stream() -> Iterator[tuple[int, np.ndarray]]:
        for number, doc in enumerate(documents):
            read.append((number, doc))
            yield number, np.asarray(tokenize(doc.text), dtype=np.int32)

    if packed:
        windows: Iterator[Window] = _packed_windows(token_stream(), context_size)
    else:
        windows = (w for number, tokens in token_stream() for w in _document_windows(number, tokens, context_size))

    pending: deque[Window] = deque()
    remaining = max_tokens
    index = 0
    exhausted = False
    while True:
        while not exhausted and len(pending) < batch_size:
            window = None if remaining is not None and remaining <= 0 else next(windows, None)
            if window is None:
                exhausted = True
                break
            if remaining is not None:
                if len(window) > remaining:
                    window = Window(window.tokens[:remaining], window.doc[:remaining], window.pos[:remaining])
                remaining -= len(window)
            if len(window):
                pending.append(window)
        if not pending and not read:
            return
        # A last batch may hold no windows: documents that tokenized to nothing still get written.
        chosen = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        batch = Batch(index, chosen, list(read))
        read.clear()
        yield batch
        index += 1
