#!/usr/bin/env bash
# Build the collectives bench with the MPI backend and run it under mpirun, against rsmpi's own
# all_reduce (the same-run peer). Usage:
#   benches/run_mpi_bench.sh [-np N] [bench flags...]
# Default flags: --op all_reduce -b 8 -e 64M -f 2 --check --peer rsmpi (N = 4).
set -euo pipefail
cd "$(dirname "$0")/.."
NP=4
if [[ "${1:-}" == "-np" ]]; then NP="$2"; shift 2; fi
if [[ $# -eq 0 ]]; then set -- --op all_reduce -b 8 -e 64M -f 2 --check --peer rsmpi; fi
FLAGS=()
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  FLAGS+=(--oversubscribe)
  if [[ "$(id -u)" == 0 ]]; then FLAGS+=(--allow-run-as-root); fi
fi
# The executable cargo just built (the newest of target/release/deps/collectives-*, if cargo's
# JSON messages cannot be read).
BIN=$(cargo bench --features mpi --bench collectives --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*collectives-[^"]*\)".*/\1/p' | tail -n 1)
if [[ -z "$BIN" ]]; then
  cargo bench --features mpi --bench collectives --no-run
  BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/collectives-* | grep -v '\.d$' | head -n 1)
fi
echo "# $BIN"
exec mpirun "${FLAGS[@]}" -np "$NP" "$BIN" --bench --backend mpi "$@"
