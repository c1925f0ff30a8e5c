"""Every error class reaches Python as clsa.Error with its code and the C++ message, and a failed
call changes nothing."""

import contextlib

import numpy as np
import pytest
from conftest import CPU, ForeignDeviceArray, MirroredCache

import clsa

Code = clsa.ErrorCode


@contextlib.contextmanager
def raises(code, match=None):
    """pytest.raises(clsa.Error) that also checks the code."""
    with pytest.raises(clsa.Error, match=match) as info:
        yield info
    assert info.value.code == code, f"{info.value.code} != {code}: {info.value}"


def small_world(rng, length=20):
    m = MirroredCache(page_size=8, max_pages=8)
    seq = m.add(rng, length)
    batch = m.cache.batch([seq])
    indexer = clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=8), CPU)
    attention = clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=64), CPU)
    return m, seq, batch, indexer, attention


def test_error_is_a_runtime_error_with_code_and_message():
    assert issubclass(clsa.Error, RuntimeError)
    with raises(Code.invalid_argument, match=r"page_size = 24; it must be a power of two") as info:
        clsa.SharedKVCache(clsa.CacheConfig(page_size=24, max_pages=4), CPU)
    assert "SharedKVCache" in str(info.value)


def test_invalid_argument(rng):
    with raises(Code.invalid_argument, match="top_k"):
        clsa.CrossLayerIndexer(clsa.IndexerConfig(num_heads=2, index_dim=64, top_k=0), CPU)
    with raises(Code.invalid_argument, match="not a multiple"):
        clsa.SparseCrossAttention(clsa.AttentionConfig(num_q_heads=5, num_kv_heads=2, head_dim=64), CPU)
    m, seq, batch, indexer, attention = small_world(rng)
    with raises(Code.invalid_argument, match="sequences is empty"):
        m.cache.batch([])
    with raises(Code.invalid_argument, match="sequences must be an iterable"):
        m.cache.batch(seq)
    with raises(Code.invalid_argument, match=r"q_idx is a str"):
        indexer.select(batch, "q", np.ones((1, 1, 2), np.float32))
    with raises(Code.invalid_argument, match="q is None"):
        attention.forward(batch, indexer.select(batch, *idx_inputs(rng, 1)), None)
    with raises(Code.invalid_argument, match="stream is a str"):
        m.cache.append(seq, *token_inputs(rng, 1), stream="default")
    # More query tokens than a sequence holds.
    with raises(Code.invalid_argument, match="fewer than the T = 30 query tokens"):
        indexer.select(batch, *idx_inputs(rng, 1, tokens=30))


def idx_inputs(rng, b, tokens=1):
    return (
        rng.standard_normal((b, tokens, 2, 64)).astype(np.float32),
        rng.random((b, tokens, 2)).astype(np.float32),
    )


def token_inputs(rng, tokens, dtype=np.float32):
    return (
        rng.standard_normal((tokens, 2, 64)).astype(dtype),
        rng.standard_normal((tokens, 2, 64)).astype(dtype),
        rng.standard_normal((tokens, 64)).astype(dtype),
    )


def test_shape_mismatch(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    k, v, keys = token_inputs(rng, 3)
    with raises(Code.shape_mismatch, match=r"k is \[3,1,64\].*expected shape \[3,2,64\]"):
        m.cache.append(seq, k[:, :1], v, keys)
    with raises(Code.shape_mismatch, match="q_idx"):
        indexer.select(batch, np.zeros((1, 1, 3, 64), np.float32), np.zeros((1, 1, 2), np.float32))
    routing = indexer.select(batch, *idx_inputs(rng, 1))
    with raises(Code.shape_mismatch, match="q is"):
        attention.forward(batch, routing, np.zeros((1, 1, 4, 32), np.float32))
    with raises(Code.shape_mismatch, match="out.positions"):
        indexer.select(
            batch,
            *idx_inputs(rng, 1),
            out=clsa.RoutingIndex(np.zeros((1, 1, 7), np.int32), np.zeros((1, 1), np.int32), top_k=8),
        )


def test_dtype_mismatch(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    k, v, keys = token_inputs(rng, 2)
    with raises(Code.dtype_mismatch, match="v is .* expected dtype f32"):
        m.cache.append(seq, k, v.astype(np.float16), keys)
    with raises(Code.dtype_mismatch, match="k has dtype float64"):
        m.cache.append(seq, k.astype(np.float64), v, keys)
    with raises(Code.dtype_mismatch, match="has dtype bool"):
        m.cache.append(seq, k, v, keys > 0)
    with raises(Code.dtype_mismatch, match="i32"):
        clsa.SharedKVCache(clsa.CacheConfig(max_pages=4, dtype=clsa.DType.i32), CPU)


def test_device_mismatch(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    _, v, keys = token_inputs(rng, 2)
    with raises(Code.device_mismatch, match="cuda:0 but this call computes on cpu"):
        m.cache.append(seq, ForeignDeviceArray((2, 2, 64)), v, keys)
    with raises(Code.device_mismatch, match="DLPack device type 4"):  # OpenCL
        m.cache.append(seq, ForeignDeviceArray((2, 2, 64), device_type=4), v, keys)
    q_idx, w = idx_inputs(rng, 1)
    with raises(Code.device_mismatch, match="q_idx"):
        indexer.select(batch, ForeignDeviceArray(q_idx.shape), w)


def test_unknown_sequence(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    with raises(Code.unknown_sequence, match="sequence 77 is not in this cache"):
        m.cache.append(77, *token_inputs(rng, 1))
    for call in (m.cache.length, m.cache.pages, m.cache.release):
        with raises(Code.unknown_sequence):
            call(77)
    with raises(Code.unknown_sequence):
        m.cache.batch([seq, 77])


def test_capacity_exceeded_and_failed_append_changes_nothing(rng):
    m, seq, batch, indexer, attention = small_world(rng, length=20)  # 3 of 8 pages of 8 tokens
    other = m.add(rng, 30)  # 4 more: 1 page left
    before = m.cache.layout()
    snapshot = [np.array(before.k), np.array(before.v), np.array(before.index_keys)]
    with raises(Code.capacity_exceeded, match="pages"):
        m.cache.append(seq, *token_inputs(rng, 20))
    assert m.cache.length(seq) == 20 and m.cache.memory().pages_used == 7
    for old, new in zip(snapshot, (before.k, before.v, before.index_keys)):
        np.testing.assert_array_equal(old, new)
    # A refill that does not fit a reserved batch leaves it as it was.
    reserved = m.cache.reserve_batch(1, 64)
    m.cache.refill(reserved, [seq])
    with raises(Code.capacity_exceeded):
        m.cache.refill(reserved, [seq, other])
    assert reserved.lengths == [20]
    # A call beyond a planned component's bounds.
    indexer.reserve(1, 1, 16)
    with raises(Code.capacity_exceeded, match="planned for at most"):
        indexer.select(batch, *idx_inputs(rng, 1))
    attention.reserve(1, 1, 4)
    indexer.reserve(1, 1, 64)
    routing = indexer.select(batch, *idx_inputs(rng, 1))
    with raises(Code.capacity_exceeded):
        attention.forward(batch, routing, np.zeros((1, 1, 4, 64), np.float32))


def test_unsupported():
    if clsa.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: Backend.cuda is supported here")
    with raises(Code.unsupported, match="cuda"):
        clsa.SharedKVCache(clsa.CacheConfig(max_pages=4), clsa.Backend.cuda)
    with raises(Code.unsupported):
        clsa.resolve_backend(clsa.Backend.cuda)


def test_stale_indexer_routing_is_refused(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    first = indexer.select(batch, *idx_inputs(rng, 1))
    indexer.select(batch, *idx_inputs(rng, 1))
    with raises(Code.invalid_argument, match="earlier select"):
        attention.forward(batch, first, np.zeros((1, 1, 4, 64), np.float32))
    with raises(Code.invalid_argument, match="earlier select"):
        first.positions  # noqa: B018 (its arrays would alias reused memory)


def test_read_only_output_is_refused(rng):
    m, seq, batch, indexer, attention = small_world(rng)
    routing = indexer.select(batch, *idx_inputs(rng, 1))
    out = np.zeros((1, 1, 4, 64), np.float32)
    out.flags.writeable = False
    with raises(Code.invalid_argument, match="out is read-only"):
        attention.forward(batch, routing, np.zeros((1, 1, 4, 64), np.float32), out)
    positions = np.zeros((1, 1, 8), np.int32)
    positions.flags.writeable = False
    with raises(Code.invalid_argument, match="writable caller arrays"):
        indexer.select(batch, *idx_inputs(rng, 1), out=clsa.RoutingIndex(positions, np.zeros((1, 1), np.int32)))
