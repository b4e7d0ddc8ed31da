#!/usr/bin/env bash
# Large messages only (32 MiB .. 1 GiB), more iterations, every peer twice in ABAB order, and
# nccl-tests in both process models: one process driving every GPU (`-g N`, what multi_gpu.sh runs)
# and one process per GPU under mpirun (`MPI=1` build, `-g 1`), which is ferroccl's and torch's model.
# Stage and carry as for multi_gpu.sh (benches/MULTI_GPU.md); on the device:
#   bash benches/multi_gpu_large.sh <ngpus>
set -uo pipefail
N="${1:?usage: benches/multi_gpu_large.sh <ngpus>}"
cd "$(dirname "$0")/.." || exit 1
# shellcheck disable=SC1091
source .device/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 FERROCCL_TIMEOUT=120
OUT="${OUT:-/tmp/out}"; W=/tmp/mgl; rm -rf "$W"; mkdir -p "$W" "$OUT"
OPS="${OPS:-all_reduce reduce_scatter all_gather broadcast all_to_all}"
ITERS="${ITERS:-50}"
for mod in nvidia.cu13 nvidia.nccl; do
  d=$(python3 -c "import $mod, os; print(os.path.join(list($mod.__path__)[0], 'lib'))" 2>/dev/null) && \
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# NCCL_HOME as multi_gpu.sh builds it (include + lib links from the torch wheel)
NH=/tmp/nccl_home; ND=$(python3 -c "import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])")
mkdir -p "$NH/lib"; ln -sfn "$ND/include" "$NH/include"
for f in "$ND"/lib/libnccl.so*; do ln -sf "$f" "$NH/lib/"; done
[ -e "$NH/lib/libnccl.so" ] || ln -sf "$ND/lib/libnccl.so.2" "$NH/lib/libnccl.so"
MPI_HOME=$(dirname "$(mpicc --showme:incdirs | tr ' ' '\n' | grep -m1 include)")
rm -rf /tmp/nt1 /tmp/nt0 && cp -r .nccl-tests /tmp/nt1 && cp -r .nccl-tests /tmp/nt0
GEN="-gencode=arch=compute_90,code=sm_90"
make -C /tmp/nt0 -j 16 MPI=0 CUDA_HOME=/usr/local/cuda NCCL_HOME=$NH NVCC_GENCODE="$GEN" > "$W/build0.log" 2>&1 &
make -C /tmp/nt1 -j 16 MPI=1 MPI_HOME="$MPI_HOME" CUDA_HOME=/usr/local/cuda NCCL_HOME=$NH NVCC_GENCODE="$GEN" \
  > "$W/build1.log" 2>&1; echo "MPI=1 build exit $? (MPI_HOME=$MPI_HOME)"
wait; tail -1 "$W/build0.log"
nt() { case $1 in all_to_all) echo alltoall_perf ;; *) echo "${1}_perf" ;; esac; }
PORT=29700
envlaunch() { # LOG cmd...: N ranks, torchrun-style; rank 0's output in LOG
  local log=$1; shift; PORT=$((PORT + 1)); local pids=() r
  for ((r = 0; r < N; r++)); do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=$N LOCAL_WORLD_SIZE=$N MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      timeout 200 "$@" > "$log.r$r" 2>&1 & pids+=($!)
  done
  wait "${pids[@]}"; cp "$log.r0" "$log"
}
B=.device/bin/bench-collectives
for round in 1 2; do
  for op in $OPS; do
    echo "round $round $op"
    timeout 120 "/tmp/nt0/build/$(nt "$op")" -b 32M -e 1G -f 2 -g "$N" -w 5 -n "$ITERS" > "$W/nt_g_${op}_$round.log" 2>&1
    timeout 120 mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$N" -x LD_LIBRARY_PATH \
      -x NCCL_NVLS_ENABLE "/tmp/nt1/build/$(nt "$op")" -b 32M -e 1G -f 2 -g 1 -w 5 -n "$ITERS" \
      > "$W/nt_mpi_${op}_$round.log" 2>&1
  done
  envlaunch "$W/fc_so_$round.log" env FERROCCL_STREAM_ORDERED=1 "$B" --backend nccl --op "${OPS// /,}" \
    -b 32M -e 1G -f 2 -w 5 -n "$ITERS" --json "$W/fc_so_$round.json"
  envlaunch "$W/fc_$round.log" "$B" --backend nccl --op "${OPS// /,}" -b 32M -e 1G -f 2 -w 5 \
    -n "$ITERS" --json "$W/fc_$round.json"
done
python3 - "$W" "$N" <<'PY' | tee "$OUT/large.md"
import sys
sys.path.insert(0, "benches")
from compare_multi import parse_nccl_tests, rows_by, load_json, human
w, n = sys.argv[1], int(sys.argv[2])
ops = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all"]
print(f"## Large messages, {n} GPUs: busbw (GB/s), best of two rounds (ABAB), and ratios\n")
print("| op | size | nccl-tests -g N | nccl-tests mpirun | ferroccl s-o | ferroccl blocking | s-o / -g N | s-o / mpirun | blocking / mpirun |")
print("|---|---|---|---|---|---|---|---|---|")
for op in ops:
    key = "ip_busbw" if op == "broadcast" else "busbw"
    def best(kind):
        out = {}
        for r in (1, 2):
            if kind in ("g", "mpi"):
                rows = {s: v.get(key) for s, v in parse_nccl_tests(f"{w}/nt_{kind}_{op}_{r}.log").items()}
            else:
                rows = {s: v["busbw_gbps"] for s, v in rows_by(load_json(f"{w}/{kind}_{r}.json"), op).items()}
            for s, b in rows.items():
                if b is not None:
                    out[s] = max(out.get(s, 0.0), b)
        return out
    g, m, so, bl = best("g"), best("mpi"), best("fc_so"), best("fc")
    for s in sorted(set(g) | set(m) | set(so)):
        f = lambda d: f"{d[s]:.1f}" if s in d else "—"
        q = lambda a, b: f"{a[s] / b[s]:.3f}" if s in a and s in b and b[s] else "—"
        print(f"| {op} | {human(s)} | {f(g)} | {f(m)} | {f(so)} | {f(bl)} | {q(so, g)} | {q(so, m)} | {q(bl, m)} |")
PY
tar -czf "$OUT/large_logs.tar.gz" -C /tmp mgl
