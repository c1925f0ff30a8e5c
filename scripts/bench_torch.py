#!/usr/bin/env python3
"""The same decoding step as `clsa bench`, written the way a PyTorch user would write it, timed in
the same way (CUDA events, warm-up, median, inputs rotated past the L2), and set beside libclsa
(and, with --flashinfer, beside the FlashInfer composition of scripts/bench_flashinfer.py).

    clsa bench --json clsa.json
    python3 scripts/bench_torch.py clsa.json [--json torch.json] [--plot step.png]
    python3 scripts/bench_flashinfer.py clsa.json --json flashinfer.json
    python3 scripts/bench_torch.py clsa.json --from-json torch.json --flashinfer flashinfer.json \\
        --markdown peers.md --plot step.png     # no timing: tables and plot from earlier runs
(--context/--batch time a part of the grid, so that long runs can be split; --from-json and
--flashinfer take several files and merge their rows.)

Methods (per decoding step of an L-layer cross-decoder, T = 1):
  dense step      L x SDPA over the whole cache (flash backend; GQA as q_len = group)
  indexer         einsum + ReLU + weighted head sum + topk
  sparse layer    gather of the routed K/V rows + SDPA
  per-layer step  L x (indexer + sparse layer)
  clsa step       indexer + L x sparse layer, eager
  clsa step (graph)
                  the same step captured in a CUDA graph (torch.cuda.CUDAGraph, static inputs,
                  warmed up on a side stream before capture) and replayed, one graph per input
                  replica: what a PyTorch user who cares about decode latency does. The headline
                  comparison is this against libclsa's "clsa step (graph)".
The cache is [B, Hkv, N, D] per sequence (contiguous, no paging): what SDPA wants.

When clsa.json has "(L2 evicted)" rows (clsa bench --evict-l2-mb, on by default), the steps are
also timed with the same feed-forward stand-in: a device-to-device copy of half of a buffer of the
same size onto its other half (torch's copy_ issues the same cudaMemcpyAsync as clsa bench) before
each layer's work (before the indexer and before layers 1..L-1 of the CLSA step; before every
layer of the others), with the stand-ins' own time, measured alone in the same mode, subtracted.
Rows: "dense step (L2 evicted)", "per-layer step (L2 evicted)", "clsa step (L2 evicted)",
"clsa step (graph) (L2 evicted)" and "sparse layer (cold L2)" (one stand-in, then the layer).
"""
import argparse
import json
import math
import sys

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError as _error:  # the --from-json path needs no torch
    torch = None
    _torch_error = _error

EVICTED = " (L2 evicted)"
COLD = "sparse layer (cold L2)"


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


def graph_median_seconds(fn, replicas, iterations, warmup):
    """fn(r) captured once per replica as a CUDA graph (after a warm-up on a side stream, as
    PyTorch documents), the graphs replayed in turn and timed like median_seconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(2, warmup)):
            fn(i % replicas)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for r in range(replicas):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(r)
        graphs.append(graph)
    torch.cuda.synchronize()
    seconds = median_seconds(lambda i: graphs[i % replicas].replay(), iterations, warmup)
    del graphs
    return seconds


def run(shape, context, batch, iterations, warmup, generator, evict_bytes):
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
    # The feed-forward stand-in of clsa bench --evict-l2-mb (same size, same copy).
    half = evict_bytes // 8 * 4
    evict_buffer = torch.zeros(2 * half, dtype=torch.uint8, device=dev) if half else None

    def stand_in():
        evict_buffer[half:].copy_(evict_buffer[:half])

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

    def clsa_step(i, evict=False):
        if evict:
            stand_in()
        routed = indexer(i)
        for l, q in enumerate(queries):
            if evict and l > 0:
                stand_in()
            sparse(i, routed, q)

    def per_layer_step(i, evict=False):
        for q in queries:
            if evict:
                stand_in()
            sparse(i, indexer(i), q)

    def dense_step(i, evict=False):
        for q in queries:
            if evict:
                stand_in()
            dense(i, q)

    def stand_ins(count):
        def body(i):
            for _ in range(count):
                stand_in()
        return body

    fixed_routes = [indexer(r) for r in range(replicas)]
    t, subtracted = {}, {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t["indexer (select)"] = median_seconds(indexer, iterations, warmup)
        t["sparse layer"] = median_seconds(lambda i: sparse(i, fixed_routes[i % replicas], queries[0]), iterations, warmup)
        t["dense layer"] = median_seconds(lambda i: dense(i, queries[0]), iterations, warmup)
        t["clsa step"] = median_seconds(clsa_step, iterations, warmup)
        t["clsa step (graph)"] = graph_median_seconds(clsa_step, replicas, iterations, warmup)
        t["per-layer step"] = median_seconds(per_layer_step, iterations, warmup)
        t["dense step"] = median_seconds(dense_step, iterations, warmup)
        if half:
            one = median_seconds(stand_ins(1), iterations, warmup)
            many = median_seconds(stand_ins(L), iterations, warmup)
            many_graph = graph_median_seconds(stand_ins(L), replicas, iterations, warmup)

            def cold_layer(i):
                stand_in()
                sparse(i, fixed_routes[i % replicas], queries[0])

            t[COLD] = median_seconds(cold_layer, iterations, warmup) - one
            t["clsa step" + EVICTED] = median_seconds(lambda i: clsa_step(i, True), iterations, warmup) - many
            t["clsa step (graph)" + EVICTED] = graph_median_seconds(
                lambda i: clsa_step(i, True), replicas, iterations, warmup) - many_graph
            t["per-layer step" + EVICTED] = median_seconds(lambda i: per_layer_step(i, True), iterations, warmup) - many
            t["dense step" + EVICTED] = median_seconds(lambda i: dense_step(i, True), iterations, warmup) - many
            subtracted = {COLD: one, "clsa step" + EVICTED: many, "clsa step (graph)" + EVICTED: many_graph,
                          "per-layer step" + EVICTED: many, "dense step" + EVICTED: many}
    del caches, fixed_routes, evict_buffer
    torch.cuda.empty_cache()
    return t, subtracted


def merged(paths):
    """The first JSON file with the rows of all of them."""
    result = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if result is None:
            result = data
        else:
            result["rows"] = result["rows"] + data["rows"]
    return result


def fmt(seconds):
    if seconds is None:
        return ""
    if seconds >= 1e-1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def ratio(a, b):
    return f"{a / b:.1f}x" if a and b else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clsa_json", nargs="+", help="output of clsa bench --json (several: rows merged)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the PyTorch timings and ratios here")
    parser.add_argument("--plot", help="write a PNG of step time against context here")
    parser.add_argument("--from-json", nargs="+",
                        help="skip timing: tables and plot from --json files of earlier runs (rows merged)")
    parser.add_argument("--flashinfer", nargs="+",
                        help="output of scripts/bench_flashinfer.py --json (several: rows merged): a third column")
    parser.add_argument("--context", type=int, nargs="+", help="time only these contexts of clsa_json's grid")
    parser.add_argument("--batch", type=int, nargs="+", help="time only these batch sizes of clsa_json's grid")
    parser.add_argument("--markdown", help="write the row-by-row table (libclsa, PyTorch, FlashInfer) here")
    parser.add_argument("--no-evict", action="store_true",
                        help="skip the L2-evicted variants even when clsa_json has them")
    args = parser.parse_args()
    bench = merged(args.clsa_json)
    flashinfer = merged(args.flashinfer) if args.flashinfer else None
    if args.from_json:
        previous = merged(args.from_json)
        if args.markdown:
            write_markdown(bench, previous, flashinfer, args.markdown)
        if args.plot or not args.markdown:
            plot(bench, previous["rows"], args.plot or "step.png", flashinfer)
        return
    if torch is None:
        sys.exit(f"bench_torch.py: PyTorch is not importable ({_torch_error}); timing needs it (--from-json does not)")
    if bench["backend"] != "cuda":
        sys.exit("bench_torch.py compares CUDA runs; this bench ran on " + bench["backend"])
    if not torch.cuda.is_available():
        sys.exit("bench_torch.py: no CUDA device visible to PyTorch")
    shape = bench["shape"]
    clsa = {(r["method"], r["context"], r["batch"]): r["seconds"] for r in bench["rows"]}
    grid = [(c, b) for c, b in sorted({(r["context"], r["batch"]) for r in bench["rows"]})
            if (not args.context or c in args.context) and (not args.batch or b in args.batch)]
    has_evicted = any(r["method"].endswith(EVICTED) or r["method"] == COLD for r in bench["rows"])
    evict_bytes = int(bench.get("evict_l2_bytes", 128 << 20)) if has_evicted and not args.no_evict else 0
    generator = torch.Generator(device="cuda")
    generator.manual_seed(1)
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, same shape and grid as the clsa bench"
          + (f"; L2 stand-in {evict_bytes / (1 << 20):.0f} MiB" if evict_bytes else ""))
    print(f"{'method':<30} {'context':>8} {'B':>4} {'libclsa':>11} {'pytorch':>11} {'torch/clsa':>11}")
    out = []
    for context, batch in grid:
        t, subtracted = run(shape, context, batch, args.iterations, args.warmup, generator, evict_bytes)
        for method, seconds in t.items():
            mine = clsa.get((method, context, batch))
            r = seconds / mine if mine else float("nan")
            print(f"{method:<30} {context:>8} {batch:>4} {fmt(mine):>11} {fmt(seconds):>11} {r:>10.1f}x")
            row = {"method": method, "context": context, "batch": batch, "pytorch_seconds": seconds,
                   "clsa_seconds": mine, "pytorch_over_clsa": r}
            if method in subtracted:
                row["stand_in_seconds"] = subtracted[method]
            out.append(row)
        for suffix in ("", EVICTED):
            eager, graph = t.get("clsa step" + suffix), t.get("clsa step (graph)" + suffix)
            mine = clsa.get(("clsa step (graph)" + suffix, context, batch))
            if eager and graph:
                print(f"  clsa step{suffix}: PyTorch eager {fmt(eager)}, graph {fmt(graph)} (eager/graph "
                      f"{eager / graph:.2f}x); headline, graph vs graph: PyTorch/libclsa {ratio(graph, mine)}")
        print(flush=True)
        if args.json:  # after every point, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                           "evict_l2_bytes": evict_bytes, "rows": out}, f, indent=1)
    torch_json = {"rows": out}
    if args.markdown:
        write_markdown(bench, torch_json, flashinfer, args.markdown)
    if args.plot:
        plot(bench, out, args.plot, flashinfer)


def write_markdown(bench, torch_json, flashinfer, path):
    """libclsa's rows (in the bench's order) with the PyTorch and FlashInfer time of the same method,
    each peer's time over libclsa's, and libclsa's floor bytes and x floor."""
    bandwidth = bench.get("copy_bandwidth_bytes_per_s")
    peer_t = {(r["method"], r["context"], r["batch"]): r["pytorch_seconds"] for r in torch_json["rows"]}
    peer_f = {}
    if flashinfer:
        peer_f = {(r["method"], r["context"], r["batch"]): r["seconds"] for r in flashinfer["rows"]}
    lines = [
        f"Copy bandwidth {bandwidth / 1e9:.0f} GB/s; x floor = time / (floor bytes / copy bandwidth); "
        f"peer/x = the peer's time over libclsa's, same method: steps eager with eager, graph with graph; "
        f"the component rows (indexer, layers) are eager launches for libclsa and PyTorch, graph replays for "
        f"FlashInfer." if bandwidth else "",
        "",
        "| method | N | B | libclsa | floor bytes | x floor | PyTorch | PyTorch/x | FlashInfer | FlashInfer/x |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in bench["rows"]:
        key = (r["method"], r["context"], r["batch"])
        floor = r["floor_bytes"]
        floor_text = f"{floor / 1e9:.2f} GB" if floor >= 1e9 else f"{floor / 1e6:.1f} MB"
        x_floor = r.get("x_floor") or (r["seconds"] * bandwidth / floor if bandwidth else None)
        t, f = peer_t.get(key), peer_f.get(key)
        lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {fmt(r['seconds'])} | {floor_text} | "
                     f"{f'{x_floor:.2f}x' if x_floor else ''} | {fmt(t)} | {ratio(t, r['seconds'])} | "
                     f"{fmt(f)} | {ratio(f, r['seconds'])} |")
    # FlashInfer's parts that libclsa has no row for.
    if flashinfer:
        methods = {r["method"] for r in bench["rows"]}
        extra = [r for r in flashinfer["rows"] if r["method"] not in methods]
        if extra:
            lines += ["", f"FlashInfer {flashinfer.get('flashinfer', '')} parts and variants:", "",
                      "| method | N | B | time | x floor | decode |", "| --- | ---: | ---: | ---: | ---: | --- |"]
            for r in extra:
                x = r.get("x_floor")
                lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {fmt(r['seconds'])} | "
                             f"{f'{x:.2f}x' if x else ''} | {r.get('decode', '')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def plot(bench, torch_rows, path, flashinfer=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        sys.exit(f"bench_torch.py: the plot needs matplotlib ({error})")

    batches = sorted({r["batch"] for r in bench["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method, style in (("dense step", "o-"), ("per-layer step", "s-"), ("clsa step", "^-")):
            rows = sorted((r["context"], r["seconds"]) for r in bench["rows"] if r["method"] == method and r["batch"] == batch)
            trows = sorted((r["context"], r["pytorch_seconds"]) for r in torch_rows
                           if r["method"] == method and r["batch"] == batch)
            label = method
            if method == "clsa step":
                # Graph replays on both sides where both have them (older torch JSON: eager).
                graph = {r["context"]: r["seconds"] for r in bench["rows"]
                         if r["method"] == "clsa step (graph)" and r["batch"] == batch}
                rows = [(c, graph.get(c, s)) for c, s in rows]
                tgraph = {r["context"]: r["pytorch_seconds"] for r in torch_rows
                          if r["method"] == "clsa step (graph)" and r["batch"] == batch}
                trows = [(c, tgraph.get(c, s)) for c, s in trows]
                label = "clsa step (graph)" if graph else method
            ax.plot([c for c, _ in rows], [s * 1e3 for _, s in rows], style, label="libclsa " + label)
            ax.plot([c for c, _ in trows], [s * 1e3 for _, s in trows], marker=style[0], alpha=0.4, linestyle="--",
                    label="PyTorch " + label)
        if flashinfer:
            frows = sorted((r["context"], r["seconds"]) for r in flashinfer["rows"]
                           if r["method"] == "clsa step (graph)" and r["batch"] == batch)
            ax.plot([c for c, _ in frows], [s * 1e3 for _, s in frows], marker="v", alpha=0.6, linestyle=":",
                    label="FlashInfer clsa step (graph)")
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
