#!/usr/bin/env bash
# A real slow network on one machine: run ranks inside a private network namespace whose loopback is
# rate-limited by the kernel (tc tbf), over real TCP sockets on 127.0.0.1.
#
#   benches/slow_link.sh RATE [--world N] [--mode tcp|mpi|raw] [--no-probe] -- CMD [ARGS...]
#
#   RATE      a tc rate: 1gbit, 10gbit, 500mbit, ...
#   --world   ranks (default 4)
#   --mode    tcp (default): N copies of CMD with torchrun-style variables (RANK, WORLD_SIZE,
#                 LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT, FERROCCL_TOKEN), ferroccl's TCP
#                 backend; the script fails if any rank fails and stops the others then.
#             mpi: `mpirun -np N` with Open MPI's TCP transport on lo only (`--mca pml ob1 --mca btl
#                 tcp,self --mca btl_tcp_if_include lo`; as root `--allow-run-as-root`), for binaries
#                 built with `--features mpi`.
#             raw: CMD once, inside the namespace, no rank variables (for launchers that start their
#                 own ranks, e.g. `collectives --backend tcp` without RANK, or `cargo test`).
#   --no-probe  skip the stream-rate check below.
#
# Examples (4 ranks, each against its dense twin in the same command):
#   benches/slow_link.sh 1gbit -- target/release/deps/collectives-HASH --backend tcp -b 1K -e 256M -f 4 -n 3
#   benches/slow_link.sh 1gbit --mode mpi -- target/release/examples/allreduce
#
# What the shaping means. tbf on `lo` limits the *egress of the one loopback device*, and every byte
# any rank sends crosses it: the RATE is shared by all flows of all ranks, like ranks behind one
# shared link (or one switch uplink), not one NIC per rank. A ring collective keeps N flows busy at once,
# so each gets RATE/N: 4 ranks on a 4gbit loopback see what 4 nodes with 1 Gbit/s NICs see for ring
# traffic. Report "wire rate" = bytes all ranks sent / time against RATE (benches/RESULTS.md).
#
# tbf parameters, per rate (computed below):
#   burst   = 1 ms of traffic at RATE (at least 64 KiB, more than one 9000-byte frame). tbf needs a
#             bucket at least as large as what arrives between two of its timer wake-ups or it undershoots
#             the rate; 1 ms is generous for hrtimers. The bucket fills while the link is idle, so a
#             transfer after an idle gap gets `burst` bytes at loopback speed: at most 1 ms of error per
#             idle gap, which is why it is not larger (1 MiB at 1gbit would be 8 ms per gap).
#   latency = 50 ms: the queue tbf holds (limit = RATE × latency + burst) before dropping. TCP's small-
#             queue limits keep the real queue short; a short limit makes tbf drop packets under many
#             concurrent flows and turns the test into a retransmission test.
#   mtu 9000 on lo: loopback's default 64 KiB MTU would make every GSO packet larger than the bucket at
#             low rates.
# No netem (added delay) in this kernel: latency is loopback's (~10 µs) plus queueing.
#
# Teardown. The namespace is created by `unshare --net` for this script's own process tree: it has no
# name and no bind mount, so the kernel destroys it (and its qdisc) when the last process in it exits.
# A trap on EXIT/INT/TERM kills every rank this script started (by pid) and deletes the qdisc, so
# neither a failed rank nor Ctrl-C leaves processes — and with them the namespace — behind.
# Everything stays on 127.0.0.1 inside the namespace; nothing is sent to any other address.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

if [ "${SLOW_LINK_INSIDE:-}" != 1 ]; then
  [ $# -ge 1 ] || usage
  case "$1" in -h|--help) usage ;; esac
  command -v unshare >/dev/null || { echo "slow_link: unshare not found (util-linux)" >&2; exit 3; }
  command -v tc >/dev/null && command -v ip >/dev/null \
    || { echo "slow_link: tc/ip not found: apt-get install iproute2" >&2; exit 3; }
  if [ "$(id -u)" = 0 ]; then
    exec env SLOW_LINK_INSIDE=1 unshare --net -- "$0" "$@"
  fi
  # Unprivileged: a user namespace maps us to root inside, where the kernel allows it.
  exec env SLOW_LINK_INSIDE=1 unshare --user --map-root-user --net -- "$0" "$@"
fi

RATE="$1"; shift
WORLD=4 MODE=tcp PROBE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --world) WORLD="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --no-probe) PROBE=0; shift ;;
    --) shift; break ;;
    *) echo "slow_link: unknown flag $1 (want --world N, --mode tcp|mpi|raw, --no-probe, -- CMD)" >&2; exit 2 ;;
  esac
done
[ $# -ge 1 ] || { echo "slow_link: no command after --" >&2; exit 2; }
case "$MODE" in tcp|mpi|raw) ;; *) echo "slow_link: --mode $MODE: want tcp, mpi or raw" >&2; exit 2 ;; esac

# RATE in bits/s, for the burst and the probe.
rate_bps() {
  local r="${1,,}" n u
  n="${r%%[a-z]*}"; u="${r#"$n"}"
  case "$u" in
    gbit) echo "$n * 1000000000" | bc ;; mbit) echo "$n * 1000000" | bc ;;
    kbit) echo "$n * 1000" | bc ;; bit|"") echo "$n" ;;
    *) echo "slow_link: rate $1: use NNNbit, NNNkbit, NNNmbit or NNNgbit" >&2; return 1 ;;
  esac
}
command -v bc >/dev/null || bc() { python3 -c "import sys; print(int(eval(sys.stdin.read())))"; }
BPS=$(rate_bps "$RATE"); BPS=${BPS%.*}
BURST=$(( BPS / 8 / 1000 )); [ "$BURST" -ge 65536 ] || BURST=65536

PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  tc qdisc del dev lo root 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip link set lo up mtu 9000
tc qdisc add dev lo root tbf rate "$RATE" burst "$BURST" latency 50ms
echo "# slow_link: namespace $(readlink /proc/self/ns/net), lo: $(tc qdisc show dev lo | head -1)"

if [ "$PROBE" = 1 ]; then
  # One TCP stream, then $WORLD concurrent ones (the shared rate), ~1.5 s each.
  python3 - "$BPS" "$WORLD" <<'PY'
import socket, sys, threading, time
bps, world = int(sys.argv[1]), int(sys.argv[2])
def run(streams):
    total = int(bps / 8 * 1.5)
    per = total // streams
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(streams)
    port = srv.getsockname()[1]
    got = [0] * streams
    def sink(i, c):
        while True:
            b = c.recv(1 << 20)
            if not b: break
            got[i] += len(b)
    def send():
        s = socket.create_connection(("127.0.0.1", port))
        buf = b"\0" * (1 << 20); left = per
        while left > 0:
            n = min(left, len(buf)); s.sendall(buf[:n]); left -= n
        s.close()
    senders = [threading.Thread(target=send) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in senders: t.start()
    sinks = []
    for i in range(streams):
        c, _ = srv.accept()
        t = threading.Thread(target=sink, args=(i, c)); t.start(); sinks.append(t)
    for t in senders + sinks: t.join()
    dt = time.perf_counter() - t0
    return sum(got) * 8 / dt
for s in (1, world):
    r = run(s)
    print(f"# slow_link: {s} TCP stream(s): {r / 1e9:.3f} Gbit/s measured in total, shaped {bps / 1e9:.3f} Gbit/s ({r / bps:.2f}x)")
PY
fi

case "$MODE" in
  raw)
    "$@" &
    PIDS+=($!)
    wait "${PIDS[0]}"
    ;;
  mpi)
    MPIFLAGS=(--oversubscribe --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo
              --mca oob_tcp_if_include lo)
    [ "$(id -u)" = 0 ] && MPIFLAGS+=(--allow-run-as-root)
    mpirun "${MPIFLAGS[@]}" -np "$WORLD" "$@" &
    PIDS+=($!)
    wait "${PIDS[0]}"
    ;;
  tcp)
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    for ((r = 0; r < WORLD; r++)); do
      RANK=$r LOCAL_RANK=$r WORLD_SIZE=$WORLD MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
        FERROCCL_TOKEN="${FERROCCL_TOKEN:-slow-link-$$}" FERROCCL_TCP_BIND=127.0.0.1:0 \
        FERROCCL_STORE_BIND=127.0.0.1:$PORT FERROCCL_BACKEND=tcp "$@" &
      PIDS+=($!)
    done
    # The first rank to fail fails the run (the trap stops the others).
    # (The ranks are this shell's only children, so `wait -n` waits for the next of them.)
    for ((left = WORLD; left > 0; left--)); do
      rc=0; wait -n || rc=$?
      if [ "$rc" != 0 ]; then
        echo "slow_link: a rank failed (exit $rc); stopping the others" >&2; exit "$rc"
      fi
    done
    ;;
esac
