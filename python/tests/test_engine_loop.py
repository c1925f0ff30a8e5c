"""The engine contract from Python: one set of objects, planned once, serves hundreds of steps while
sequences join, grow and leave and the batch size changes every step; and no leak over 10,000 calls."""

import gc
import sys
import tracemalloc

import numpy as np
from conftest import CPU, MirroredCache, check_routing, reference_attention, routed_positions

import clsa

MAX_BATCH, MAX_TOKENS, MAX_LENGTH, TOP_K = 6, 2, 400, 32


def planned_objects():
    indexer_config = clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=TOP_K, sink_tokens=2, local_window=4)
    indexer = clsa.CrossLayerIndexer(indexer_config, CPU)
    indexer.reserve(MAX_BATCH, MAX_TOKENS, MAX_LENGTH)
    attention_config = clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64)
    sparse = clsa.SparseCrossAttention(attention_config, CPU)
    sparse.reserve(MAX_BATCH, MAX_TOKENS, TOP_K)
    dense = clsa.DenseCrossAttention(attention_config, CPU)
    dense.reserve(MAX_BATCH, MAX_TOKENS, MAX_LENGTH)
    return indexer_config, indexer, sparse, dense


def test_one_object_set_for_hundreds_of_steps_with_changing_batches(rng):
    m = MirroredCache(page_size=16, max_pages=MAX_BATCH * (MAX_LENGTH // 16 + 1))
    config, indexer, sparse, dense = planned_objects()
    batch = m.cache.reserve_batch(MAX_BATCH, MAX_LENGTH)
    live, budget = [], {}  # the live sequences and the length each leaves at
    sizes = set()
    layers = 3
    for step in range(300):
        # The scheduler: sequences leave at their budget, new ones join with a prompt.
        for seq in [s for s in live if m.cache.length(s) >= budget[s]]:
            live.remove(seq)
            m.release(seq)
        while len(live) < MAX_BATCH and rng.random() < 0.5:
            seq = m.add(rng, int(rng.integers(2, 60)))
            budget[seq] = int(rng.integers(m.cache.length(seq) + 1, MAX_LENGTH))
            live.append(seq)
        if not live:
            continue
        picked = [s for s in live if rng.random() < 0.8] or live[:1]
        tokens = 1 if step % 5 else 2
        for seq in picked:
            m.append(rng, seq, tokens)
        order = picked + [None] * int(rng.integers(0, MAX_BATCH - len(picked) + 1))  # padded bucket
        sizes.add(len(order))
        m.cache.refill(batch, order)
        b = len(order)
        q_idx = rng.standard_normal((b, tokens, 2, 64)).astype(np.float32)
        weights = rng.random((b, tokens, 2)).astype(np.float32)
        routing = indexer.select(batch, q_idx, weights)
        if step % 10 == 0:
            check_routing(m, order, config, q_idx, weights, routing.positions, routing.counts)
        routed = routed_positions(routing.positions, routing.counts)
        for layer in range(layers):
            q = rng.standard_normal((b, tokens, 4, 64)).astype(np.float32)
            out = sparse.forward(batch, routing, q)
            if layer == 0 and step % 3 == 0:
                want, _ = reference_attention(m, order, q, routed)
                np.testing.assert_allclose(out, want, rtol=0, atol=3e-5)
            if layer == 1 and step % 7 == 0:
                visible = [[np.arange(m.cache.length(s) - tokens + t + 1) if s else [] for t in range(tokens)]
                           for s in order]
                want, _ = reference_attention(m, order, q, visible)
                np.testing.assert_allclose(dense.forward(batch, q), want, rtol=0, atol=3e-5)
    indexer.check_status()
    dense.check_status()
    assert len(sizes) >= 4  # the batch size did change
    assert m.cache.memory().sequences == len(live)


def test_no_leak_over_ten_thousand_calls(rng):
    m = MirroredCache(page_size=16, max_pages=64)
    seqs = [m.add(rng, 100), m.add(rng, 60)]
    _, indexer, sparse, dense = planned_objects()
    batch = m.cache.reserve_batch(MAX_BATCH, MAX_LENGTH)
    q_idx = rng.standard_normal((2, 1, 2, 64)).astype(np.float32)
    weights = np.ones((2, 1, 2), np.float32)
    q = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    out = np.empty_like(q)
    positions = np.empty((2, 1, TOP_K), np.int32)
    counts = np.empty((2, 1), np.int32)
    caller = clsa.RoutingIndex(positions, counts)

    def calls(n):
        for i in range(n):
            m.cache.refill(batch, seqs if i % 2 else seqs[::-1])
            routing = indexer.select(batch, q_idx, weights)
            sparse.forward(batch, routing, q, out)
            indexer.select(batch, q_idx, weights, out=caller)
            sparse.forward(batch, caller, q, out)
            dense.forward(batch, q, out)
            try:
                m.cache.append(12345, q, q, q)  # an error path too
            except clsa.Error:
                pass

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    calls(500)  # warm up: plans, caches, interned strings
    gc.collect()
    refs = [sys.getrefcount(x) for x in (q, out, batch, indexer, caller, positions)]
    tracemalloc.start()
    rss_before = rss_bytes()
    before = tracemalloc.take_snapshot()
    calls(10_000 // 7 + 1)  # 7 calls a round: over 10,000 calls
    gc.collect()
    after = tracemalloc.take_snapshot()
    rss_after = rss_bytes()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, f"Python allocations grew by {grown} bytes over 10,000 calls"
    assert rss_after - rss_before < 8 * 1024 * 1024, f"RSS grew by {rss_after - rss_before} bytes"
    assert [sys.getrefcount(x) for x in (q, out, batch, indexer, caller, positions)] == refs
