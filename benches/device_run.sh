#!/usr/bin/env bash
# One command for the lent GPU machine (single GPU): GPU tests, kernel parity tests, kernel and DGC
# benches with their torch peers in the same run. Stage first, here:
#   ../shared/tools/device-stage --release --features cuda --test gpu --test kernels --test dgc \
#       --bench kernels --bench dgc_kernels
# then run `bash benches/device_run.sh` on the device with carry [".device"]. Logs go to $OUT.
set -uo pipefail
source .device/env.sh   # sets NCCL_NVLS_ENABLE=0 and the library path; keep it
export PYTHONUNBUFFERED=1 FERROCCL_TIMEOUT=120 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
for mod in nvidia.cu13 nvidia.nccl; do
  d=$(python3 -c "import $mod, os; print(os.path.join(list($mod.__path__)[0], 'lib'))" 2>/dev/null) && \
    export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
done
nvidia-smi -L; echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
run() { echo "=== $*"; "$@"; echo "=== exit $?"; }
run .device/bin/test-gpu --include-ignored --test-threads=1 2>&1 | tee "$OUT/gpu.log"
run .device/bin/test-kernels --include-ignored 2>&1 | tee "$OUT/kernels_test.log" | tail -30
run .device/bin/test-dgc --include-ignored 2>&1 | tee "$OUT/dgc_test.log" | tail -30
run .device/bin/bench-kernels --bench 2>&1 | tee "$OUT/bench_kernels.log"
run python3 benches/torch_kernels.py 2>&1 | tee "$OUT/torch_kernels.log"
run .device/bin/bench-dgc_kernels --bench 2>&1 | tee "$OUT/bench_dgc.log"
