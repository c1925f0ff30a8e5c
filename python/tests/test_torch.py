"""clsa.torch: the custom ops eagerly, under opcheck (schemas, fake implementations, declared
mutations) and torch.compile(fullgraph=True); on a GPU also torch CUDA tensors on the current stream
and CUDA-graph capture and replay while the context grows. Skipped where torch is not installed;
the GPU cases are skipped (reported as skipped) without a CUDA device."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import clsa  # noqa: E402
import clsa.torch as ct  # noqa: E402

gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and clsa.cuda_device_count() > 0 and clsa.built_with_cuda()),
    reason="needs torch with a CUDA device and a CUDA build of libclsa",
)

HEADS, KV_HEADS, DIM, INDEX_HEADS, INDEX_DIM, TOP_K = 4, 2, 64, 2, 64, 16


def world(backend, device, dtype=torch.float32, lengths=(40, 23), page_size=16):
    cdt = {torch.float32: clsa.DType.f32, torch.bfloat16: clsa.DType.bf16}[dtype]
    cache = clsa.SharedKVCache(
        clsa.CacheConfig(
            num_kv_heads=KV_HEADS, head_dim=DIM, index_dim=INDEX_DIM, page_size=page_size, max_pages=128, dtype=cdt
        ),
        backend,
    )
    gen = torch.Generator().manual_seed(3)
    seqs = []
    for n in lengths:
        seq = cache.add_sequence()
        k, v = (torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(2))
        cache.append(seq, k.to(device), v.to(device), torch.randn(n, INDEX_DIM, generator=gen).to(dtype).to(device))
        seqs.append(seq)
    batch = cache.reserve_batch(4, 1024)
    cache.refill(batch, seqs)
    indexer = clsa.CrossLayerIndexer(
        clsa.IndexerConfig(num_heads=INDEX_HEADS, index_dim=INDEX_DIM, top_k=TOP_K, sink_tokens=1, local_window=2),
        backend,
    )
    config = clsa.AttentionConfig(num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM)
    sparse, dense = clsa.SparseCrossAttention(config, backend), clsa.DenseCrossAttention(config, backend)
    return cache, seqs, batch, indexer, sparse, dense


def inputs(b, device, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    q_idx = torch.randn(b, 1, INDEX_HEADS, INDEX_DIM, generator=gen).to(dtype).to(device)
    weights = torch.rand(b, 1, INDEX_HEADS, generator=gen).to(device)
    q = torch.randn(b, 1, HEADS, DIM, generator=gen).to(dtype).to(device)
    return q_idx, weights, q


def test_ops_match_the_numpy_binding():
    cache, seqs, batch, indexer, sparse, dense = world(clsa.Backend.cpu, "cpu")
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    q_idx, weights, q = inputs(2, "cpu")
    positions, counts, _ = ops.select(q_idx, weights)
    out = ops.sparse_attention(positions, counts, q)
    full = ops.dense_attention(q)
    routing = indexer.select(batch, q_idx.numpy(), weights.numpy())
    np.testing.assert_array_equal(positions.numpy(), routing.positions)
    np.testing.assert_array_equal(counts.numpy(), routing.counts)
    np.testing.assert_array_equal(out.numpy(), sparse.forward(batch, routing, q.numpy()))
    np.testing.assert_array_equal(full.numpy(), dense.forward(batch, q.numpy()))
    # The indexer's own index over torch inputs comes back as torch tensors (no copy).
    own = indexer.select(batch, q_idx, weights)
    assert isinstance(own.positions, torch.Tensor) and torch.equal(own.positions, positions)


def test_append_op_writes_the_pool_it_declares():
    cache, seqs, batch, indexer, sparse, dense = world(clsa.Backend.cpu, "cpu")
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    k = torch.randn(3, KV_HEADS, DIM)
    ops.append(seqs[1], k, k * 2, torch.randn(3, INDEX_DIM))
    assert cache.length(seqs[1]) == 26
    page = cache.pages(seqs[1])[-1]
    assert torch.equal(ops.k_pool[page, 23 % 16 : 26 % 16], k[: 26 % 16 - 23 % 16])
    assert ct.object_of(ops.cache) is cache and ct.handle(cache) == ops.cache
    with pytest.raises(clsa.Error) as info:
        ct.object_of(10**9)
    assert info.value.code == clsa.ErrorCode.invalid_argument


def test_opcheck_schemas_and_fake_implementations():
    cache, seqs, batch, indexer, sparse, dense = world(clsa.Backend.cpu, "cpu")
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    q_idx, weights, q = inputs(2, "cpu")
    positions = torch.empty(2, 1, TOP_K, dtype=torch.int32)
    counts = torch.empty(2, 1, dtype=torch.int32)
    slots = torch.empty(2, 1, TOP_K, dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.clsa.select.default,
        (ops.indexer, ops.batch, ops.index_pool, q_idx, weights, positions, counts, slots),
    )
    ops.select(q_idx, weights, positions, counts, slots)  # a valid routing for the layers
    lse = torch.empty(2, 1, HEADS)
    torch.library.opcheck(
        torch.ops.clsa.sparse_attention.default,
        (ops.attention, ops.batch, ops.k_pool, ops.v_pool, positions, counts, slots, q, torch.empty_like(q), lse),
    )
    torch.library.opcheck(
        torch.ops.clsa.dense_attention.default,
        (ops.dense, ops.batch, ops.k_pool, ops.v_pool, q, torch.empty_like(q), None),
    )


def test_compile_fullgraph_has_no_graph_breaks_and_same_outputs():
    cache, seqs, batch, indexer, sparse, dense = world(clsa.Backend.cpu, "cpu")
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    q_idx, weights, q = inputs(2, "cpu")
    layers = 3

    def step(q_idx, weights, q):
        positions, counts, _ = ops.select(q_idx, weights)
        outs = []
        x = q
        for _ in range(layers):
            x = ops.sparse_attention(positions, counts, x * 0.5)
            outs.append(x)
        return positions, counts, torch.stack(outs), ops.dense_attention(q)

    eager = step(q_idx, weights, q)
    compiled = torch.compile(step, fullgraph=True)(q_idx, weights, q)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@gpu
def test_cuda_tensors_on_the_current_stream_match_the_cpu():
    cpu = world(clsa.Backend.cpu, "cpu")
    gpu_world = world(clsa.Backend.cuda, "cuda")
    results = []
    for (cache, seqs, batch, indexer, sparse, dense), device in ((cpu, "cpu"), (gpu_world, "cuda")):
        ops = ct.Ops(cache, batch, indexer, sparse, dense)
        q_idx, weights, q = inputs(2, device)
        stream = torch.cuda.Stream() if device == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the ops default to the current torch stream
                positions, counts, _ = ops.select(q_idx, weights)
                out = ops.sparse_attention(positions, counts, q)
            torch.cuda.current_stream().wait_stream(stream)
        else:
            positions, counts, _ = ops.select(q_idx, weights)
            out = ops.sparse_attention(positions, counts, q)
        results.append((positions.cpu(), counts.cpu(), out.cpu()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=0, atol=1e-4)


@gpu
def test_cuda_graph_replay_while_the_context_grows():
    cache, seqs, batch, indexer, sparse, dense = world(clsa.Backend.cuda, "cuda", dtype=torch.bfloat16)
    indexer.reserve(4, 1, 1024)
    sparse.reserve(4, 1, TOP_K)
    dense.reserve(4, 1, 1024)
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    q_idx, weights, q = inputs(2, "cuda", torch.bfloat16)
    positions = torch.empty(2, 1, TOP_K, dtype=torch.int32, device="cuda")
    counts = torch.empty(2, 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    full = torch.empty_like(q)
    ops.select(q_idx, weights, positions, counts)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.select(q_idx, weights, positions, counts)
        ops.sparse_attention(positions, counts, q, out)
        ops.dense_attention(q, full)
    assert batch.captured
    gen = torch.Generator().manual_seed(9)
    for step in range(20):
        for seq in seqs:
            ops.append(seq, *(torch.randn(1, KV_HEADS, DIM, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)),
                       torch.randn(1, INDEX_DIM, generator=gen).to(torch.bfloat16).cuda())
        cache.refill(batch, seqs)
        graph.replay()
        torch.cuda.synchronize()
        indexer.check_status()
        eager_out = ops.sparse_attention(*ops.select(q_idx, weights)[:2], q)
        assert counts.min().item() == TOP_K
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        assert torch.equal(full, ops.dense_attention(q))
