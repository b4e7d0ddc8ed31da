#!/usr/bin/env python3
"""The shapes of benches/kernels.rs timed with PyTorch on the same GPU, for comparison.

pack -> torch.index_select(src, 0, idx, out=dst); unpack copy -> dst.index_copy_(0, idx, src);
unpack weighted -> dst.index_copy_(0, idx, src * w[:, None]); unpack weighted+acc ->
dst.index_add_(0, idx, src * w[:, None]); scatter_add -> dense.index_add_(0, idx, val);
casts -> y.copy_(x) across dtypes; scale_add -> y.add_(x, alpha=a).

Columns as in the Rust bench: bytes = minimum traffic (read + written), GB/s = bytes / time,
vs_copy = that bandwidth over a device-to-device copy_ moving the same traffic, measured in this run.
Times are torch.cuda.Event medians of ITERS runs after WARMUP. Prints a table and one
`RESULT {json}` line; writes $OUT/torch_kernels.json when OUT is set.
FERROCCL_BENCH_QUICK=1 for small shapes.
"""
import json
import os

import torch

WARMUP = 5
ITERS = 25


def time_ms(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(ITERS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


_copy_cache = {}


def copy_ms(traffic):
    if traffic not in _copy_cache:
        n = max(traffic // 2, 1)
        a = torch.zeros(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        _copy_cache[traffic] = time_ms(lambda: b.copy_(a))
        del a, b
    return _copy_cache[traffic]


def main():
    quick = os.environ.get("FERROCCL_BENCH_QUICK") == "1"
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(7)
    rows = []

    def push(kernel, shape, nbytes, ms):
        rows.append(
            dict(kernel=kernel, shape=shape, bytes=int(nbytes), time_ms=ms, copy_ms=copy_ms(int(nbytes)))
        )

    shapes = [(16384, 4096), (65536, 256)] if quick else [
        (262144, 4096), (65536, 4096), (262144, 1024), (1048576, 256), (32768, 7168)]
    for n_rows, row_bytes in shapes:
        row_len = row_bytes // 4
        shape = f"{n_rows}x{row_bytes}B"
        payload = n_rows * row_bytes
        idx = torch.randperm(n_rows, generator=g).to(dev)
        src = torch.zeros(n_rows, row_len, dtype=torch.float32, device=dev)
        dst = torch.zeros_like(src)
        w = torch.rand(n_rows, generator=g).to(dev)
        idx_b, w_b = 4 * n_rows, 4 * n_rows  # bytes of u32 indices / f32 weights, as in the Rust bench
        push("pack (gather_rows)", shape, 2 * payload + idx_b,
             time_ms(lambda: torch.index_select(src, 0, idx, out=dst)))
        push("unpack copy (scatter_rows)", shape, 2 * payload + idx_b,
             time_ms(lambda: dst.index_copy_(0, idx, src)))
        push("unpack weighted f32", shape, 2 * payload + idx_b + w_b,
             time_ms(lambda: dst.index_copy_(0, idx, src * w[:, None])))
        push("unpack weighted+acc f32", shape, 3 * payload + idx_b + w_b,
             time_ms(lambda: dst.index_add_(0, idx, src * w[:, None])))
        del src, dst
        src = torch.zeros(n_rows, row_bytes // 2, dtype=torch.bfloat16, device=dev)
        dst = torch.zeros_like(src)
        wb = w.to(torch.bfloat16)
        push("unpack weighted+acc bf16", shape, 3 * payload + idx_b + w_b,
             time_ms(lambda: dst.index_add_(0, idx, src * wb[:, None])))
        push("pack bf16", shape, 2 * payload + idx_b,
             time_ms(lambda: torch.index_select(src, 0, idx, out=dst)))
        del src, dst, idx, w, wb

    for n in ([1 << 20] if quick else [25_500_000, 100_000_000]):
        pairs = n // 100
        idx = torch.randperm(n, generator=g)[:pairs].to(dev)
        val = (torch.rand(pairs, generator=g) * 2 - 1).to(dev)
        dense = torch.zeros(n, dtype=torch.float32, device=dev)
        push("scatter_add 1%", str(n), 16 * pairs, time_ms(lambda: dense.index_add_(0, idx, val)))
        del idx, val, dense

    n = (1 << 22) if quick else 100_000_000
    x = torch.zeros(n, dtype=torch.float32, device=dev)
    y = torch.zeros_like(x)
    h = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    push("cast f32->bf16", str(n), 6 * n, time_ms(lambda: h.copy_(x)))
    push("cast bf16->f32", str(n), 6 * n, time_ms(lambda: y.copy_(h)))
    push("scale_add", str(n), 12 * n, time_ms(lambda: y.add_(x, alpha=0.5)))
    torch.cuda.synchronize()

    print(f"{'kernel':<28} {'shape':>14} {'bytes':>14} {'time_ms':>10} {'GB/s':>9} {'vs_copy':>8}")
    for r in rows:
        r["gbps"] = r["bytes"] / (r["time_ms"] * 1e-3) / 1e9
        r["vs_copy"] = r["copy_ms"] / r["time_ms"]
        print(f"{r['kernel']:<28} {r['shape']:>14} {r['bytes']:>14} {r['time_ms']:>10.4f} "
              f"{r['gbps']:>9.1f} {r['vs_copy']:>8.3f}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, iters=ITERS, rows=rows)
    print("RESULT " + json.dumps(result))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "torch_kernels.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
