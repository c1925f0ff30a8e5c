#!/usr/bin/env python3
"""The CLSA decoding step composed from FlashInfer 0.7.2, the way an engine author would build it
today without libclsa, timed like `clsa bench` and set beside it (scripts/bench_torch.py joins the
three).

    clsa bench --json bench.json
    python3 scripts/bench_flashinfer.py bench.json --json flashinfer.json
    python3 scripts/bench_torch.py bench.json --json torch.json --flashinfer flashinfer.json --markdown peers.md

The composition (one decoding step, T = 1, for each sequence of the batch):
  indexer      PyTorch, as in bench_torch.py: einsum + ReLU + weighted head sum -> [B, N] f32 scores
  top-k        flashinfer.top_k_page_table_transform(scores, page_table, lengths, k, out=kv_indices):
               with page_table[b] = b*N + arange(N) its output is directly the page_size = 1
               kv_indices of a token-level cache: routed token j of sequence b is page b*N + j
  L layers     one flashinfer.BatchDecodeWithPagedKVCacheWrapper (use_cuda_graph=True, "NHD",
               its paged_kv_indices_buffer IS kv_indices), planned once per step (host, outside the
               graph, indptr = arange(B+1)*k, last_page_len = 1), run once per layer
All of a step (indexer, top-k, L runs) is one CUDA graph, replayed per step after the plan. The
decode wrapper is timed with CUDA cores and with tensor cores (--tensor-cores both, the default);
the faster is the headline "clsa step (graph)" and serves the other rows. Unlike libclsa this
routes a plain top-k (no forced sinks and local window): the same amount of work.

Rows (method names as in `clsa bench`, so the tables join on them):
  indexer scores (PyTorch)  the PyTorch indexer alone (graph)
  top-k transform           top_k_page_table_transform alone, on fixed scores (graph)
  indexer (select)          both (graph)
  sparse layer              one wrapper.run (graph)
  clsa step (graph)         indexer + top-k + L runs, one graph; the per-step plan() not counted
  clsa step (graph) + plan  the same with plan() inside the timed interval (host work included)
  plan (host)               plan() alone, host wall clock
  sparse layer (cold L2), clsa step (graph) (L2 evicted)
                            with the feed-forward stand-in of `clsa bench --evict-l2-mb` (a
                            device-to-device copy of half of an N MiB buffer onto its other half,
                            before each layer's work: before the indexer and before layers 1..L-1),
                            its own time (the same copies alone, in a graph) subtracted
Before timing, small steps (B=3, N=5000 and B=2, N=40000: the top-k's native and CUB paths) are
replayed from their graphs after new inputs and a re-plan and checked against a plain PyTorch
reference (torch.topk on the same scores, gather + softmax in f32); a wrong composition fails
with an AssertionError.

Installing FlashInfer (the wheels are in ../shared/peers/flashinfer/, see its README.md; the
folder .whl/ of the working tree is git-ignored). The wheel is FlashInfer 0.7.2.post1 repacked with
prebuilt sm_90a modules for the top-k, bf16 head_dim 128 decode and prefill (tensor-core decode):
other shapes or dtypes would JIT-compile for minutes. Its one import-time dependency missing from
the GPU machine is apache-tvm-ffi (the other wheel); --no-deps keeps pip from resolving the rest,
which the machine has or flashinfer does not import for these modules:

    mkdir -p .whl && cp ../shared/peers/flashinfer/*.whl .whl/       # here, before the run
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site FLASHINFER_WORKSPACE_BASE=/tmp FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
"""
import argparse
import json
import math
import os
import sys
import time

MIB = 1 << 20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clsa_json", nargs="*",
                        help="output of clsa bench --json (several: rows merged): shape, contexts x batches, L2 "
                        "stand-in size, copy bandwidth")
    parser.add_argument("--context", type=int, nargs="+",
                        help="contexts (default: those of clsa_json, else 8192 32768 131072)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: those of clsa_json, else 1 8 32)")
    parser.add_argument("--iterations", type=int, default=30, help="timed runs per row (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--evict-l2-mb", type=int, default=None,
                        help="L2 stand-in buffer in MiB (default: clsa_json's evict_l2_bytes, else 128; 0: off)")
    parser.add_argument("--tensor-cores", choices=["off", "on", "both"], default="both",
                        help="decode wrapper's use_tensor_cores: False, True, or time both and keep the faster")
    parser.add_argument("--check-only", action="store_true", help="only run the numerical check")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if args.evict_l2_mb is not None and args.evict_l2_mb < 0:
        parser.error("--evict-l2-mb must be >= 0")
    return args


def import_peers():
    """torch and flashinfer, or a clear exit."""
    try:
        import torch
    except ImportError as error:
        sys.exit(f"bench_flashinfer.py: PyTorch is not importable ({error}); run this on the GPU machine's python3")
    if not torch.cuda.is_available():
        sys.exit("bench_flashinfer.py: no CUDA device visible to PyTorch; FlashInfer's kernels need one")
    # What ../shared/peers/flashinfer/README.md exports, unless the caller set it.
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp")
    if torch.cuda.get_device_capability() == (9, 0):
        os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0")
    try:
        import flashinfer
    except Exception as error:  # ImportError, or whatever its import-time checks raise
        sys.exit(f"bench_flashinfer.py: flashinfer is not importable ({type(error).__name__}: {error}).\n"
                 "Install the wheels first (see the top of this script):\n"
                 "    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                 "--target /tmp/site .whl/*.whl\n"
                 "    export PYTHONPATH=/tmp/site FLASHINFER_WORKSPACE_BASE=/tmp FLASHINFER_CUDA_ARCH_LIST=9.0 "
                 "MAX_JOBS=16")
    return torch, flashinfer


def median(samples):
    samples = sorted(samples)
    n = len(samples)
    return samples[n // 2] if n % 2 else 0.5 * (samples[n // 2 - 1] + samples[n // 2])


class Bench:
    """Everything that needs torch and flashinfer (imported lazily so that --help and the
    'not importable' exits work anywhere)."""

    def __init__(self, torch, flashinfer, shape, iterations, warmup, evict_bytes):
        self.torch, self.fi = torch, flashinfer
        self.shape = shape
        self.iterations, self.warmup = iterations, warmup
        self.device = torch.device("cuda")
        self.generator = torch.Generator(device="cuda")
        self.generator.manual_seed(1)
        # The feed-forward stand-in: the same copy as `clsa bench` (ATen issues cudaMemcpyAsync
        # device-to-device for a contiguous same-dtype copy_ on one device).
        self.half = evict_bytes // 8 * 4
        self.evict_buffer = torch.zeros(2 * self.half, dtype=torch.uint8, device=self.device) if self.half else None

    @property
    def evict_bytes(self):
        return 2 * self.half

    def stand_in(self):
        self.evict_buffer[self.half:].copy_(self.evict_buffer[:self.half])

    # ---- timing -------------------------------------------------------------------------------
    def event_seconds(self, fn, before=None):
        """Median seconds of fn(i) between CUDA events on the current stream; before(i), if given,
        runs first, outside the timed interval."""
        torch = self.torch
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        samples = []
        for i in range(self.warmup + self.iterations):
            if before is not None:
                before(i)
            start.record()
            fn(i)
            stop.record()
            stop.synchronize()
            if i >= self.warmup:
                samples.append(start.elapsed_time(stop) * 1e-3)
        return median(samples)

    def capture(self, fn, replicas):
        """fn(r) captured as one CUDA graph per replica, after a warm-up on a side stream (as
        PyTorch documents). Returns the graphs and what fn returned during each capture."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(max(2, self.warmup)):
                fn(i % replicas)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs, results = [], []
        for r in range(replicas):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                results.append(fn(r))
            graphs.append(graph)
        torch.cuda.synchronize()
        return graphs, results

    def graph_seconds(self, fn, replicas, before=None):
        graphs, _ = self.capture(fn, replicas)
        seconds = self.event_seconds(lambda i: graphs[i % replicas].replay(), before)
        del graphs
        return seconds


class Data:
    """Random inputs of one (context, batch): `replicas` caches so that a step's data exceeds the L2
    several times over (as clsa bench and bench_torch.py rotate them)."""

    def __init__(self, bench, context, batch, replicas, q_scale=0.3):
        torch, s = bench.torch, bench.shape
        g, dev, bf16 = bench.generator, bench.device, torch.bfloat16
        self.torch = torch
        self.context, self.batch, self.replicas = context, batch, replicas
        hkv, d, di = s["kv_heads"], s["head_dim"], s["index_dim"]
        # NHD pages of one token: [B*N, 1, Hkv, D]; page b*N + j is token j of sequence b.
        self.k = [torch.randn(batch * context, 1, hkv, d, device=dev, dtype=bf16, generator=g) for _ in range(replicas)]
        self.v = [torch.randn(batch * context, 1, hkv, d, device=dev, dtype=bf16, generator=g) for _ in range(replicas)]
        self.ki = [torch.randn(batch, context, di, device=dev, dtype=bf16, generator=g) for _ in range(replicas)]
        self.q_idx = torch.randn(batch, s["index_heads"], di, device=dev, dtype=bf16, generator=g)
        self.w = torch.rand(batch, s["index_heads"], device=dev, dtype=torch.float32, generator=g) + 0.01
        self.queries = [q_scale * torch.randn(batch, s["q_heads"], d, device=dev, dtype=bf16, generator=g)
                        for _ in range(s["layers"])]
        self.page_table = (torch.arange(batch, device=dev, dtype=torch.int32)[:, None] * context
                           + torch.arange(context, device=dev, dtype=torch.int32)[None, :]).contiguous()
        self.lengths = torch.full((batch,), context, device=dev, dtype=torch.int32)
        self.scale = 1.0 / math.sqrt(di)

    def scores(self, r):
        """The PyTorch indexer of bench_torch.py: [B, N] f32."""
        scores = self.torch.einsum("bhd,bnd->bhn", self.q_idx, self.ki[r]).float().relu_()
        return (scores * self.w[:, :, None]).sum(1) * self.scale


class Composition:
    """FlashInfer's top-k + one decode wrapper over `data`, for one use_tensor_cores setting."""

    def __init__(self, bench, data, tensor_cores):
        torch, fi, s = bench.torch, bench.fi, bench.shape
        self.bench, self.data, self.tensor_cores = bench, data, tensor_cores
        batch, dev = data.batch, bench.device
        self.k_routed = min(s["top_k"], data.context)
        self.kv_indices = torch.zeros(batch * self.k_routed, dtype=torch.int32, device=dev)
        self.topk_out = self.kv_indices.view(batch, self.k_routed)
        self.indptr_host = torch.arange(batch + 1, dtype=torch.int32) * self.k_routed
        self.last_page_len_host = torch.ones(batch, dtype=torch.int32)
        self.indptr = self.indptr_host.to(dev)
        self.last_page_len = self.last_page_len_host.to(dev)
        self.workspace = torch.zeros(128 * MIB, dtype=torch.uint8, device=dev)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.kv_indices,
            paged_kv_last_page_len_buffer=self.last_page_len)
        self.outs = [torch.empty_like(q) for q in data.queries]
        self.plan()

    @property
    def name(self):
        return "tensor-core decode" if self.tensor_cores else "cuda-core decode"

    def plan(self, i=0):
        s = self.bench.shape
        self.wrapper.plan(self.indptr_host, self.kv_indices, self.last_page_len_host,
                          num_qo_heads=s["q_heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                          page_size=1, pos_encoding_mode="NONE", q_data_type=self.bench.torch.bfloat16,
                          kv_data_type=self.bench.torch.bfloat16)

    def top_k(self, scores):
        d = self.data
        return self.bench.fi.top_k_page_table_transform(scores, d.page_table, d.lengths, self.k_routed,
                                                        out=self.topk_out)

    def layer(self, r, l):
        d = self.data
        self.wrapper.run(d.queries[l], (d.k[r], d.v[r]), out=self.outs[l])

    def step(self, r, evict=False):
        """One decoding step; with `evict`, the stand-in before each layer's work."""
        if evict:
            self.bench.stand_in()
        scores = self.data.scores(r)
        self.top_k(scores)
        for l in range(len(self.outs)):
            if evict and l > 0:
                self.bench.stand_in()
            self.layer(r, l)
        return scores


def check(bench, tensor_cores, batch, context):
    """A small step through the graph path against a plain PyTorch reference; raises AssertionError."""
    torch, s = bench.torch, bench.shape
    data = Data(bench, context, batch, 1, q_scale=1.0)
    comp = Composition(bench, data, tensor_cores)
    k = comp.k_routed
    graphs, results = bench.capture(lambda r: comp.step(r), 1)
    evicted = bench.capture(lambda r: comp.step(r, evict=True), 1)[0] if bench.half else None
    # New inputs after capture (same addresses), re-plan, replay: what every timed step does.
    for tensor in data.queries + [data.q_idx]:
        tensor.copy_(torch.randn(tensor.shape, device=tensor.device, dtype=tensor.dtype, generator=bench.generator))
    comp.plan()
    graphs[0].replay()
    torch.cuda.synchronize()
    scores = results[0]  # the graph's own scores tensor, rewritten by the replay
    assert torch.allclose(scores, data.scores(0), rtol=2e-2, atol=2e-2), "the graph did not recompute the scores"

    base = torch.arange(batch, device=scores.device)[:, None] * context

    def check_routing():
        positions = comp.topk_out.long() - base
        assert bool(((positions >= 0) & (positions < context)).all()), \
            f"top_k_page_table_transform: pages outside each sequence's: {comp.topk_out[:, :8].tolist()}"
        assert all(len(set(row)) == k for row in positions.tolist()), "top_k_page_table_transform: repeated pages"
        got = torch.gather(scores, 1, positions).sort(dim=-1, descending=True).values
        assert torch.equal(got, ref_values), "top_k_page_table_transform did not route each row's top-k scores"

    # The plain reference: torch.topk on the same scores, gather, softmax in f32.
    ref_values, ref_positions = torch.topk(scores, k, dim=-1)
    hkv, d, hq = s["kv_heads"], s["head_dim"], s["q_heads"]
    phys = (ref_positions + base).reshape(-1)
    keys = data.k[0][phys, 0].float().view(batch, k, hkv, d)
    values = data.v[0][phys, 0].float().view(batch, k, hkv, d)
    refs = []
    for q in data.queries:
        logits = torch.einsum("bhgd,bkhd->bhgk", q.float().view(batch, hkv, hq // hkv, d), keys) / math.sqrt(d)
        refs.append(torch.einsum("bhgk,bkhd->bhgd", logits.softmax(-1), values).reshape(batch, hq, d))

    def check_outputs(what):
        worst = 0.0
        for l, ref in enumerate(refs):
            got = comp.outs[l].float()
            error = ((got - ref).norm() / ref.norm()).item()
            worst = max(worst, error)
            assert error < 1e-2 and (got - ref).abs().max().item() < 2e-2 * ref.abs().max().item() + 1e-3, \
                f"{comp.name}, {what}, layer {l}: relative error {error:.3g} against gather + softmax"
        return worst

    check_routing()
    worst = check_outputs("step graph")
    if evicted is not None:
        for o in comp.outs:
            o.zero_()
        comp.topk_out.fill_(-1)
        comp.plan()
        evicted[0].replay()
        torch.cuda.synchronize()
        check_routing()
        worst = max(worst, check_outputs("step graph with the L2 stand-in"))
    print(f"check ({comp.name}, B={batch}, N={context}, k={k}, {s['layers']} layers, graph replayed after new "
          f"inputs and a re-plan): routed set = torch.topk's; outputs vs gather + softmax: relative error "
          f"<= {worst:.2e}: ok", flush=True)
    del graphs, evicted, results, comp, data
    torch.cuda.synchronize()


def run_point(bench, context, batch, variants, copy_bandwidth):
    """Rows of one (context, batch)."""
    torch, s = bench.torch, bench.shape
    L = s["layers"]
    bytes_per_step = batch * context * (2 * s["kv_heads"] * s["head_dim"] + s["index_dim"]) * 2
    replicas = max(1, math.ceil(4 * 50e6 / bytes_per_step))
    data = Data(bench, context, batch, replicas)
    k_routed = min(s["top_k"], context)
    index_bytes = batch * context * s["index_dim"] * 2
    sparse_bytes = batch * k_routed * s["kv_heads"] * s["head_dim"] * 2 * 2
    step_bytes = index_bytes + L * sparse_bytes
    rows = []

    def row(method, seconds, floor=None, decode=None, stand_in=0.0):
        entry = {"method": method, "context": context, "batch": batch, "seconds": seconds}
        if floor is not None:
            entry["floor_bytes"] = floor
            if copy_bandwidth:
                entry["x_floor"] = seconds * copy_bandwidth / floor
        if decode:
            entry["decode"] = decode
        if stand_in:
            entry["stand_in_seconds"] = stand_in
        rows.append(entry)
        print(f"{method:<34} {context:>8} {batch:>4} {seconds * 1e6:>11.1f} us"
              + (f"  {entry['x_floor']:6.2f}x floor" if "x_floor" in entry else "")
              + (f"  ({decode})" if decode else ""), flush=True)

    # The step with each decode variant, planned once per step; the faster serves the other rows.
    steps = {}
    for tensor_cores in variants:
        comp = Composition(bench, data, tensor_cores)
        steps[tensor_cores] = (bench.graph_seconds(lambda r: comp.step(r), replicas, before=comp.plan), comp)
        if len(variants) > 1:
            row(f"clsa step (graph), {comp.name}", steps[tensor_cores][0], step_bytes, comp.name)
    seconds, comp = steps[min(steps, key=lambda tc: steps[tc][0])]
    steps = None  # frees the slower variant's wrapper
    row("clsa step (graph)", seconds, step_bytes, comp.name)

    # plan() inside the timed interval (its host work shows as idle device time), and alone.
    graphs, _ = bench.capture(lambda r: comp.step(r), replicas)

    def planned_replay(i):
        comp.plan()
        graphs[i % replicas].replay()

    row("clsa step (graph) + plan", bench.event_seconds(planned_replay), step_bytes, comp.name)
    plan_samples = []
    for i in range(bench.warmup + bench.iterations):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        comp.plan()
        if i >= bench.warmup:
            plan_samples.append(time.perf_counter() - begin)
    torch.cuda.synchronize()
    row("plan (host)", median(plan_samples), None, comp.name)
    del graphs

    # The parts, each its own graph.
    row("indexer scores (PyTorch)", bench.graph_seconds(lambda r: data.scores(r), replicas), index_bytes)
    fixed_scores = [data.scores(r) for r in range(replicas)]
    row("top-k transform", bench.graph_seconds(lambda r: comp.top_k(fixed_scores[r]), replicas))
    del fixed_scores
    row("indexer (select)", bench.graph_seconds(lambda r: comp.top_k(data.scores(r)), replicas), index_bytes)
    comp.plan()
    comp.top_k(data.scores(0))  # kv_indices: a valid routing for the layer-alone rows
    row("sparse layer", bench.graph_seconds(lambda r: comp.layer(r, 0), replicas), sparse_bytes, comp.name)

    if bench.half:
        one = bench.graph_seconds(lambda r: bench.stand_in(), replicas)

        def stand_ins(r):
            for _ in range(L):
                bench.stand_in()

        many = bench.graph_seconds(stand_ins, replicas)

        def cold_layer(r):
            bench.stand_in()
            comp.layer(r, 0)

        row("sparse layer (cold L2)", bench.graph_seconds(cold_layer, replicas) - one, sparse_bytes, comp.name, one)
        evicted = bench.graph_seconds(lambda r: comp.step(r, evict=True), replicas, before=comp.plan)
        row("clsa step (graph) (L2 evicted)", evicted - many, step_bytes, comp.name, many)
    del comp, steps, data
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return rows


def main():
    args = parse_args()
    bench_json = None
    for path in args.clsa_json:
        with open(path) as f:
            data = json.load(f)
        if bench_json is None:
            bench_json = data
        else:
            bench_json["rows"] += data["rows"]
    shape = dict(layers=16, q_heads=32, kv_heads=8, head_dim=128, index_heads=16, index_dim=128, top_k=2048)
    contexts, batches = [8192, 32768, 131072], [1, 8, 32]
    evict_bytes = 128 * MIB
    copy_bandwidth = None
    grid = None
    if bench_json:
        shape.update(bench_json["shape"])
        grid = sorted({(r["context"], r["batch"]) for r in bench_json["rows"]})
        evict_bytes = int(bench_json.get("evict_l2_bytes", evict_bytes))
        if bench_json.get("backend") == "cuda":
            copy_bandwidth = bench_json.get("copy_bandwidth_bytes_per_s")
        if bench_json.get("dtype", "bf16") != "bf16":
            sys.exit("bench_flashinfer.py: the FlashInfer wheel has bf16 modules prebuilt; this bench ran "
                     + bench_json["dtype"])
    if args.context or args.batch or grid is None:
        contexts = args.context or sorted({c for c, _ in grid or []}) or contexts
        batches = args.batch or sorted({b for _, b in grid or []}) or batches
        grid = [(c, b) for c in contexts for b in batches]
    if args.evict_l2_mb is not None:
        evict_bytes = args.evict_l2_mb * MIB
    if shape["head_dim"] != 128 or shape["q_heads"] % shape["kv_heads"]:
        sys.exit(f"bench_flashinfer.py: the wheel's decode modules are for head_dim 128 (shape: {shape})")
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.tensor_cores]

    torch, flashinfer = import_peers()
    bench = Bench(torch, flashinfer, shape, args.iterations, args.warmup, evict_bytes)
    device = torch.cuda.get_device_name()
    print(f"FlashInfer {flashinfer.__version__} + PyTorch {torch.__version__} on {device}; shape {shape}; "
          f"L2 stand-in {bench.evict_bytes / MIB:.0f} MiB" + (" (off)" if not bench.half else ""), flush=True)
    # Two sizes: the top-k takes its native path at the first and CUB under graph capture at the
    # second (its dispatch depends on the row length), as the timed contexts do.
    for tensor_cores in variants:
        for batch, context in ((3, 5000), (2, 40000)):
            check(bench, tensor_cores, batch, context)
    if args.check_only:
        return
    print(f"{'method':<34} {'context':>8} {'B':>4} {'time':>14}")
    rows = []
    for context, batch in grid:
        rows += run_point(bench, context, batch, variants, copy_bandwidth)
        print(flush=True)
        if args.json:  # after every point, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"flashinfer": flashinfer.__version__, "torch": torch.__version__, "device": device,
                           "shape": shape, "dtype": "bf16", "evict_l2_bytes": bench.evict_bytes,
                           "copy_bandwidth_bytes_per_s": copy_bandwidth, "iterations": args.iterations,
                           "warmup": args.warmup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
