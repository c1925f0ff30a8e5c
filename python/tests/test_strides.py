"""Strided and non-contiguous arrays: honoured where the C++ API takes any outer strides, refused
(shape_mismatch) where it needs the innermost stride 1 or contiguity; never copied."""

import contextlib

import numpy as np
import pytest
from conftest import CPU, MirroredCache, reference_attention, routed_positions

import clsa

Code = clsa.ErrorCode


@contextlib.contextmanager
def refused(match):
    with pytest.raises(clsa.Error, match=match) as info:
        yield info
    assert info.value.code == Code.shape_mismatch


@pytest.fixture
def world(rng):
    m = MirroredCache()
    order = [m.add(rng, 50), m.add(rng, 21)]
    batch = m.cache.batch(order)
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=4, index_dim=64, top_k=12, local_window=2), CPU)
    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU)
    return m, order, batch, indexer, attention


def test_slices_of_fused_projections_are_honoured(rng, world):
    m, order, batch, indexer, attention = world
    # One fused [B, T, q_idx | q | weights] activation, as a model's projection writes it.
    fused = rng.standard_normal((2, 1, 4 * 64 + 4 * 64 + 4)).astype(np.float32)
    q_idx = fused[..., :256].reshape(2, 1, 4, 64)
    q = fused[..., 256:512].reshape(2, 1, 4, 64)
    weights = np.abs(fused[..., 512:])
    assert not q.flags.c_contiguous and q.strides[-1] == 4
    routing = indexer.select(batch, q_idx, weights)
    p, c = routing.positions.copy(), routing.counts.copy()
    contiguous = indexer.select(batch, np.ascontiguousarray(q_idx), np.ascontiguousarray(weights))
    np.testing.assert_array_equal(p, contiguous.positions)
    # An output that is a strided window of a larger buffer: only the window is written.
    buffer = np.full((2, 1, 6, 64), 7.0, dtype=np.float32)
    out = buffer[:, :, 1:5]
    assert attention.forward(batch, contiguous, q, out) is out
    np.testing.assert_array_equal(buffer[:, :, 0], 7.0)
    np.testing.assert_array_equal(buffer[:, :, 5], 7.0)
    want, _ = reference_attention(m, order, q, routed_positions(p, c))
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)


def test_strided_appends_are_honoured(rng):
    m = MirroredCache()
    seq = m.cache.add_sequence()
    wide = rng.standard_normal((5, 3, 64)).astype(np.float32)  # heads 0 and 2 of a 3-head tensor
    k = wide[:, ::2]
    v = rng.standard_normal((5, 2, 64)).astype(np.float32)
    keys = rng.standard_normal((5, 128)).astype(np.float32)[:, :64]
    m.cache.append(seq, k, v, keys)
    layout = m.cache.layout()
    page = m.cache.pages(seq)[0]
    np.testing.assert_array_equal(layout.k[page, :5], k)
    np.testing.assert_array_equal(layout.index_keys[page, :5], keys)


def test_innermost_stride_and_negative_strides_are_refused(rng, world):
    m, order, batch, indexer, attention = world
    seq = order[0]
    k = rng.standard_normal((3, 2, 128)).astype(np.float32)[:, :, ::2]
    v = rng.standard_normal((3, 2, 64)).astype(np.float32)
    keys = rng.standard_normal((3, 64)).astype(np.float32)
    with refused("innermost stride must be 1"):
        m.cache.append(seq, k, v, keys)
    with refused("stride"):
        m.cache.append(seq, v[::-1], v, keys)
    with refused("innermost stride must be 1"):
        m.cache.append(seq, np.asfortranarray(v), v, keys)
    assert m.cache.length(seq) == 50  # nothing was appended
    q = rng.standard_normal((2, 1, 4, 128)).astype(np.float32)
    routing = indexer.select(
        batch, rng.standard_normal((2, 1, 4, 64)).astype(np.float32), np.ones((2, 1, 4), np.float32)
    )
    out = np.zeros((2, 1, 4, 64), np.float32)
    with refused("q is"):
        attention.forward(batch, routing, q[..., ::2], out)
    assert not out.any()  # refused before anything was written


def test_routed_kv_block_must_be_contiguous(rng, world):
    m, order, batch, indexer, attention = world
    q_idx = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    weights = np.ones((2, 1, 4), np.float32)
    kv = np.zeros((2, 1, 2, 2, 12, 128), np.float32)[..., :64]
    out = clsa.RoutingIndex(np.zeros((2, 1, 12), np.int32), np.zeros((2, 1), np.int32), kv=kv)
    with refused("out.kv"):
        indexer.select(batch, q_idx, weights, out=out)


def test_page_tables_must_be_contiguous(rng):
    kv = np.zeros((4, 2, 16, 2, 64), np.float32)
    pool = clsa.PagedCacheLayout(kv[:, 0], kv[:, 1], np.zeros((4, 16, 64), np.float32))
    indptr = np.array([0, 0, 1, 1, 2, 2], dtype=np.int32)[::2]  # [0, 1, 2] with stride 2
    with refused("page_indptr is .* contiguous"):
        clsa.CacheBatch.wrap(pool, indptr, np.array([0, 1], np.int32), np.array([3, 5], np.int32))
    wrapped = clsa.CacheBatch.wrap(pool, indptr.copy(), np.array([0, 1], np.int32), np.array([3, 5], np.int32))
    assert wrapped.lengths == [3, 5]
    with refused("v is"):
        clsa.PagedCacheLayout(kv[:, 0], kv[:, 1, :8], np.zeros((4, 16, 64), np.float32))
    with refused("innermost stride"):
        clsa.PagedCacheLayout(kv[:, 0], kv[:, 1], np.zeros((4, 16, 128), np.float32)[..., ::2])


def test_outputs_are_written_in_place_never_copied(rng, world):
    m, order, batch, indexer, attention = world
    q_idx = rng.standard_normal((2, 1, 4, 64)).astype(np.float32)
    weights = np.ones((2, 1, 4), np.float32)
    routing = indexer.select(batch, q_idx, weights)
    out = np.zeros((2, 1, 4, 64), np.float32)
    address = out.ctypes.data
    result = attention.forward(batch, routing, np.ones_like(out), out)
    assert result is out and out.ctypes.data == address and out.any()
    # The indexer's own index is a view of its workspace: the next select() writes the same memory.
    positions = routing.positions
    assert np.shares_memory(positions, indexer.select(batch, q_idx, weights).positions)
    # Two layouts of one cache view the same pool memory.
    a, b = m.cache.layout(), m.cache.layout()
    assert np.shares_memory(a.k, b.k) and not np.shares_memory(a.k, a.v)
