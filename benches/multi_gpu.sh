#!/usr/bin/env bash
# One command per multi-GPU kind (nvidia-h200-x2/x4/x8): correctness, collectives vs nccl-tests and
# torch.distributed, the socket-transport sweep and DGC vs dense. See benches/MULTI_GPU.md.
#   stage here:   ../shared/tools/device-stage --release --features cuda --test nccl_multi --bench collectives --examples
#   nccl-tests:   source in .nccl-tests/ (MULTI_GPU.md says how to fetch it)
#   on the device (carry [".device", ".nccl-tests"]):   bash benches/multi_gpu.sh <ngpus>
# Everything goes to $OUT: logs.tar.gz (every log and JSON), results.json and summary.md (the
# comparison table with the ratios against the targets, also printed at the end).
set -uo pipefail
N="${1:?usage: benches/multi_gpu.sh <ngpus>}"
cd "$(dirname "$0")/.." || exit 1
[ -f .device/env.sh ] || { echo "no .device/: stage first (benches/MULTI_GPU.md)"; exit 1; }
# shellcheck disable=SC1091
source .device/env.sh
# NVLink multicast stays off everywhere (KINDS.md): exported, and passed through mpirun with -x.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FERROCCL_TIMEOUT="${FERROCCL_TIMEOUT:-120}" RUST_BACKTRACE=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT="${OUT:-/tmp/out}"
W=/tmp/mg                       # logs here, packed into $OUT/logs.tar.gz at the end ($OUT takes 8 files)
rm -rf "$W" && mkdir -p "$W" "$OUT"
BUDGET="${BUDGET:-570}"         # seconds; later steps are skipped (and said so) past it
MAXB="${MAXB:-1G}"              # largest size of the sweeps
SOCK_ITERS="${SOCK_ITERS:-5}"   # iterations per size on the socket transport (slow at 1 GiB)
OPS="all_reduce reduce_scatter all_gather broadcast all_to_all"
PORT=29600

left() { echo $((BUDGET - SECONDS)); }
step() { echo; echo "=== [$(date +%T) t=${SECONDS}s] $*"; }
have() { # have SECONDS_NEEDED WHAT: false (and logged) when the budget is too short
  if [ "$(left)" -lt "$1" ]; then echo "SKIPPED (budget): $2" | tee -a "$W/skipped.txt"; return 1; fi
}

# Library paths: CUDA runtime and NCCL from the pip wheels that torch uses (one NCCL for all three).
PY=python3
for mod in nvidia.cu13 nvidia.nccl; do
  d=$($PY -c "import $mod, os; print(os.path.join(list($mod.__path__)[0], 'lib'))" 2>/dev/null) && \
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH

step "machine"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"; echo "ngpus asked $N"; uname -r
  nvidia-smi -L; nvidia-smi topo -m 2>/dev/null
  nvcc --version 2>/dev/null | tail -1
  mpirun --version 2>/dev/null | head -1
  $PY -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())'
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)_' | sort
} 2>&1 | tee "$W/machine.txt"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
[ "$GPUS" -ge "$N" ] || echo "WARNING: $GPUS GPUs visible, $N asked"

# --- nccl-tests: build in the background while the correctness runs use the GPUs -----------------
find_nccl_home() { # prints a folder with include/nccl.h and lib/libnccl.so
  local inc lib h=/tmp/nccl_home d
  d=$($PY -c "import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])" 2>/dev/null)
  for cand in "$d" /usr/local/nccl /usr /usr/local/cuda; do
    [ -n "$cand" ] || continue
    inc=""; lib=""
    [ -f "$cand/include/nccl.h" ] && inc="$cand/include"
    for l in "$cand/lib" "$cand/lib64" "$cand/lib/x86_64-linux-gnu" /usr/lib/x86_64-linux-gnu; do
      [ -e "$l/libnccl.so.2" ] || [ -e "$l/libnccl.so" ] && { lib="$l"; break; }
    done
    if [ -n "$inc" ] && [ -n "$lib" ]; then
      mkdir -p "$h/lib"; ln -sfn "$inc" "$h/include"
      for f in "$lib"/libnccl.so*; do ln -sf "$f" "$h/lib/"; done
      if [ ! -e "$h/lib/libnccl.so" ]; then
        for f in "$lib"/libnccl.so.2*; do ln -sf "$f" "$h/lib/libnccl.so"; break; done
      fi
      echo "$h"; return 0
    fi
  done
  return 1
}
NT=.nccl-tests
NT_OK=0
if [ -f "$NT/Makefile" ]; then
  NCCL_HOME=$(find_nccl_home) || NCCL_HOME=""
  echo "NCCL_HOME=$NCCL_HOME ($(readlink -f "$NCCL_HOME/include" 2>/dev/null))" | tee -a "$W/machine.txt"
  ( make -C "$NT" -j 16 MPI=0 CUDA_HOME=/usr/local/cuda NCCL_HOME="$NCCL_HOME" \
      NVCC_GENCODE="-gencode=arch=compute_90,code=sm_90" > "$W/nccl_tests_build.log" 2>&1
    echo "make exit $?" >> "$W/nccl_tests_build.log" ) &
  MAKE_PID=$!
else
  echo "no $NT/Makefile: nccl-tests not carried (MULTI_GPU.md)" | tee -a "$W/skipped.txt"
  MAKE_PID=""
fi

# --- launchers ------------------------------------------------------------------------------------
# envlaunch LOG SECS cmd...: N processes with torchrun-style variables; rank r's output in LOG.rR
# (rank 0's also in LOG); exit status: the first non-zero one.
envlaunch() {
  local log=$1 secs=$2; shift 2
  PORT=$((PORT + 1))
  local pids=() r rc=0 st
  for ((r = 0; r < N; r++)); do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=$N LOCAL_WORLD_SIZE=$N MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      timeout "$secs" "$@" > "$log.r$r" 2>&1 &
    pids+=($!)
  done
  for r in "${!pids[@]}"; do
    wait "${pids[$r]}"; st=$?
    [ $rc -eq 0 ] && [ $st -ne 0 ] && rc=$st
  done
  cp "$log.r0" "$log"
  return $rc
}
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$N"
        -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS
        -x LD_LIBRARY_PATH -x FERROCCL_TIMEOUT -x RUST_BACKTRACE -x PATH)
run_logged() { # run_logged LOG cmd...: tee'd, exit status kept
  local log=$1; shift
  "$@" 2>&1 | tee "$log"; return "${PIPESTATUS[0]}"
}
status() { echo "$1 exit $2" | tee -a "$W/status.txt"; }

# --- 1. correctness -------------------------------------------------------------------------------
T=.device/bin/test-nccl_multi
step "1. nccl_multi under mpirun -np $N"
if have 60 "tests under mpirun" && command -v mpirun >/dev/null; then
  run_logged "$W/test_mpirun.log" timeout 240 "${MPIRUN[@]}" "$T" --ignored --test-threads=1 --nocapture
  status test_mpirun $?
  grep -h '^nccl_multi' "$W/test_mpirun.log"
fi
step "1. nccl_multi under env launch ($N processes)"
if have 60 "tests under env launch"; then
  envlaunch "$W/test_env.log" 240 "$T" --ignored --test-threads=1 --nocapture
  status test_env $?
  grep -h '^nccl_multi' "$W"/test_env.log.r*
fi
B=.device/bin/bench-collectives
step "1. ferroccl bench --check on device buffers (8 B .. 64 MiB, every op), blocking and stream-ordered"
if have 60 "bench --check"; then
  envlaunch "$W/bench_check.log" 200 "$B" --backend nccl --op all -b 8 -e 64M -f 4 -n 3 -w 1 --check \
    --json "$W/bench_check.json"
  status bench_check $?
  grep -E '^# (all|reduce|broad|Wrong)|error' "$W/bench_check.log"
  envlaunch "$W/bench_check_so.log" 200 env FERROCCL_STREAM_ORDERED=1 "$B" --backend nccl --op all \
    -b 8 -e 64M -f 4 -n 3 -w 1 --check --json "$W/bench_check_so.json"
  status bench_check_stream_ordered $?
  grep -E '^# (all|reduce|broad|Wrong)|error' "$W/bench_check_so.log"
fi

# --- 2. collectives vs nccl-tests and torch (NVLink / P2P) ----------------------------------------
if [ -n "$MAKE_PID" ]; then
  wait "$MAKE_PID"; tail -3 "$W/nccl_tests_build.log"
  [ -x "$NT/build/all_reduce_perf" ] && NT_OK=1
fi
nt_bin() { case $1 in all_to_all) echo "$NT/build/alltoall_perf" ;; *) echo "$NT/build/${1}_perf" ;; esac; }
step "2. nccl-tests, -g $N (one process, MPI=0)"
if [ $NT_OK = 1 ]; then
  for op in $OPS; do
    have 30 "nccl-tests $op" || break
    run_logged "$W/nccltests_$op.log" timeout 120 "$(nt_bin "$op")" -b 8 -e "$MAXB" -f 2 -g "$N" -w 5 -n 20
    status "nccltests_$op" $?
  done
  if have 30 "nccl-tests all_reduce -z 2"; then  # blocking: stream sync after each op (no barrier), as ferroccl waits
    run_logged "$W/nccltests_all_reduce_z2.log" timeout 120 "$(nt_bin all_reduce)" -b 8 -e 64M -f 2 -g "$N" -w 5 -n 20 -z 2
    status nccltests_all_reduce_z2 $?
  fi
fi
step "2. ferroccl collectives bench (nccl backend, device buffers, env launch)"
if have 60 "ferroccl bench"; then
  envlaunch "$W/ferroccl.log" 300 "$B" --backend nccl --op "${OPS// /,}" -b 8 -e "$MAXB" -f 2 -w 5 -n 20 \
    --json "$W/ferroccl.json"
  status ferroccl_bench $?; cat "$W/ferroccl.log"
fi
step "2. ferroccl bench, stream-ordered (FERROCCL_STREAM_ORDERED=1: all iterations enqueued, one synchronize, as nccl-tests times)"
if have 60 "ferroccl bench stream-ordered"; then
  envlaunch "$W/ferroccl_so.log" 300 env FERROCCL_STREAM_ORDERED=1 "$B" --backend nccl --op "${OPS// /,}" \
    -b 8 -e "$MAXB" -f 2 -w 5 -n 20 --json "$W/ferroccl_so.json"
  status ferroccl_bench_stream_ordered $?; cat "$W/ferroccl_so.log"
fi
step "2. torch.distributed (NCCL)"
if have 60 "torch"; then
  envlaunch "$W/torch.log" 300 $PY benches/torch_dist.py --op "${OPS// /,}" -b 8 -e "$MAXB" -f 2 -w 5 -n 20 \
    --json "$W/torch.json"
  status torch $?; cat "$W/torch.log"
fi

# --- 3. socket transport: all_reduce sweep, DGC vs dense ------------------------------------------
step "3. NCCL socket transport (P2P and SHM off, NET=Socket over lo)"
(
  export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo
  if [ $NT_OK = 1 ] && have 60 "socket nccl-tests"; then
    run_logged "$W/sock_nccltests_all_reduce.log" timeout 200 "$(nt_bin all_reduce)" -b 8 -e "$MAXB" -f 2 -g "$N" \
      -w 2 -n "$SOCK_ITERS"
    status sock_nccltests $?
  fi
  if have 60 "socket ferroccl"; then
    envlaunch "$W/sock_ferroccl.log" 200 "$B" --backend nccl --op all_reduce -b 8 -e "$MAXB" -f 2 -w 2 \
      -n "$SOCK_ITERS" --json "$W/sock_ferroccl.json"
    status sock_ferroccl $?; cat "$W/sock_ferroccl.log"
  fi
  if have 60 "socket torch"; then
    envlaunch "$W/sock_torch.log" 200 $PY benches/torch_dist.py --op all_reduce -b 8 -e "$MAXB" -f 2 -w 2 \
      -n "$SOCK_ITERS" --json "$W/sock_torch.json" --label torch-socket
    status sock_torch $?; cat "$W/sock_torch.log"
  fi
  if have 40 "socket dgc"; then
    envlaunch "$W/sock_dgc.log" 200 "$B" --backend nccl --op dgc_sync --dgc-n 25557032 --dgc-density 0.001 \
      --dgc-reps 10 --json "$W/sock_dgc.json"
    status sock_dgc $?; cat "$W/sock_dgc.log"
  fi
)
step "3. DGC vs dense on NVLink/P2P (for reference)"
if have 30 "p2p dgc"; then
  envlaunch "$W/dgc.log" 120 "$B" --backend nccl --op dgc_sync --dgc-reps 10 --json "$W/dgc.json"
  status dgc $?; cat "$W/dgc.log"
fi

# --- summary --------------------------------------------------------------------------------------
step "summary"
$PY benches/compare_multi.py "$W" --ngpus "$N" --json "$OUT/results.json" --md "$OUT/summary.md" 2>&1 | tee "$W/summary.log"
tar -czf "$OUT/logs.tar.gz" -C /tmp mg
echo "status:"; cat "$W/status.txt" 2>/dev/null; cat "$W/skipped.txt" 2>/dev/null
echo "files: $OUT/summary.md $OUT/results.json $OUT/logs.tar.gz (t=${SECONDS}s)"
