"""Token sampling with a random stream of the request's own.

mlx-lm's samplers draw from MLX's global random state, so two requests decoded in one
batch would share it and each one's tokens would depend on its batch mates. Here every
generation owns a key: each draw splits it as `mx.random.seed` + the global state do
(keep the first half, sample with the second), so a seeded request yields the same
tokens as mlx-lm's sampler with `mx.random.seed(seed)`, alone or batched.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class KeyedSampler:
    """make_sampler's chain (top_p, min_p, top_k, then temperature) over a private key."""

    def __init__(self, temp: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0, seed: Optional[int] = None) -> None:
        self.temp = temp
        self.top_p = top_p if 0 < top_p < 1 else 0.0
        self.min_p = min_p
        self.top_k = top_k
        if seed is None:  # an unseeded request still gets its own stream, drawn from the global one
            seed = int(mx.random.randint(0, 2**31 - 1).item()) if temp != 0 else 0
        self._key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        """The next token for logprobs [1, vocab] (shape [1])."""
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        if self.top_p:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, 1)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        self._key, draw = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1 / self.temp), key=draw)
