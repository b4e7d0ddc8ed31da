#!/usr/bin/env python3
"""torch.distributed (NCCL) timing of the collectives ferroccl's `collectives` bench times, same sizes
and columns as nccl-tests, one process per GPU.

    torchrun --standalone --nproc-per-node 4 benches/torch_dist.py --op all_reduce,all_gather -b 8 -e 1G
    # or started by a script: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment

Sizes follow nccl-tests: `size` is the larger of the send and receive buffers in bytes, `count` the
per-rank count (recv count of reduce_scatter, send count of all_gather, per-peer block of
all_to_all); busbw factors as nccl-tests (all_reduce 2(n-1)/n; reduce_scatter, all_gather, all_to_all
(n-1)/n; broadcast 1). Time per op: `iters` back-to-back blocking calls after a barrier (each call
followed by a stream synchronize, as ferroccl's blocking calls wait for completion; `--no-sync-each`
enqueues them all and synchronizes once, as nccl-tests does), max over ranks. Rank 0 prints the
table and one `RESULT {json}` line, and writes `--json FILE`.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

# NVLink multicast must stay off on the shared machines (KINDS.md).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

OPS = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all"]
DTYPES = {
    "float": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "double": torch.float64, "f64": torch.float64,
    "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int32": torch.int32, "i32": torch.int32,
    "int64": torch.int64, "i64": torch.int64,
    "uint8": torch.uint8, "u8": torch.uint8,
}


def parse_size(s):
    t = s.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def bus_factor(op, n):
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    return 1.0


def layout(op, nbytes, elt, n):
    whole = max(nbytes // elt, 1)
    split = max(nbytes // elt // n, 1)
    if op in ("all_reduce", "reduce"):
        count, send, recv = whole, whole, whole
    elif op == "broadcast":
        count, send, recv = whole, 0, whole
    elif op == "reduce_scatter":
        count, send, recv = split, n * split, split
    elif op == "all_gather":
        count, send, recv = split, split, n * split
    else:  # all_to_all
        count, send, recv = split, n * split, n * split
    return count, send, recv, max(send, recv) * elt


def make_call(op, send, recv, root):
    if op == "all_reduce":
        return lambda: dist.all_reduce(recv)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(recv, send)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(recv, send)
    if op == "broadcast":
        return lambda: dist.broadcast(recv, root)
    if op == "reduce":
        return lambda: dist.reduce(recv, root)
    return lambda: dist.all_to_all_single(recv, send)


def fmt_time(us):
    if us >= 10000:
        return f"{us:7.0f}"
    if us >= 100:
        return f"{us:7.1f}"
    return f"{us:7.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="all_reduce", help="comma-separated ops, or all")
    ap.add_argument("-b", "--minbytes", default="8")
    ap.add_argument("-e", "--maxbytes", default="64M")
    ap.add_argument("-f", "--stepfactor", type=int, default=2)
    ap.add_argument("-n", "--iters", type=int, default=20)
    ap.add_argument("-w", "--warmup", type=int, default=5)
    ap.add_argument("-d", "--datatype", default="float")
    ap.add_argument("-r", "--root", type=int, default=0)
    ap.add_argument("--no-sync-each", action="store_true",
                    help="enqueue the iterations and synchronize once (nccl-tests' way)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="torch")
    a = ap.parse_args()

    ops = OPS if a.op == "all" else [o.strip() for o in a.op.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            sys.exit(f"torch_dist.py: unknown op {o!r} (one of {', '.join(OPS)})")
    dtype = DTYPES[a.datatype]
    elt = torch.tensor([], dtype=dtype).element_size()
    sizes = []
    s = parse_size(a.minbytes)
    while s <= parse_size(a.maxbytes):
        sizes.append(s)
        s *= a.stepfactor

    local = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    rank, n = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    stream = torch.cuda.current_stream()

    if lead:
        print(f"# torch.distributed {torch.__version__} NCCL {'.'.join(map(str, torch.cuda.nccl.version()))} "
              f"world {n} ops {','.join(ops)} minBytes {sizes[0]} maxBytes {sizes[-1]} step {a.stepfactor}(factor) "
              f"warmup {a.warmup} iters {a.iters} sync_each {int(not a.no_sync_each)} "
              f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)
    rows = []
    for op in ops:
        if lead:
            print("#\n# " + op)
            print("#       size         count      type   redop    root     time   algbw   busbw")
            print("#        (B)    (elements)                               (us)  (GB/s)  (GB/s)", flush=True)
        busbws = []
        for nbytes in sizes:
            count, ns, nr, size = layout(op, nbytes, elt, n)
            send = torch.ones(max(ns, 1), dtype=dtype, device=dev)[:ns] if ns else None
            recv = torch.ones(nr, dtype=dtype, device=dev)
            call = make_call(op, send, recv, a.root)
            for _ in range(a.warmup):
                call()
            torch.cuda.synchronize()
            dist.barrier(device_ids=[local])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                call()
                if not a.no_sync_each:
                    stream.synchronize()
            torch.cuda.synchronize()
            t = (time.perf_counter() - t0) / a.iters
            tt = torch.tensor([t], dtype=torch.float64, device=dev)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            t = tt.item()
            algbw = size / 1e9 / t
            busbw = algbw * bus_factor(op, n)
            busbws.append(busbw)
            redop = "sum" if op in ("all_reduce", "reduce_scatter", "reduce") else "none"
            root = a.root if op in ("broadcast", "reduce") else -1
            rows.append(dict(op=op, size=size, count=count, type=a.datatype, redop=redop, root=root,
                             time_us=t * 1e6, algbw_gbps=algbw, busbw_gbps=busbw))
            if lead:
                print(f"{size:>12}  {count:>12}  {a.datatype:>8}  {redop:>6}  {root:>6}  {fmt_time(t * 1e6)}  "
                      f"{algbw:>6.2f}  {busbw:>6.2f}", flush=True)
            del send, recv
        if lead:
            print(f"# Avg bus bandwidth    : {sum(busbws) / max(len(busbws), 1):.6g}", flush=True)
    doc = dict(bench=a.label, world=n, iters=a.iters, warmup=a.warmup, sync_each=not a.no_sync_each,
               torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())),
               env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE",
                                                   "NCCL_NET", "NCCL_SOCKET_IFNAME")},
               rows=rows)
    if lead:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
            print(f"# wrote {a.json}")
        print("RESULT " + json.dumps(dict(bench=a.label, world=n, ops=ops, rows=len(rows))), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
