#!/usr/bin/env python3
"""The same decoding step as `clsa bench`, written the way a PyTorch user would write it, timed in
the same way (CUDA events, warm-up, median, inputs rotated past the L2), and set beside libclsa.

    clsa bench --json clsa.json
    python3 scripts/bench_torch.py clsa.json [--json torch.json] [--plot step.png]
    python3 scripts/bench_torch.py clsa.json --from-json torch.json --plot step.png   # plot only

Methods (per decoding step of an L-layer cross-decoder, T = 1):
  dense step      L x SDPA over the whole cache (flash backend; GQA as q_len = group)
  indexer         einsum + ReLU + weighted head sum + topk
  sparse layer    gather of the routed K/V rows + SDPA
  per-layer step  L x (indexer + sparse layer)
  clsa step       indexer + L x sparse layer
The cache is [B, Hkv, N, D] per sequence (contiguous, no paging): what SDPA wants.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_seconds(fn, iterations, warmup):
    for i in range(warmup):
        fn(i)
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    samples = []
    for i in range(iterations):
        start.record()
        fn(warmup + i)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e-3)
    samples.sort()
    n = len(samples)
    return samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2])


def run(shape, context, batch, iterations, warmup, generator):
    L, hq, hkv, d = shape["layers"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    hi, di, top_k = shape["index_heads"], shape["index_dim"], shape["top_k"]
    group = hq // hkv
    dev, dt = "cuda", torch.bfloat16
    bytes_per_step = batch * context * (2 * hkv * d + di) * 2
    replicas = max(1, math.ceil(4 * 50e6 / bytes_per_step))
    caches = []
    for _ in range(replicas):
        k = torch.randn(batch, hkv, context, d, device=dev, dtype=dt, generator=generator)
        v = torch.randn(batch, hkv, context, d, device=dev, dtype=dt, generator=generator)
        ki = torch.randn(batch, context, di, device=dev, dtype=dt, generator=generator)
        caches.append((k, v, ki))
    q_idx = torch.randn(batch, hi, di, device=dev, dtype=dt, generator=generator)
    w = torch.rand(batch, hi, device=dev, dtype=torch.float32, generator=generator) + 0.01
    queries = [0.3 * torch.randn(batch, hkv, group, d, device=dev, dtype=dt, generator=generator) for _ in range(L)]
    k_routed = min(top_k, context)
    scale = 1.0 / math.sqrt(di)

    def indexer(i):
        _, _, ki = caches[i % replicas]
        scores = torch.einsum("bhd,bnd->bhn", q_idx, ki).float().relu_()
        scores = (scores * w[:, :, None]).sum(1) * scale
        return scores.topk(k_routed, dim=-1).indices  # [B, k]

    def sparse(i, routed, q):
        k, v, _ = caches[i % replicas]
        index = routed[:, None, :, None].expand(batch, hkv, k_routed, d)
        ks = torch.gather(k, 2, index)
        vs = torch.gather(v, 2, index)
        return F.scaled_dot_product_attention(q, ks, vs)

    def dense(i, q):
        k, v, _ = caches[i % replicas]
        return F.scaled_dot_product_attention(q, k, v)

    fixed_routes = [indexer(r) for r in range(replicas)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t = {}
        t["indexer (select)"] = median_seconds(indexer, iterations, warmup)
        t["sparse layer"] = median_seconds(lambda i: sparse(i, fixed_routes[i % replicas], queries[0]), iterations, warmup)
        t["dense layer"] = median_seconds(lambda i: dense(i, queries[0]), iterations, warmup)

        def clsa_step(i):
            routed = indexer(i)
            for q in queries:
                sparse(i, routed, q)

        def per_layer_step(i):
            for q in queries:
                sparse(i, indexer(i), q)

        def dense_step(i):
            for q in queries:
                dense(i, q)

        t["clsa step"] = median_seconds(clsa_step, iterations, warmup)
        t["per-layer step"] = median_seconds(per_layer_step, iterations, warmup)
        t["dense step"] = median_seconds(dense_step, iterations, warmup)
    del caches
    torch.cuda.empty_cache()
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clsa_json", help="output of clsa bench --json")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the PyTorch timings and ratios here")
    parser.add_argument("--plot", help="write a PNG of step time against context here")
    parser.add_argument("--from-json", help="skip timing: plot from a --json file of an earlier run")
    args = parser.parse_args()
    with open(args.clsa_json) as f:
        bench = json.load(f)
    if args.from_json:
        with open(args.from_json) as f:
            plot(bench, json.load(f)["rows"], args.plot or "step.png")
        return
    if bench["backend"] != "cuda":
        sys.exit("bench_torch.py compares CUDA runs; this bench ran on " + bench["backend"])
    shape = bench["shape"]
    clsa = {(r["method"], r["context"], r["batch"]): r["seconds"] for r in bench["rows"]}
    grid = sorted({(r["context"], r["batch"]) for r in bench["rows"]})
    generator = torch.Generator(device="cuda")
    generator.manual_seed(1)
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, same shape and grid as the clsa bench")
    print(f"{'method':<22} {'context':>8} {'B':>4} {'libclsa':>11} {'pytorch':>11} {'torch/clsa':>11}")
    out = []
    for context, batch in grid:
        t = run(shape, context, batch, args.iterations, args.warmup, generator)
        for method, seconds in t.items():
            mine = clsa.get((method, context, batch))
            best = mine
            graph = clsa.get(("clsa step (graph)", context, batch))
            if method == "clsa step" and graph is not None:
                best = min(mine, graph)
            ratio = seconds / best if best else float("nan")
            print(f"{method:<22} {context:>8} {batch:>4} {best * 1e6:>9.1f}us {seconds * 1e6:>9.1f}us {ratio:>10.1f}x")
            out.append({"method": method, "context": context, "batch": batch, "pytorch_seconds": seconds,
                        "clsa_seconds": best, "pytorch_over_clsa": ratio})
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)
    if args.plot:
        plot(bench, out, args.plot)


def plot(bench, torch_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in bench["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method, style in (("dense step", "o-"), ("per-layer step", "s-"), ("clsa step", "^-")):
            rows = sorted((r["context"], r["seconds"]) for r in bench["rows"] if r["method"] == method and r["batch"] == batch)
            if method == "clsa step":
                graph = {r["context"]: r["seconds"] for r in bench["rows"]
                         if r["method"] == "clsa step (graph)" and r["batch"] == batch}
                rows = [(c, min(s, graph.get(c, s))) for c, s in rows]
            ax.plot([c for c, _ in rows], [s * 1e3 for _, s in rows], style, label="libclsa " + method)
            trows = sorted((r["context"], r["pytorch_seconds"]) for r in torch_rows
                           if r["method"] == method and r["batch"] == batch)
            ax.plot([c for c, _ in trows], [s * 1e3 for _, s in trows], marker=style[0], alpha=0.4, linestyle="--",
                    label="PyTorch " + method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"B = {batch}, L = {bench['shape']['layers']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"one decoding step, {bench.get('device_name', bench['device'])} ({bench['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
