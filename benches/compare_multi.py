#!/usr/bin/env python3
"""Compare the logs of benches/multi_gpu.sh: ferroccl vs nccl-tests vs torch.distributed, per op and
size, with the issue's targets. Usage: compare_multi.py DIR --ngpus N [--json F] [--md F].

Targets: busbw >= 0.98x nccl-tests at >= 64 MiB; 8-byte all_reduce time <= nccl-tests + 3 us;
all_to_all busbw >= 0.95x nccl-tests at >= 32 MiB; DGC sync >= 20x faster than dense (socket
transport). nccl-tests' out-of-place columns are the peer (in-place for broadcast, which ferroccl
times in place).
"""
import argparse
import json
import os
import re

OPS = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all"]
MiB = 1 << 20


def parse_nccl_tests(path):
    """{size: dict(time_us, busbw, wrong, ip_time_us, ip_busbw)} from an nccl-tests log."""
    rows = {}
    if not os.path.exists(path):
        return rows
    for line in open(path, errors="replace"):
        if line.startswith("#") or not line.strip():
            continue
        t = line.split()
        if len(t) < 9 or not t[0].isdigit():
            continue
        try:
            r = dict(time_us=float(t[5]), busbw=float(t[7]), wrong=t[8])
            if len(t) >= 12:
                r.update(ip_time_us=float(t[9]), ip_busbw=float(t[11]))
            rows[int(t[0])] = r
        except ValueError:
            continue
    return rows


def nccl_version(path):
    if not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    m = re.search(r"NCCL version ([0-9.+a-z]+)", text)
    if m:
        return m.group(1)
    # nccl-tests 2.19: "# nccl-tests version 2.19.6 nccl-headers=22809 nccl-library=22809"
    m = re.search(r"nccl-library=(\d+)", text)
    if not m:
        return None
    v = int(m.group(1))
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rows_by(doc, op):
    if not doc:
        return {}
    return {r["size"]: r for r in doc.get("rows", []) if r.get("op") == op}


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def human(b):
    for s, u in ((30, "G"), (20, "M"), (10, "K")):
        if b >= 1 << s and b % (1 << s) == 0:
            return f"{b >> s}{u}"
    return str(b)


def compare(nt, fc, th, op, min_size, want, inplace=False, so=None):
    """Table rows and the worst ratios at >= min_size: (lines, worst blocking, worst vs torch,
    verdict, worst stream-ordered). With `so` (ferroccl stream-ordered rows) the verdict is on those:
    nccl-tests' default timing enqueues all iterations and synchronizes once, as stream-ordered
    ferroccl does; blocking ferroccl waits for each call on the host."""
    so = so or {}
    lines, worst, worst_t, worst_so = [], None, None, None
    for size in sorted(set(nt) | set(fc) | set(th) | set(so)):
        n = nt.get(size, {})
        nb = n.get("ip_busbw" if inplace else "busbw")
        nt_us = n.get("ip_time_us" if inplace else "time_us")
        f, t, q = fc.get(size), th.get(size), so.get(size)
        fb = f["busbw_gbps"] if f else None
        tb = t["busbw_gbps"] if t else None
        qb = q["busbw_gbps"] if q else None
        ratio = fb / nb if fb is not None and nb else None
        tratio = fb / tb if fb is not None and tb else None
        qratio = qb / nb if qb is not None and nb else None
        if size >= min_size and ratio is not None:
            worst = ratio if worst is None else min(worst, ratio)
        if size >= min_size and tratio is not None:
            worst_t = tratio if worst_t is None else min(worst_t, tratio)
        if size >= min_size and qratio is not None:
            worst_so = qratio if worst_so is None else min(worst_so, qratio)
        lines.append(f"| {human(size)} | {fmt(nt_us)} | {fmt(f['time_us'] if f else None)} | "
                     f"{fmt(q['time_us'] if q else None)} | "
                     f"{fmt(t['time_us'] if t else None)} | {fmt(nb)} | {fmt(fb)} | {fmt(qb)} | {fmt(tb)} | "
                     f"{fmt(ratio, 3)} | {fmt(qratio, 3)} | {fmt(tratio, 3)} |")
    judged = worst_so if so else worst
    verdict = None if judged is None else judged >= want
    return lines, worst, worst_t, verdict, worst_so


HEADER = ["| size | nccl-tests us | ferroccl us | ferroccl s-o us | torch us | nccl-tests busbw | "
          "ferroccl busbw | ferroccl s-o busbw | torch busbw | fc/nccl-tests | fc s-o/nccl-tests | "
          "fc/torch |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--ngpus", type=int, required=True)
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    d = a.dir
    fc, th = load_json(f"{d}/ferroccl.json"), load_json(f"{d}/torch.json")
    fso = load_json(f"{d}/ferroccl_so.json")  # FERROCCL_STREAM_ORDERED=1
    out = [f"## Multi-GPU comparison, {a.ngpus} GPUs", ""]
    mach = f"{d}/machine.txt"
    if os.path.exists(mach):
        out += ["```", open(mach, errors="replace").read().strip()[:3000], "```", ""]
    ver = nccl_version(f"{d}/nccltests_all_reduce.log")
    out.append(f"nccl-tests NCCL {ver or '?'}; torch {th.get('torch') if th else '?'} NCCL "
               f"{th.get('nccl') if th else '?'}; ferroccl loads the same libnccl.so.2 (LD_LIBRARY_PATH).")
    out.append("")
    results = dict(ngpus=a.ngpus, targets=[], ops={})
    targets = results["targets"]
    for op in OPS:
        nt = parse_nccl_tests(f"{d}/nccltests_{op}.log")
        min_size, want = (32 * MiB, 0.95) if op == "all_to_all" else (64 * MiB, 0.98)
        lines, worst, worst_t, ok, worst_so = compare(
            nt, rows_by(fc, op), rows_by(th, op), op, min_size, want, inplace=(op == "broadcast"),
            so=rows_by(fso, op))
        out += [f"### {op}", ""] + HEADER + lines + [""]
        targets.append(dict(what=f"{op} busbw >= {want}x nccl-tests at >= {human(min_size)} "
                                 f"(stream-ordered ferroccl; blocking in the next line)",
                            value=worst_so, met=ok, vs_torch_min=worst_t))
        targets.append(dict(what=f"  {op}, blocking ferroccl (a host wait per call) vs nccl-tests",
                            value=worst, met=None))
        results["ops"][op] = dict(nccl_tests=nt, ferroccl=rows_by(fc, op), torch=rows_by(th, op),
                                  ferroccl_stream_ordered=rows_by(fso, op))
    # 8-byte all_reduce latency
    nt = parse_nccl_tests(f"{d}/nccltests_all_reduce.log")
    z2 = parse_nccl_tests(f"{d}/nccltests_all_reduce_z2.log")
    f8 = rows_by(fc, "all_reduce").get(8)
    n8 = nt.get(8)
    lat = None if not (f8 and n8) else f8["time_us"] - n8["time_us"]
    targets.append(dict(what="8 B all_reduce time <= nccl-tests + 3 us", value=lat,
                        met=None if lat is None else lat <= 3.0,
                        ferroccl_us=f8 and f8["time_us"], nccl_tests_us=n8 and n8["time_us"],
                        nccl_tests_blocking_z2_us=z2.get(8, {}).get("time_us")))
    # socket transport
    snt = parse_nccl_tests(f"{d}/sock_nccltests_all_reduce.log")
    sfc, sth = load_json(f"{d}/sock_ferroccl.json"), load_json(f"{d}/sock_torch.json")
    lines, worst, worst_t, _, _ = compare(snt, rows_by(sfc, "all_reduce"), rows_by(sth, "all_reduce"),
                                          "all_reduce", 64 * MiB, 0.98)
    out += ["### all_reduce on the socket transport (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket "
            "NCCL_SOCKET_IFNAME=lo)", ""] + HEADER + lines + [""]
    targets.append(dict(what="socket all_reduce busbw vs nccl-tests at >= 64M (no stated target)",
                        value=worst, met=None, vs_torch_min=worst_t))
    results["socket_all_reduce"] = dict(nccl_tests=snt, ferroccl=rows_by(sfc, "all_reduce"),
                                        torch=rows_by(sth, "all_reduce"))
    # DGC
    for name, label in (("sock_dgc", "socket transport"), ("dgc", "NVLink/P2P")):
        doc = load_json(f"{d}/{name}.json")
        g = doc.get("dgc_sync") if doc else None
        if g:
            out.append(f"DGC sync ({label}): {g['n']} floats, density {g['density']}, k {g['k']}: dense "
                       f"all_reduce {g['dense_allreduce_ms']:.3f} ms, DGC {g['dgc_sync_ms']:.3f} ms "
                       f"(compression {g['dgc_compress_ms'] if g['dgc_compress_ms'] is not None else float('nan'):.3f} ms), "
                       f"speedup {g['speedup']:.2f}x")
        targets.append(dict(what=f"DGC sync >= 20x faster than dense ({label})",
                            value=g and g["speedup"], met=(g["speedup"] >= 20) if g else None,
                            enforced=(name == "sock_dgc")))
        results[name] = g
    out += ["", "### Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in targets:
        v = t["value"]
        out.append(f"| {t['what']} | {'—' if v is None else f'{v:.3f}'} | "
                   f"{'—' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    for name in ("status.txt", "skipped.txt"):
        p = f"{d}/{name}"
        if os.path.exists(p):
            out += ["", f"{name}:", "```", open(p).read().strip(), "```"]
    text = "\n".join(out) + "\n"
    print(text)
    if a.md:
        open(a.md, "w").write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
