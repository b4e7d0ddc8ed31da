#!/usr/bin/env bash
# Every issue-24 measurement over the shaped loopback (benches/slow_link.sh), 4 ranks, and the link
# model's prediction of each, into $OUT (default benches/slow_link/): one JSON line per run.
# Build first: cargo build --release --all-features --examples --benches
#   REPS=3 RATES="1gbit 10gbit" SYNC_RATES="1gbit 2500mbit 5gbit 10gbit" benches/slow_link_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benches/slow_link}; REPS=${REPS:-3}
RATES=${RATES:-"1gbit 10gbit"}; SYNC_RATES=${SYNC_RATES:-"1gbit 2500mbit 5gbit 10gbit"}
mkdir -p "$OUT"
SL=benches/slow_link.sh EX=target/release/examples
BENCH=$(ls -t target/release/deps/collectives-* | grep -v '\.d$' | head -1)
gbit() { case "$1" in *gbit) echo "${1%gbit}" ;; *mbit) echo "scale=3; ${1%mbit}/1000" | bc ;; esac; }
result() { grep '^RESULT ' | sed 's/^RESULT //'; }
# Resumable: a run whose output exists (non-empty) is not repeated.
have() { [ -s "$1" ] && echo "# have $1"; }

for rate in $RATES; do
  # all_reduce 1 KiB - 256 MiB over TCP; REPS separate runs (median taken by the plot/report)
  for rep in $(seq "$REPS"); do
    have "$OUT/allreduce_${rate}_$rep.json" && continue
    $SL "$rate" --mode raw $([ "$rep" = 1 ] || echo --no-probe) -- "$BENCH" --backend tcp --world 4 \
      --op all_reduce -b 1K -e 256M -f 4 -n 3 -w 1 --json "$OUT/allreduce_${rate}_$rep.json" \
      | tee "$OUT/allreduce_${rate}_$rep.log" | grep -E '^#|^ +[0-9]' | tail -14
  done
  # dgc_train: dense and DGC in one run; then gradient coding with one sleeping rank vs uncoded
  have "$OUT/dgc_train_$rate.json" ||
  $SL "$rate" --no-probe -- $EX/dgc_train --plot /tmp/slow_dgc_train.svg | result > "$OUT/dgc_train_$rate.json"
  for sc in uncoded uncoded-slow gc-slow; do
    have "$OUT/straggler_${sc}_$rate.json" ||
    $SL "$rate" --no-probe -- $EX/straggler --world 4 --s 1 --slow 3 --kill 2 --scenario "$sc" | result \
      > "$OUT/straggler_${sc}_$rate.json"
  done
done
for rate in $SYNC_RATES; do
  # dense all-reduce vs Dgc::step vs Bucketer(+DgcHook), 25.5 M floats, REPS timed reps
  have "$OUT/sync_$rate.json" ||
  $SL "$rate" --no-probe -- $EX/slow_link --reps "$REPS" | result > "$OUT/sync_$rate.json"
  cat "$OUT/sync_$rate.json"
  # the link model's prediction of the same runs (virtual time, network only)
  have "$OUT/model_$rate.json" ||
  $EX/slow_link --model-gbit "$(gbit "$rate")" --reps 1 --sweep | result > "$OUT/model_$rate.json"
done
for rate in $RATES; do
  $EX/straggler --world 4 --s 1 --slow 3 --kill 2 --scenario uncoded-slow | result > "$OUT/model_straggler_uncoded-slow.json"
  $EX/straggler --world 4 --s 1 --slow 3 --kill 2 --scenario gc-slow | result > "$OUT/model_straggler_gc-slow.json"
  break
done
echo "# wrote $OUT"
