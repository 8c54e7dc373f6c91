"""Extraction on a tiny Llama: every stored row equals run_with_cache over its window alone.

Batches are right-padded to their longest window (batch 3, windows of 16 tokens, a long
document cut into many windows). Tolerance: max |store - reference| <= 1e-5 * (1 + max |reference|)
per hook and window (rounding errors scale with the tensor, not with each element).
The padding itself reaches no real row (the causal mask hides it: other pad tokens give
bit-identical rows); what differs is float32 rounding, because BLAS blocks a [B*T, d]
matmul differently from a [T, d] one (OpenBLAS here: under 1e-5 absolute on values near
6; with MLX's reference BLAS the rows came out bit-identical). The
statistics saved in the store equal numpy/scipy over the stored rows; the top-k equals a
brute-force sort; the files read with plain numpy and json.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
import textwrap
from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest
import scipy.stats

from mlx_engine.store.errors import StoreError
from mlx_engine.store.stats import brute_force_top

CONTEXT = 16
HOOKS = ["layers.1.residual", "blocks.0.attn.hook_q", {"layer_name": 2, "component": "mlp_post", "indices": [5, 0, 77]}, "embedding"]
HOOK_IDS = ["layers.1.residual", "layers.0.query", "layers.2.mlp_post", "embedding"]
TOLERANCE = 1e-5


def worst_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / (1 + max |expected|): the test's tolerance is 1e-5 on this."""
    return float(np.abs(got - expected).max() / (1 + np.abs(expected).max()))


def corpus_texts() -> list[str]:
    """Short lines, a one-character document, and one long document (many windows)."""
    lines = [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:24]
    return lines[:10] + ["x"] + [inspect.getsource(textwrap.dedent)] + lines[10:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store(llama_kit, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("stores") / "llama"
    return mlx_engine.extract(llama_kit, corpus, HOOKS, out, context_size=CONTEXT, batch_size=3, shard_tokens=150, top_k=5, progress=False)


def reference_rows(kit, tokens: list[int]) -> dict[str, np.ndarray]:
    """run_with_cache over one window, each hook as [T, width] (query heads flattened as the store does)."""
    cache = mlx_engine.run_with_cache(kit, tokens, HOOKS)
    out = {}
    for hook_id in HOOK_IDS:
        array = np.array(cache[hook_id].astype(mx.float32))
        out[hook_id] = array.transpose(1, 0, 2).reshape(len(tokens), -1) if array.ndim == 3 else array
    return out


def test_every_row_equals_run_with_cache_on_its_window(llama_kit, store) -> None:
    tokens = np.asarray(store.tokens())
    doc, pos = (np.asarray(a) for a in store.index())
    rows = {h: np.asarray(store.rows(h)) for h in HOOK_IDS}
    assert store.num_tokens == len(tokens) and store.complete and len(store.manifest["shards"]) > 3
    worst = 0.0
    checked = 0
    for number, text in enumerate(corpus_texts()):
        ids = mlx_engine.tokenize(llama_kit, text)
        where = np.nonzero(doc == number)[0]
        assert pos[where].tolist() == list(range(len(ids))) and tokens[where].tolist() == ids
        for start in range(0, len(ids), CONTEXT):
            window = ids[start : start + CONTEXT]
            expected = reference_rows(llama_kit, window)
            stored_rows = where[start : start + len(window)]
            for hook_id in HOOK_IDS:
                got = rows[hook_id][stored_rows]
                assert got.shape == expected[hook_id].shape, hook_id
                worst = max(worst, worst_error(got, expected[hook_id]))
            checked += 1
    assert checked > len(corpus_texts()) + 5  # the long document spans many windows
    assert worst <= TOLERANCE, worst
    print(f"max |store - run_with_cache| / (1 + max |run_with_cache|) over {checked} windows: {worst:g}")


def test_the_padding_reaches_no_real_row(llama_kit) -> None:
    """Real rows do not depend on the padding: other pad tokens give the same bits, in a batch of
    ragged windows; against the window run alone the rows differ by matmul rounding only."""
    from mlx_engine.store.recorder import BatchRecorder, storable

    hooks = storable(llama_kit.arch_info, llama_kit.resolve_hooks(HOOKS))
    short = np.array(mlx_engine.tokenize(llama_kit, corpus_texts()[3]), np.int32)
    other = np.array(mlx_engine.tokenize(llama_kit, corpus_texts()[11])[:40], np.int32)
    runs = []
    for pad_token, windows, pad_to in ((7, [short, other], None), (300, [short, other], None), (7, [short], None), (11, [short], 64)):
        recorder = BatchRecorder(llama_kit.hook_points, hooks, "float32", pad_token=pad_token)
        recorder.arm()
        try:
            runs.append(recorder.run(llama_kit.model, windows, pad_to=pad_to))
        finally:
            recorder.disarm()
    pad_a, pad_b, alone, padded_alone = runs
    for hook_id in HOOK_IDS:
        assert np.array_equal(pad_a[hook_id], pad_b[hook_id]), hook_id
        assert worst_error(pad_a[hook_id][: len(short)], alone[hook_id]) <= TOLERANCE, hook_id
        assert worst_error(padded_alone[hook_id], alone[hook_id]) <= TOLERANCE, hook_id
    assert not any(p.armed for p in llama_kit.hook_points.values())


def test_saved_statistics_equal_numpy_and_scipy_on_the_stored_rows(store) -> None:
    doc, pos = (np.asarray(a) for a in store.index())
    for hook_id in HOOK_IDS:
        x = np.asarray(store.rows(hook_id)).astype(np.float64)
        s = store.stats(hook_id)
        assert s.count == len(x)
        np.testing.assert_allclose(s.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.variance, x.var(axis=0), rtol=1e-10)
        np.testing.assert_allclose(s.skewness, scipy.stats.skew(x, axis=0, bias=True), rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(s.kurtosis, scipy.stats.kurtosis(x, axis=0, fisher=True, bias=True), rtol=1e-8, atol=1e-9)
        assert np.array_equal(s.minimum, x.min(axis=0)) and np.array_equal(s.maximum, x.max(axis=0))
        np.testing.assert_array_equal(s.frac_active, (x > 0).mean(axis=0))
        np.testing.assert_allclose(s.participation_ratio, np.abs(x).sum(0) ** 2 / (len(x) * (x**2).sum(0)), rtol=1e-10)
        values, docs, poss = brute_force_top(x, doc, pos, 5)
        assert np.array_equal(s.top_values, values) and np.array_equal(s.top_doc, docs) and np.array_equal(s.top_pos, poss)
    lines = (store.path / "sparsity.csv").read_text().splitlines()
    assert lines[0].startswith("hook_id,layer,component,width,tokens") and len(lines) == 1 + len(HOOK_IDS)
    summary = json.loads((store.path / "stats" / "stats.json").read_text())
    assert set(summary) == set(HOOK_IDS)


def test_top_examples_come_with_their_context(store) -> None:
    rows = np.asarray(store.rows("layers.2.mlp_post"))
    doc, pos = (np.asarray(a) for a in store.index())
    examples = store.top_examples("layers.2.mlp_post", 1, k=3, context=4)
    order = np.lexsort((pos, doc, -rows[:, 1].astype(np.float64)))[:3]
    assert [e["row"] for e in examples] == order.tolist()
    for e in examples:
        assert e["value"] == rows[e["row"], 1] == e["values"][e["maxValueTokenIndex"]] == e["maxValue"]
        assert (doc[e["row"]], pos[e["row"]]) == (e["doc"], e["pos"]) and len(e["tokens"]) == len(e["values"]) <= 9


def test_the_store_reads_without_this_package(store, llama_checkpoint: Path) -> None:
    """Plain json + np.memmap at the header's offsets, and the safetensors library, read the same rows."""
    from safetensors.numpy import load_file

    manifest = json.loads((store.path / "manifest.json").read_text())
    first = store.path / manifest["shards"][0]["file"]
    with open(first, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    info = header["layers.1.residual"]
    begin, _ = info["data_offsets"]
    assert (8 + length + begin) % 4 == 0  # aligned for float32
    mapped = np.memmap(first, dtype="<f4", mode="r", offset=8 + length + begin, shape=tuple(info["shape"]))
    assert np.array_equal(mapped, load_file(first)["layers.1.residual"])
    assert np.array_equal(mapped, store.rows("layers.1.residual")[: len(mapped)])
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update(name.encode() + b"\0" + (llama_checkpoint / name).read_bytes())
    assert manifest["model"]["checkpoint_sha256"] == digest.hexdigest()
    hooks = {h["hook_id"]: h for h in manifest["hooks"]}
    assert hooks["layers.0.query"]["width"] == 64 and hooks["layers.2.mlp_post"]["indices"] == [5, 0, 77]
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["num_tokens"] == hooks["embedding"]["shape"][0]
    with np.load(store.path / "stats" / "layers.1.residual.npz") as z:
        assert z["mean"].shape == (64,) and int(z["count"]) == manifest["num_tokens"]
    docs = [json.loads(line) for line in (store.path / "documents.jsonl").read_text().splitlines()]
    assert [d["text"] for d in docs] == corpus_texts() and docs[2]["source"] == "docs.jsonl:3"
    assert list(store.documents()) == docs


def test_batches_for_training_cover_every_row_once(store) -> None:
    rows = np.asarray(store.rows("layers.1.residual"))
    batches = list(store.iter_batches("layers.1.residual", 64, shuffle=True, seed=3))
    assert all(len(b) == 64 for b in batches[:-1])
    got = np.concatenate(batches)
    assert not np.array_equal(got, rows)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    assert np.array_equal(key(got), key(rows))
    again = np.concatenate(list(store.iter_batches("layers.1.residual", 64, shuffle=True, seed=3)))
    assert np.array_equal(again, got)
    assert np.array_equal(np.concatenate(list(store.iter_batches("layers.1.residual", 50, shuffle=False))), rows)


def test_to_dataset_holds_the_same_columns(store) -> None:
    ds = store.to_dataset()
    assert len(ds) == store.num_tokens
    assert ds["pos"][:5] == np.asarray(store.index()[1])[:5].tolist()
    np.testing.assert_array_equal(np.array(ds[7]["layers.2.mlp_post"], np.float32), store.rows("layers.2.mlp_post")[7])


def test_packed_rows_equal_a_run_over_each_packed_window(llama_kit, corpus: Path, tmp_path: Path) -> None:
    store = mlx_engine.extract(llama_kit, corpus, ["layers.1.residual"], tmp_path / "packed", context_size=CONTEXT,
                               batch_size=4, packed=True, progress=False)
    tokens, rows = np.asarray(store.tokens()), np.asarray(store.rows("layers.1.residual"))
    doc, pos = (np.asarray(a) for a in store.index())
    stream = np.concatenate([mlx_engine.tokenize(llama_kit, t) for t in corpus_texts()])
    assert tokens.tolist() == stream.tolist()
    for start in range(0, len(tokens), CONTEXT):
        cache = mlx_engine.run_with_cache(llama_kit, tokens[start : start + CONTEXT].tolist(), ["layers.1.residual"])
        assert worst_error(rows[start : start + CONTEXT], np.array(cache["layers.1.residual"])) <= TOLERANCE
    # No document mask: document 1 starts mid-window, so its rows see document 0 and differ from its own run.
    second = np.nonzero(doc == 1)[0]
    assert second[0] % CONTEXT != 0 and pos[second[0]] == 0
    alone = mlx_engine.run_with_cache(llama_kit, tokens[second].tolist()[: CONTEXT - second[0] % CONTEXT], ["layers.1.residual"])
    assert np.abs(np.array(alone["layers.1.residual"]) - rows[second[: len(alone.tokens)]]).max() > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_dtypes_store_the_rounded_float32_rows(llama_kit, store, corpus: Path, tmp_path: Path, dtype: str) -> None:
    narrow = mlx_engine.extract(llama_kit, corpus, ["layers.1.residual"], tmp_path / dtype, context_size=CONTEXT,
                                batch_size=3, dtype=dtype, progress=False)
    wide = np.asarray(store.rows("layers.1.residual"))
    expected = np.array(mx.array(wide).astype(getattr(mx, dtype)).astype(mx.float32))
    got = np.asarray(narrow.rows("layers.1.residual"))
    assert got.dtype == (np.float16 if dtype == "float16" else np.float32)  # numpy has no bfloat16: widened exactly
    assert np.array_equal(got.astype(np.float32), expected)
    assert narrow.manifest["hooks"][0]["dtype"] == dtype
    np.testing.assert_allclose(narrow.stats("layers.1.residual").mean, got.astype(np.float64).mean(axis=0), rtol=1e-10, atol=1e-12)


def test_hooks_without_fixed_width_rows_are_refused(llama_kit, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "refused"
    with pytest.raises(StoreError, match=r"attention_pattern.*no fixed-width row"):
        mlx_engine.extract(llama_kit, corpus, ["blocks.1.attn.hook_pattern"], out, progress=False)
    with pytest.raises(StoreError, match="reserved"):
        mlx_engine.extract(llama_kit, corpus, [{"layer_name": 0, "component": "residual", "hook_id": "tokens"}], out, progress=False)
    assert not out.exists()


def test_a_complete_store_is_returned_as_it_is(llama_kit, store, corpus: Path) -> None:
    before = (store.path / "manifest.json").read_bytes()
    again = mlx_engine.extract(llama_kit, corpus, HOOKS, store.path, context_size=CONTEXT, batch_size=3, shard_tokens=150,
                               top_k=5, progress=False)
    assert again.num_tokens == store.num_tokens and (store.path / "manifest.json").read_bytes() == before


def test_parallel_outside_a_distributed_job_is_the_one_process_run(llama_checkpoint: Path, store, corpus: Path,
                                                                   tmp_path: Path) -> None:
    """`parallel=` in a process that is not part of a job loads the whole model: the same store (rows bit for bit);
    an unknown mode is refused before any folder is made (the 2-rank runs: tests/test_store_model_parallel.py)."""
    got = mlx_engine.extract(llama_checkpoint, corpus, HOOKS, tmp_path / "tensor", context_size=CONTEXT, batch_size=3,
                             shard_tokens=150, top_k=5, progress=False, parallel="tensor")
    assert "model_parallel" not in got.manifest["settings"] and got.num_tokens == store.num_tokens
    for hook_id in HOOK_IDS:
        assert np.array_equal(np.asarray(got.rows(hook_id)), np.asarray(store.rows(hook_id))), hook_id
    with pytest.raises(ValueError, match="parallel must be one of 'tensor', 'pipeline'"):
        mlx_engine.extract(llama_checkpoint, corpus, HOOKS, tmp_path / "bogus", progress=False, parallel="bogus")
    assert not (tmp_path / "bogus").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's descriptors in /proc/self/fd")
def test_reading_every_shard_holds_a_bounded_number_of_files(llama_kit, corpus: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One map (one descriptor) per shard file, at most ShardMaps.KEEP held (8 here, 64 by default): a store of
    hundreds of shards and many hooks opens within macOS's default 256 descriptors (one np.memmap per tensor
    held shards x tensors, and a 1M-token benchmark store ran out of them)."""
    from mlx_engine.store.shards import ShardMaps

    monkeypatch.setattr(ShardMaps, "KEEP", 8)
    store = mlx_engine.extract(llama_kit, corpus, HOOKS, tmp_path / "many", context_size=CONTEXT, batch_size=3,
                               shard_tokens=4, top_k=5, progress=False)
    shards, tensors = len(store.manifest["shards"]), len(HOOKS) + 3
    assert shards > ShardMaps.KEEP

    def held() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    before = held()
    reopened = mlx_engine.ActivationStore.open(store.path)
    rows = {h: np.asarray(reopened.rows(h)) for h in HOOK_IDS}
    tokens, (doc, pos) = np.asarray(reopened.tokens()), (np.asarray(a) for a in reopened.index())
    assert sum(len(b) for b in reopened.iter_batches(HOOK_IDS[0], 7)) == reopened.num_tokens
    assert held() - before <= ShardMaps.KEEP < shards * tensors
    for h in HOOK_IDS:  # and the rows are the ones the first reader saw
        assert np.array_equal(rows[h], np.asarray(store.rows(h)))
    assert np.array_equal(tokens, np.asarray(store.tokens())) and len(doc) == len(pos) == store.num_tokens
