#!/usr/bin/env bash
# Build and run the MPI backend's checks: the integration test (4 ranks; it relaunches itself under
# mpirun) and the all-reduce example. Needs an MPI (e.g. apt-get install openmpi-bin libopenmpi-dev
# libclang-dev). Usage: tests/run_mpi.sh [-np N]   (N ranks for the example; default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
NP=4
if [[ "${1:-}" == "-np" ]]; then NP="$2"; fi
FLAGS=()
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  FLAGS+=(--oversubscribe)
  if [[ "$(id -u)" == 0 ]]; then FLAGS+=(--allow-run-as-root); fi
fi
cargo build --features mpi --example allreduce --test mpi
cargo test --features mpi --test mpi
mpirun "${FLAGS[@]}" -np "$NP" "${CARGO_TARGET_DIR:-target}/debug/examples/allreduce" | tee /dev/stderr | grep -q '^RESULT .*"ok":true'
echo "MPI checks passed"
