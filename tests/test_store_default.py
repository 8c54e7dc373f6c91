"""End to end on the embedded default model (gpt-oss, 4-bit, sliding-window layers of 128)
over a folder of standard-library source files: every window of 160 tokens (so the
sliding window is crossed) equals run_with_cache on that window within
max |store - reference| <= 1e-5 * (1 + max |reference|) per hook and window (full windows
come out bit-identical; a short window padded in its batch differs by matmul rounding),
for the residual stream, the MoE router logits and per-head keys (flattened heads x head_dim).
"""

from __future__ import annotations

import inspect
import keyword
import shutil
import struct
import token
from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest

HOOKS = ["layers.1.residual", "layers.2.router", "blocks.0.attn.hook_k", {"layer_name": 3, "component": "mlp", "indices": [0, 255, 17]}]
HOOK_IDS = ["layers.1.residual", "layers.2.router", "layers.0.key", "layers.3.mlp"]
CONTEXT = 160


@pytest.fixture(scope="module")
def default_kit():
    return mlx_engine.load_model("default")


def test_default_model_store_equals_run_with_cache(default_kit, tmp_path: Path) -> None:
    folder = tmp_path / "stdlib"
    folder.mkdir()
    for module in (keyword, struct, token):
        shutil.copy(inspect.getsourcefile(module), folder / Path(inspect.getsourcefile(module)).name)
    store = mlx_engine.extract(default_kit, folder, HOOKS, tmp_path / "store", context_size=CONTEXT, batch_size=2,
                               max_tokens=600, shard_tokens=250, progress=False)
    assert store.complete and store.num_tokens == 600 and len(store.manifest["shards"]) == 2
    info = default_kit.arch_info
    widths = {h: store.hook_info(h)["width"] for h in HOOK_IDS}
    assert widths == {"layers.1.residual": info.d_model, "layers.2.router": info.n_experts,
                      "layers.0.key": info.n_kv_heads * info.head_dim, "layers.3.mlp": 3}
    documents = list(store.documents())
    assert [d["source"] for d in documents] == ["keyword.py", "struct.py", "token.py"]
    tokens = np.asarray(store.tokens())
    doc, pos = (np.asarray(a) for a in store.index())
    rows = {h: np.asarray(store.rows(h)) for h in HOOK_IDS}
    worst, windows = 0.0, 0
    for number, d in enumerate(documents):
        where = np.nonzero(doc == number)[0]
        ids = mlx_engine.tokenize(default_kit, d["text"])[: len(where)]
        assert tokens[where].tolist() == ids and pos[where].tolist() == list(range(len(ids)))
        for start in range(0, len(ids), CONTEXT):
            window = ids[start : start + CONTEXT]
            cache = mlx_engine.run_with_cache(default_kit, window, HOOKS)
            for hook_id in HOOK_IDS:
                want = np.array(cache[hook_id].astype(mx.float32))
                if want.ndim == 3:
                    want = want.transpose(1, 0, 2).reshape(len(window), -1)
                got = rows[hook_id][where[start : start + len(window)]]
                worst = max(worst, float(np.abs(got - want).max() / (1 + np.abs(want).max())))
            windows += 1
    assert windows == 5 and worst <= 1e-5, worst
    stats = store.stats("layers.2.router")
    x = rows["layers.2.router"].astype(np.float64)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    assert np.array_equal(stats.maximum, x.max(axis=0))
    assert (store.path / "sparsity.csv").read_text().count("\n") == 1 + len(HOOK_IDS)
