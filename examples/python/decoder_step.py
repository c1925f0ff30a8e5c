#!/usr/bin/env python3
"""A 16-layer CLSA cross-decoder step from Python, decoded for a few steps while the context grows.

Each step appends one token per sequence to the ONE shared cache, routes once
(CrossLayerIndexer.select) and runs every layer's sparse attention over that routing, with a
residual stream through random (fixed) per-layer projections. The same step runs with dense
attention (the YOCO baseline) and the program prints CLSA's output against it; with --top-k at
least the context the two must agree (the exit code says whether they did); below it the
difference is large on this random, diffuse data, which is no measure of quality (docs/design.md).

  --device cpu   NumPy arrays on the CPU backend (what runs everywhere).
  --device cuda  torch CUDA tensors through the clsa.torch ops: the whole step (select + every
                 layer) captured once in a CUDA graph and replayed step after step while the
                 context grows, the batch refilled in place (the engine contract from Python).

  python3 examples/python/decoder_step.py --context 2048 --steps 8 --top-k 256
"""

import argparse
import sys
import time

import numpy as np

import clsa

LAYERS = 16


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=4, help="decoding steps")
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--index-heads", type=int, default=4)
    p.add_argument("--index-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Model:
    """Random fixed weights of the cross-decoder: per layer a query projection and an output
    projection; the step's K/V/indexer key and indexer query come from the input token."""

    def __init__(self, a, rng):
        self.a = a
        width = a.q_heads * a.head_dim

        def weight(cols):
            return (rng.standard_normal((width, cols)) / np.sqrt(width)).astype(np.float32)

        self.wq = [weight(width) for _ in range(LAYERS)]
        self.wo = [weight(width) for _ in range(LAYERS)]
        self.wk = weight(a.kv_heads * a.head_dim)
        self.wv = weight(a.kv_heads * a.head_dim)
        self.wkey = weight(a.index_dim)
        self.wqi = weight(a.index_heads * a.index_dim)
        self.ww = weight(a.index_heads)


def build(a, backend):
    max_length = a.context + a.steps
    page_size = 64
    pages = a.batch * (max_length // page_size + 1)
    cache_config = clsa.CacheConfig(
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        index_dim=a.index_dim,
        page_size=page_size,
        max_pages=pages,
        dtype=clsa.DType.f32 if backend == clsa.Backend.cpu else clsa.DType.bf16,
    )
    cache = clsa.SharedKVCache(cache_config, backend)
    indexer = clsa.CrossLayerIndexer(
        clsa.IndexerConfig(
            num_heads=a.index_heads, index_dim=a.index_dim, top_k=a.top_k, sink_tokens=4, local_window=16
        ),
        backend,
    )
    attention_config = clsa.AttentionConfig(num_q_heads=a.q_heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim)
    sparse = clsa.SparseCrossAttention(attention_config, backend)
    dense = clsa.DenseCrossAttention(attention_config, backend)
    # Planned once for the largest step: no call allocates after this.
    indexer.reserve(a.batch, 1, max_length)
    sparse.reserve(a.batch, 1, a.top_k)
    dense.reserve(a.batch, 1, max_length)
    batch = cache.reserve_batch(a.batch, max_length)
    return cache, indexer, sparse, dense, batch


def run_numpy(a):
    rng = np.random.default_rng(a.seed)
    model = Model(a, rng)
    cache, indexer, sparse, dense, batch = build(a, clsa.Backend.cpu)
    B, Hq, D = a.batch, a.q_heads, a.head_dim
    seqs = []
    for _ in range(B):  # the prompt: the self-decoder's output projected once into the cache
        seq = cache.add_sequence()
        cache.append(
            seq,
            rng.standard_normal((a.context, a.kv_heads, D)).astype(np.float32),
            rng.standard_normal((a.context, a.kv_heads, D)).astype(np.float32),
            rng.standard_normal((a.context, a.index_dim)).astype(np.float32),
        )
        seqs.append(seq)
    out = np.empty((B, 1, Hq, D), np.float32)
    worst = 0.0
    for step in range(a.steps):
        x = rng.standard_normal((B, Hq * D)).astype(np.float32)  # the self-decoder's output for the new token
        for b, seq in enumerate(seqs):
            cache.append(
                seq,
                (x[b] @ model.wk).reshape(1, a.kv_heads, D),
                (x[b] @ model.wv).reshape(1, a.kv_heads, D),
                (x[b] @ model.wkey).reshape(1, a.index_dim),
            )
        cache.refill(batch, seqs)
        start = time.perf_counter()
        routing = indexer.select(
            batch,
            (x @ model.wqi).reshape(B, 1, a.index_heads, a.index_dim),
            (x @ model.ww).reshape(B, 1, a.index_heads),
        )
        h = x
        for layer in range(LAYERS):
            sparse.forward(batch, routing, (h @ model.wq[layer]).reshape(B, 1, Hq, D), out)
            h = h + out.reshape(B, Hq * D) @ model.wo[layer]
        clsa_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        g = x
        for layer in range(LAYERS):
            dense.forward(batch, (g @ model.wq[layer]).reshape(B, 1, Hq, D), out)
            g = g + out.reshape(B, Hq * D) @ model.wo[layer]
        dense_ms = (time.perf_counter() - start) * 1e3
        error = float(np.abs(h - g).max() / np.abs(g).max())
        worst = max(worst, error)
        print(
            f"step {step}: context {batch.max_length}, CLSA step {clsa_ms:.2f} ms, dense step {dense_ms:.2f} ms, "
            f"output vs dense (max rel) {error:.2e}"
        )
    return worst


def run_torch_cuda(a):
    import torch

    import clsa.torch as ct

    gen = torch.Generator().manual_seed(a.seed)
    model = Model(a, np.random.default_rng(a.seed))
    w = {name: torch.from_numpy(getattr(model, name)).cuda().to(torch.bfloat16) for name in ("wk", "wv", "wkey", "wqi", "ww")}
    wq = [torch.from_numpy(m).cuda().to(torch.bfloat16) for m in model.wq]
    wo = [torch.from_numpy(m).cuda().to(torch.bfloat16) for m in model.wo]
    cache, indexer, sparse, dense, batch = build(a, clsa.Backend.cuda)
    B, Hq, D = a.batch, a.q_heads, a.head_dim
    seqs = []
    for _ in range(B):
        seq = cache.add_sequence()
        cache.append(
            seq,
            *(torch.randn(a.context, a.kv_heads, D, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)),
            torch.randn(a.context, a.index_dim, generator=gen).to(torch.bfloat16).cuda(),
        )
        seqs.append(seq)
    cache.refill(batch, seqs)
    ops = ct.Ops(cache, batch, indexer, sparse, dense)
    # Static buffers the graph reads and writes.
    x = torch.zeros(B, Hq * D, device="cuda", dtype=torch.bfloat16)
    positions = torch.empty(B, 1, a.top_k, dtype=torch.int32, device="cuda")
    counts = torch.empty(B, 1, dtype=torch.int32, device="cuda")
    out = torch.empty(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)

    def step(attend):
        h = x
        for layer in range(LAYERS):
            attend((h @ wq[layer]).view(B, 1, Hq, D))
            h = h + out.view(B, Hq * D) @ wo[layer]
        return h

    def clsa_step():
        ops.select((x @ w["wqi"]).view(B, 1, a.index_heads, a.index_dim), (x @ w["ww"]).view(B, 1, a.index_heads).float(),
                   positions, counts)
        return step(lambda q: ops.sparse_attention(positions, counts, q, out))

    def dense_step():
        return step(lambda q: ops.dense_attention(q, out))

    graphs = {}
    for name, fn in (("clsa", clsa_step), ("dense", dense_step)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = fn()
        graphs[name] = (graph, result)
    worst = 0.0
    for s in range(a.steps):
        x.copy_(torch.randn(B, Hq * D, generator=gen).to(torch.bfloat16).cuda())
        for b, seq in enumerate(seqs):
            ops.append(seq, (x[b] @ w["wk"]).view(1, a.kv_heads, D), (x[b] @ w["wv"]).view(1, a.kv_heads, D),
                       (x[b] @ w["wkey"]).view(1, a.index_dim))
        cache.refill(batch, seqs)  # in place: the graphs read these tables
        timings = {}
        for name, (graph, result) in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            timings[name] = start.elapsed_time(end)
        indexer.check_status()
        dense.check_status()
        h, g = graphs["clsa"][1].float(), graphs["dense"][1].float()
        error = float((h - g).abs().max() / g.abs().max())
        worst = max(worst, error)
        print(f"step {s}: context {batch.max_length}, CLSA graph {timings['clsa']:.3f} ms, "
              f"dense graph {timings['dense']:.3f} ms, output vs dense (max rel) {error:.2e}")
    return worst


def main():
    a = parse()
    worst = run_torch_cuda(a) if a.device == "cuda" else run_numpy(a)
    exact = a.top_k >= a.context + a.steps
    tolerance = 1e-4 if a.device == "cpu" else 5e-2
    if exact and worst > tolerance:
        print(f"FAILED: top_k covers the context but CLSA differs from dense by {worst:.2e}", file=sys.stderr)
        return 1
    print(f"{LAYERS} layers, batch {a.batch}: worst output vs dense {worst:.2e}" + (" (exact path)" if exact else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
