#!/usr/bin/env bash
# Issue #2's two side-by-side figures on the GPU machine's host CPU (16 cores, so ranks do not share
# cores as on the 2-core CI VM), plus the MPI test suite under that host's Open MPI. Stage first, here:
#   ../shared/tools/device-stage --release --features cuda,mpi --bench collectives --test mpi
# then run `bash benches/device_host_cpu.sh` on the device with carry [".device"]. Logs go to $OUT.
set -uo pipefail
source .device/env.sh   # keeps NCCL_NVLS_ENABLE=0 and the library path
export OUT="${OUT:-/tmp/out}" FERROCCL_TIMEOUT=120
mkdir -p "$OUT"
B=.device/bin/bench-collectives
MPIRUN=(mpirun --allow-run-as-root)
nproc; lscpu | grep 'Model name'; mpirun --version | head -1
run() { echo "=== $*"; "$@"; echo "=== exit $?"; }
# in-process all_reduce vs memcpy, the command, 4 and 8 ranks
for w in 4 8; do
  run $B --bench --backend local --world $w --op all_reduce -b 8 -e 64M -f 2 --check --peer memcpy \
    2>&1 | tee "$OUT/local_w$w.log"
done
# MPI-backend all_reduce vs a raw rsmpi MPI_Allreduce, same communicator, ABBA blocks
for np in 4 8; do
  run "${MPIRUN[@]}" -np $np $B --bench --backend mpi --op all_reduce -b 8 -e 64M -f 2 --check \
    --peer rsmpi -n 200 2>&1 | tee "$OUT/mpi_np$np.log"
done
# small sizes at 4 ranks, many iterations, three runs (single runs scatter by a few %)
for i in 1 2 3; do
  run "${MPIRUN[@]}" -np 4 $B --bench --backend mpi --op all_reduce -b 8 -e 16K -f 2 --check \
    --peer rsmpi -n 5000 -w 50 2>&1 | tee "$OUT/mpi_small_$i.log" | grep -E '^ +[0-9]|ratio'
done
run "${MPIRUN[@]}" -np 4 .device/bin/test-mpi 2>&1 | tee "$OUT/test_mpi.log" | tail -20
