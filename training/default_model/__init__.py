"""Train the small gpt-oss model that ships inside mlx-engine as its default model.

Run it as ``python -m training.default_model`` (see ``__main__``). The steps live in their
own modules: ``data`` (stdlib corpus, tokenizer, token streams), ``model`` (architecture and
optimiser setup), ``train`` (the loop, evaluation, samples, report) and ``package`` (the
4-bit MLX conversion committed at ``mlx_engine/default_model/``).
"""

from __future__ import annotations

import os
import time

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled sibling burn the
# core that sibling needs; measured here, a contended two-thread step took 3.3 s spinning and
# 1.9 s with passive waiting. It must be set before torch (and its OpenMP runtime) loads,
# which is why it is here: this runs before any module of the package can import torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def log(message: str) -> None:
    """Timestamped line on stdout, flushed so a backgrounded run's log can be followed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
