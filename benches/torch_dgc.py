#!/usr/bin/env python3
"""Torch baselines for benches/dgc_kernels.rs, on the same GPU, in the same run.

    python3 benches/torch_dgc.py --n 25557032 --density 0.001      # prints one JSON line

(a) torch.topk(|g|, k)                       -- the exact top-k selection DGC replaces
(b) threshold from a 1% sample + nonzero      -- the reference implementation's selection, in torch
(c) the reference's whole compress step in torch (momentum, accumulate, sampled threshold, nonzero,
    gather, masking), for context.
Times are medians of CUDA-event timings (ms) after warm-up.
"""
import argparse, json, sys

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=25_557_032)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(json.dumps({"error": f"torch not importable: {e}"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    n, k = a.n, max(1, int(round(a.n * a.density)))
    g = torch.randn(n, device=dev)
    u = torch.zeros(n, device=dev)
    v = torch.zeros(n, device=dev)

    def timed(f):
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(a.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(); e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        ts.sort()
        return ts[len(ts) // 2]

    def topk():
        return torch.topk(g.abs(), k, sorted=False)

    ns = max(1, n // 100)
    def thr_nonzero():
        imp = g.abs()
        samp = imp[torch.randint(0, n, (ns,), device=dev)]
        thr = torch.topk(samp, max(1, int(ns * a.density)), sorted=False)[0].min()
        return (imp >= thr).nonzero().view(-1)

    def ref_step():
        u.mul_(0.9).add_(g)
        v.add_(u)
        imp = v.abs()
        samp = imp[torch.randint(0, n, (ns,), device=dev)]
        thr = torch.topk(samp, max(1, int(ns * a.density)), sorted=False)[0].min()
        idx = (imp >= thr).nonzero().view(-1)
        val = v[idx]
        v.index_fill_(0, idx, 0.0)
        u.index_fill_(0, idx, 0.0)
        return idx, val

    dst = torch.empty_like(g)
    copy_ms = timed(lambda: dst.copy_(g))
    out = {
        "n": n, "k": k, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "topk_ms": timed(topk), "threshold_nonzero_ms": timed(thr_nonzero),
        "reference_step_ms": timed(ref_step),
        "copy_gbps": 2 * 4 * n / (copy_ms * 1e-3) / 1e9,
    }
    print(json.dumps(out))
    return 0

if __name__ == "__main__":
    sys.exit(main())
