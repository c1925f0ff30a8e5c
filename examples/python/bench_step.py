#!/usr/bin/env python3
"""The CLSA step of `clsa bench` (select + every layer's sparse attention over one shared cache)
driven from PyTorch through the clsa.torch ops, replayed from one CUDA graph, and the same step
called eagerly: what the Python binding costs an engine against the C++ calls.

The shape, dtype, page size and indexer are `clsa bench`'s (bf16, 64-token pages, 4 sink tokens
and a 64-token window, random N(0, 1) data; the routing carries pool slots, the K/V are read from the pool as with `--routed-kv 0`). Compare
its lines with the C++ rows of the same run:

  clsa bench --backend cuda --context 131072 --batch 1 --routed-kv 0 --evict-l2-mb 0 --no-baselines
  python3 examples/python/bench_step.py --context 131072 --batch 1

"clsa step (graph)" against "graph step" (the bar: within 3%), "clsa step" against "eager step"
(the host cost of 1 + layers op calls from Python).
"""

import argparse
import statistics
import sys
import time

import torch

import clsa
import clsa.torch as ct


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--index-heads", type=int, default=16)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--top-k", type=int, default=2048)
    p.add_argument("--iterations", type=int, default=30, help="timed replays and eager steps (median)")
    p.add_argument("--pdl", action="store_true", help="programmatic dependent launch (as clsa bench --pdl)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


def main():
    a = parse()
    if not (torch.cuda.is_available() and clsa.built_with_cuda() and clsa.cuda_device_count() > 0):
        print("bench_step: needs torch with a CUDA device and a CUDA build of libclsa", file=sys.stderr)
        return 77
    gen = torch.Generator(device="cuda").manual_seed(a.seed)
    B, T, L = a.batch, 1, a.layers
    page_size = 64
    config = clsa.CacheConfig(
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        index_dim=a.index_dim,
        page_size=page_size,
        max_pages=B * ((a.context + page_size - 1) // page_size),
        dtype=clsa.DType.bf16,
    )
    cache = clsa.SharedKVCache(config, clsa.Backend.cuda)
    indexer = clsa.CrossLayerIndexer(
        clsa.IndexerConfig(
            num_heads=a.index_heads,
            index_dim=a.index_dim,
            top_k=a.top_k,
            sink_tokens=4,
            local_window=64,
            scale=a.index_dim**-0.5,
            enable_pdl=a.pdl,
        ),
        clsa.Backend.cuda,
    )
    sparse = clsa.SparseCrossAttention(
        clsa.AttentionConfig(num_q_heads=a.q_heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim, enable_pdl=a.pdl),
        clsa.Backend.cuda,
    )
    indexer.reserve(B, T, a.context)
    sparse.reserve(B, T, a.top_k)
    batch = cache.reserve_batch(B, a.context)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)

    seqs = [cache.add_sequence() for _ in range(B)]
    ops = ct.Ops(cache, batch, indexer, sparse)
    chunk = 8192
    for seq in seqs:
        for start in range(0, a.context, chunk):
            n = min(chunk, a.context - start)
            ops.append(seq, randn(n, a.kv_heads, a.head_dim), randn(n, a.kv_heads, a.head_dim), randn(n, a.index_dim))
    cache.refill(batch, seqs)

    q_idx = randn(B, T, a.index_heads, a.index_dim)
    weights = torch.rand(B, T, a.index_heads, generator=gen, device="cuda")
    queries = [randn(B, T, a.q_heads, a.head_dim) for _ in range(L)]
    outputs = [torch.empty(B, T, a.q_heads, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    positions = torch.empty(B, T, a.top_k, device="cuda", dtype=torch.int32)
    counts = torch.empty(B, T, device="cuda", dtype=torch.int32)
    slots = torch.empty(B, T, a.top_k, device="cuda", dtype=torch.int32)

    def step():
        ops.select(q_idx, weights, positions, counts, slots)
        for layer in range(L):
            ops.sparse_attention(positions, counts, queries[layer], outputs[layer], slots=slots)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (and plan) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def timed(run):
        times = []
        for _ in range(a.iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # us
        return statistics.median(times)

    for _ in range(3):
        graph.replay()
    graph_us = timed(graph.replay)
    eager_us = timed(step)
    # Host time of the eager calls alone (enqueue only; the GPU drains after).
    host = []
    for _ in range(a.iterations):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        step()
        host.append((time.perf_counter() - begin) * 1e6)
        torch.cuda.synchronize()
    indexer.check_status()
    sparse.check_status()
    calls = 1 + L
    print(f"shape: context {a.context}, batch {B}, {L} layers, Hq {a.q_heads}, Hkv {a.kv_heads}, D {a.head_dim}, "
          f"index {a.index_heads}x{a.index_dim}, top_k {a.top_k}, bf16")
    print(f"graph step (Python, torch.cuda.graph):  {graph_us:9.1f} us")
    print(f"eager step (Python ops):                {eager_us:9.1f} us")
    print(f"host time of the eager step's {calls} calls: {statistics.median(host):9.1f} us "
          f"({statistics.median(host) / calls:.1f} us a call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
