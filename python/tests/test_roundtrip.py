"""NumPy round trips: the package's calls against float64 references written in the tests."""

import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CPU,
    MirroredCache,
    check_routing,
    reference_attention,
    routed_positions,
    visible_positions,
)

import clsa


def test_version_is_the_projects():
    cmake = (Path(__file__).resolve().parents[2] / "CMakeLists.txt").read_text()
    project = re.search(r"project\(clsa VERSION ([0-9.]+)", cmake).group(1)
    assert clsa.__version__ == clsa.version() == project
    assert metadata.version("clsa") == project


def test_append_reaches_the_pool_in_place(rng):
    m = MirroredCache(page_size=8)
    a = m.add(rng, 5)
    b = m.add(rng, 11)
    layout = m.cache.layout()
    m.append(rng, a, 9)  # after layout(): the arrays are views of the pool, not copies
    assert m.cache.length(a) == 14 and m.cache.length(b) == 11
    for seq in (a, b):
        pages = m.cache.pages(seq)
        n = m.cache.length(seq)
        assert len(pages) == -(-n // 8)
        got_k = np.concatenate([layout.k[p] for p in pages])[:n]
        got_v = np.concatenate([layout.v[p] for p in pages])[:n]
        got_keys = np.concatenate([layout.index_keys[p] for p in pages])[:n]
        np.testing.assert_array_equal(got_k, m.k[seq])
        np.testing.assert_array_equal(got_v, m.v[seq])
        np.testing.assert_array_equal(got_keys, m.keys[seq])
    stats = m.cache.memory()
    assert stats.sequences == 2 and stats.tokens == 25
    assert stats.bytes_per_token == (2 * 2 * 64 + 64) * 4
    assert stats.per_layer_cache_bytes(16) == 25 * 2 * 2 * 64 * 4 * 16
    assert a in m.cache and m.cache.contains(b)
    m.release(a)
    assert a not in m.cache


@pytest.mark.parametrize("tokens", [1, 3])
def test_select_and_attention_match_float64(rng, tokens):
    m = MirroredCache(kv_heads=2, head_dim=64, index_dim=64)
    lengths = [150, 37, 90]
    seqs = [m.add(rng, n) for n in lengths]
    order = [seqs[0], None, seqs[1], seqs[2]]  # an empty slot in the middle
    batch = m.cache.batch(order)
    assert batch.lengths == [150, 0, 37, 90] and batch.max_length == 150 and len(batch) == 4

    config = clsa.IndexerConfig(num_heads=4, index_dim=64, top_k=24, sink_tokens=2, local_window=5, scale=0.5)
    indexer = clsa.CrossLayerIndexer(config, CPU)
    q_idx = rng.standard_normal((4, tokens, 4, 64)).astype(np.float32)
    weights = rng.random((4, tokens, 4)).astype(np.float32)
    routing = indexer.select(batch, q_idx, weights)
    assert routing.top_k == 24 and routing.num_sequences == 4 and routing.tokens == tokens
    check_routing(m, order, config, q_idx, weights, routing.positions, routing.counts)

    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=8, num_kv_heads=2, head_dim=64), CPU)
    q = rng.standard_normal((4, tokens, 8, 64)).astype(np.float32)
    lse = np.empty((4, tokens, 8), dtype=np.float32)
    out = attention.forward(batch, routing, q, lse=lse)
    want, want_lse = reference_attention(m, order, q, routed_positions(routing.positions, routing.counts))
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))  # the empty slot

    dense = clsa.DenseCrossAttention(clsa.AttentionConfig(num_q_heads=8, num_kv_heads=2, head_dim=64), CPU)
    dense_out = np.full_like(q, np.nan)
    assert dense.forward(batch, q, dense_out) is dense_out
    want_dense, _ = reference_attention(m, order, q, visible_positions(m, order, tokens))
    np.testing.assert_allclose(dense_out, want_dense, rtol=0, atol=2e-5)


def test_sparse_equals_dense_when_top_k_covers_the_context(rng):
    m = MirroredCache()
    order = [m.add(rng, 70), m.add(rng, 33)]
    batch = m.cache.batch(order)
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=4, index_dim=64, top_k=128), CPU)
    config = clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64, softmax_scale=0.1)
    q = rng.standard_normal((2, 2, 4, 64)).astype(np.float32)
    routing = indexer.select(
        batch, rng.standard_normal((2, 2, 4, 64)).astype(np.float32), np.ones((2, 2, 4), np.float32)
    )
    sparse = clsa.SparseCrossAttention(config, CPU).forward(batch, routing, q)
    dense = clsa.DenseCrossAttention(config, CPU).forward(batch, q)
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-6)
    want, _ = reference_attention(m, order, q, visible_positions(m, order, 2), softmax_scale=0.1)
    np.testing.assert_allclose(dense, want, rtol=0, atol=2e-5)


def test_select_into_caller_arrays_with_slots(rng):
    m = MirroredCache(page_size=16)
    order = [m.add(rng, 100), m.add(rng, 45)]
    batch = m.cache.batch(order)
    config = clsa.IndexerConfig(num_heads=4, index_dim=64, top_k=16, sink_tokens=1, local_window=3)
    indexer = clsa.CrossLayerIndexer(config, CPU)
    q_idx = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    weights = rng.random((2, 1, 4)).astype(np.float32)
    positions = np.full((2, 1, 16), 7, dtype=np.int32)
    counts = np.zeros((2, 1), dtype=np.int32)
    slots = np.zeros((2, 1, 16), dtype=np.int32)
    out = clsa.RoutingIndex(positions, counts, slots=slots)
    assert indexer.select(batch, q_idx, weights, out=out) is out
    assert out.positions is positions  # the caller's arrays, written in place
    check_routing(m, order, config, q_idx, weights, positions, counts)
    own = indexer.select(batch, q_idx, weights)
    np.testing.assert_array_equal(own.positions, positions)
    for b, seq in enumerate(order):
        pages = np.array(m.cache.pages(seq))
        routed = positions[b, 0, : counts[b, 0]]
        np.testing.assert_array_equal(slots[b, 0, : counts[b, 0]], pages[routed // 16] * 16 + routed % 16)
    # An index the caller built (no slots) gives the layers the same answer as the indexer's own.
    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU)
    q = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    by_hand = attention.forward(batch, clsa.RoutingIndex(positions.copy(), counts.copy()), q)
    np.testing.assert_array_equal(by_hand, attention.forward(batch, own, q))


def test_gather_routed_kv_gives_the_same_layers(rng):
    m = MirroredCache()
    order = [m.add(rng, 80), m.add(rng, 20)]
    batch = m.cache.batch(order)
    config = clsa.IndexerConfig(num_heads=4, index_dim=64, top_k=16, sink_tokens=1, local_window=2)
    plain = clsa.CrossLayerIndexer(config, CPU)
    gathering = clsa.CrossLayerIndexer(config, CPU)
    gathering.gather_routed_kv(m.config)
    assert gathering.gathers_routed_kv and not plain.gathers_routed_kv
    q_idx = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    weights = rng.random((2, 1, 4)).astype(np.float32)
    a, b = plain.select(batch, q_idx, weights), gathering.select(batch, q_idx, weights)
    assert a.kv is None and b.kv.shape == (2, 1, 2, 2, 16, 64)
    for row, seq in enumerate(order):
        count = b.counts[row, 0]
        routed = b.positions[row, 0, :count]
        np.testing.assert_array_equal(b.kv[row, 0, 0, :, :count], m.k[seq][routed].transpose(1, 0, 2))
        np.testing.assert_array_equal(b.kv[row, 0, 1, :, :count], m.v[seq][routed].transpose(1, 0, 2))
    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU)
    q = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    np.testing.assert_allclose(attention.forward(batch, b, q), attention.forward(batch, a, q), rtol=0, atol=1e-6)


def test_float16_cache(rng):
    m = MirroredCache(dtype=clsa.DType.f16)
    order = [m.add(rng, 60)]
    batch = m.cache.batch(order)
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=64), CPU)
    routing = indexer.select(
        batch, rng.standard_normal((1, 1, 2, 64)).astype(np.float16), np.ones((1, 1, 2), np.float16)
    )
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float16)
    out = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU).forward(
        batch, routing, q
    )
    assert out.dtype == np.float16
    want, _ = reference_attention(m, order, q, visible_positions(m, order, 1))
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=0, atol=2e-3)


def engine_pool(pages, page_size=16, kv_heads=2, head_dim=64, index_dim=64):
    """An engine's own pool: K and V interleaved per page ([page][2][token][head][dim]), as
    examples/embed_engine.cpp lays it out, and the indexer keys apart."""
    kv = np.zeros((pages, 2, page_size, kv_heads, head_dim), dtype=np.float32)
    keys = np.zeros((pages, page_size, index_dim), dtype=np.float32)
    return kv, keys, clsa.PagedCacheLayout(kv[:, 0], kv[:, 1], keys)


def test_wrap_engine_pool_and_page_tables(rng):
    kv, keys, pool = engine_pool(32)
    assert pool.num_pages == 32 and pool.page_size == 16 and pool.dtype == clsa.DType.f32
    config = clsa.CacheConfig(num_kv_heads=2, head_dim=64, index_dim=64, page_size=16, dtype=clsa.DType.f32)
    # The engine lets libclsa manage sequences and appends in its memory...
    cache = clsa.SharedKVCache.wrap(config, pool)
    assert cache.memory().pages_total == 32
    mirror = MirroredCache()
    mirror.cache = cache
    seqs = [mirror.add(rng, 40), mirror.add(rng, 17)]
    pages = [cache.pages(s) for s in seqs]
    np.testing.assert_array_equal(kv[pages[0][0], 0, 3], mirror.k[seqs[0]][3])  # written into the engine's array
    # ... or keeps its own FlashInfer-style tables and wraps them.
    indptr = np.array([0, len(pages[0]), len(pages[0]) + len(pages[1])], dtype=np.int32)
    indices = np.array(pages[0] + pages[1], dtype=np.int32)
    last = np.array([40 - 16 * (len(pages[0]) - 1), 17 - 16 * (len(pages[1]) - 1)], dtype=np.int32)
    wrapped = clsa.CacheBatch.wrap(pool, indptr, indices, last)
    assert wrapped.lengths == [40, 17]
    own = cache.batch(seqs)
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=8, local_window=2), CPU)
    q_idx = rng.standard_normal((2, 1, 2, 64)).astype(np.float32)
    weights = np.ones((2, 1, 2), np.float32)
    r1 = indexer.select(wrapped, q_idx, weights)
    p1, c1 = r1.positions.copy(), r1.counts.copy()
    r2 = indexer.select(own, q_idx, weights)
    np.testing.assert_array_equal(p1, r2.positions)
    np.testing.assert_array_equal(c1, r2.counts)
    # Refill the wrapped batch in place for one sequence (empty slots pad).
    refilled = clsa.CacheBatch.wrap(
        pool,
        np.array([0, len(pages[1]), len(pages[1])], dtype=np.int32),
        np.array(pages[1], dtype=np.int32),
        np.array([last[1], 0], dtype=np.int32),
        out=wrapped,
    )
    assert refilled is wrapped and wrapped.lengths == [17, 0]


def test_reserve_batch_refill_and_plans(rng):
    m = MirroredCache()
    seqs = [m.add(rng, n) for n in (30, 60, 10)]
    batch = m.cache.reserve_batch(4, 128)
    assert batch.fixed_capacity and batch.capacity == 4 and len(batch) == 0 and not batch.captured
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=32), CPU)
    indexer.reserve(4, 1, 128)
    assert indexer.workspace_bytes(4, 1, 128) > 0
    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU)
    workspace = np.zeros(attention.workspace_bytes(4, 1, 32) + 256, dtype=np.uint8)
    offset = (-workspace.ctypes.data) % 256
    attention.set_workspace(workspace[offset : offset + attention.workspace_bytes(4, 1, 32)], 4, 1, 32)
    for order in ([seqs[0]], [seqs[2], seqs[1], None], seqs):
        m.cache.refill(batch, order)
        assert batch.lengths[: len(order)] == [0 if s is None else m.cache.length(s) for s in order]
        b = len(order)
        routing = indexer.select(
            batch, rng.standard_normal((b, 1, 2, 64)).astype(np.float32), np.ones((b, 1, 2), np.float32)
        )
        q = rng.standard_normal((b, 1, 4, 64)).astype(np.float32)
        out = attention.forward(batch, routing, q)
        want, _ = reference_attention(m, order, q, routed_positions(routing.positions, routing.counts))
        np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)
    indexer.check_status()


def test_supports_and_backends():
    config = clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64)
    assert clsa.SparseCrossAttention.supports(config, backend=CPU)
    assert clsa.SparseCrossAttention.unsupported_reason(config, backend=CPU) == ""
    assert clsa.SparseCrossAttention.supports(config, clsa.DType.e4m3, CPU)
    assert clsa.CrossLayerIndexer.supports(clsa.IndexerConfig(num_heads=2, index_dim=64), clsa.DType.bf16, CPU)
    assert clsa.resolve_backend(clsa.Backend.cpu) == clsa.Backend.cpu
    if clsa.cuda_device_count() == 0:
        assert clsa.resolve_backend(clsa.Backend.automatic) == clsa.Backend.cpu
        assert not clsa.SparseCrossAttention.supports(config, backend=clsa.Backend.cuda)
        assert "cuda" in clsa.SparseCrossAttention.unsupported_reason(config, backend=clsa.Backend.cuda).lower()
    clsa.synchronize()
    assert clsa.dtype_size(clsa.DType.bf16) == 2
