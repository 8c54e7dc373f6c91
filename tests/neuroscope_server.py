"""A real mlx-engine server on a free loopback port, serving the embedded default model, and the
tiny store and SAE folders the research endpoints read."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_engine.integrations.neuroscope.smalltalk_research_tests import SAE_SOURCE, STORE, STORE_HOOK
from mlx_engine.server import ServerConfig, create_app, make_server

__all__ = ["NON_ASCII_STORE", "SAE_SOURCE", "STORE", "STORE_HOOK", "research_roots", "running_server"]

# The SUnit research tests' fixtures (STORE at STORE_HOOK, SAE_SOURCE), and a copy of the store under
# an id that is not ASCII: the URL encoders' case.
NON_ASCII_STORE = "café →"


@contextmanager
def running_server(model: str = "default", **overrides: Any) -> Iterator[str]:
    """Serve `model` in a background thread; yields the base URL, stops the server after.

    `overrides` sets other ServerConfig fields (an API key, CORS origins, ...)."""
    config = ServerConfig(model=model, port=0, threads=4, **overrides)
    server = make_server(create_app(config), config)
    thread = threading.Thread(target=server.run, name="neuroscope-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=10)


def research_roots(base: Path) -> tuple[Path, Path]:
    """A store root and an SAE root under `base`: STORE (12 short sentences at STORE_HOOK, top 5 examples
    per neuron), its copy as NON_ASCII_STORE, and SAE_SOURCE, a random TopK SAE (d_sae 64, k 4) at STORE_HOOK.

    The SAE is random rather than trained: the tests attach, list and detach it, and read its
    features' shapes, which training would not change."""
    import numpy as np

    import mlx_engine
    from mlx_engine.sae.formats import save_sae
    from mlx_engine.sae.model import SAE, SAEConfig

    kit = mlx_engine.load_model("default")
    texts = [f"Sentence {i}: the cat sat on the mat while a dog ran past the old stone wall." for i in range(12)]
    stores, saes = base / "stores", base / "saes"
    mlx_engine.extract(kit, texts, [STORE_HOOK], stores / STORE, context_size=32, top_k=5, progress=False)
    shutil.copytree(stores / STORE, stores / NON_ASCII_STORE)
    d_model, d_sae = kit.arch_info.d_model, 64
    rng = np.random.default_rng(0)
    arrays = {
        "W_enc": rng.normal(0, d_model ** -0.5, (d_model, d_sae)).astype(np.float32),
        "W_dec": rng.normal(0, d_sae ** -0.5, (d_sae, d_model)).astype(np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_model, np.float32),
    }
    cfg = SAEConfig("topk", d_model, d_sae, k=4, hook_name="blocks.1.hook_resid_post")
    save_sae(SAE(cfg, arrays), saes / SAE_SOURCE)
    return stores, saes
