#!/usr/bin/env bash
# Durable HTTP publishing against the warp hello reference, in one invocation: rounds
# of wrk POSTs (57-byte JSON, keep-alive) to warp hello's `POST /publish`, then to a
# fresh Herald's durable `POST /v1/channels/bench/messages` (fsynced before the 202),
# each server pinned to CPU 0 and wrk to CPU 1. Prints every round and Herald's rate as
# a share of hello's in the same round, with the flushes per second and publishes per
# flush (from the flush count in Herald's `herald.watermark`). Each round also runs
# Herald without its power-safe sync, for reference: `benches/nosync.c`, preloaded,
# turns `fdatasync` into a no-op (sled's own `sync_file_range` stays).
#
#   bash benches/wrk-publish.sh [ROUNDS] [SECONDS]     # make bench-publish; 3 rounds of 4 s
#
# Needs wrk and ../shared/bench (setup.sh builds warp hello, once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-4}
SHARED=${SHARED:-../shared}
BENCH_DIR=${BENCH_DIR:-/tmp/herald-bench}
HELLO=$BENCH_DIR/warp-hello/target/release/warp-hello
LUA=$SHARED/bench/load/post.lua
HELLO_PORT=${HELLO_PORT:-18330}
HERALD_PORT=${HERALD_PORT:-18331}

[ -x "$HELLO" ] || BENCH_DIR=$BENCH_DIR bash "$SHARED/bench/setup.sh"
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet
DATA=$(mktemp -d)
NOSYNC=$DATA/nosync.so
gcc -shared -fPIC -O2 -o "$NOSYNC" benches/nosync.c
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DATA"' EXIT

wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# wrk's requests per second with $1 connections against URL $2.
rate() {
  taskset -c 1 wrk -t1 -c"$1" -d"${SECS}s" -s "$LUA" "$2" | awk '/Requests\/sec/ { print int($2) }'
}

# The flush count and highest message id in a stopped Herald's watermark file $1 (the
# slot with more flushes): "flushes last_id".
watermark() {
  od -An -v -tu1 -w32 "$1" | awk '
    { f = 0; id = 0
      for (i = 5; i <= 12; i++) f = f * 256 + $i
      for (i = 13; i <= 20; i++) id = id * 256 + $i
      if (f > best) { best = f; last = id } }
    END { print best, last }'
}

# Starts Herald on a fresh data dir (with $1 preloaded, if given), runs wrk with 32 and
# 64 connections, stops it; prints "rate32 rate64 flushes/s publishes/flush".
herald_round() {
  rm -rf "$DATA/herald"
  # The body has no "type"; the channel must never fill during the run.
  HERALD_LAYER__CAPACITY=100000000 RUST_LOG=warn LD_PRELOAD=${1:-} taskset -c 0 \
    target/release/herald serve --listen "127.0.0.1:$HERALD_PORT" --data-dir "$DATA/herald" \
    --default-message-type notify >/dev/null 2>&1 &
  local server=$! rates=()
  wait_port "$HERALD_PORT"
  for conns in 32 64; do
    rates+=("$(rate "$conns" "http://127.0.0.1:$HERALD_PORT/v1/channels/bench/messages")")
  done
  stop "$server"
  read -r flushes last_id < <(watermark "$DATA/herald/herald.watermark")
  echo "${rates[0]} ${rates[1]} $((flushes / (2 * SECS))) $((last_id / (flushes > 0 ? flushes : 1)))"
}

ratios=()
for round in $(seq "$ROUNDS"); do
  PORT=$HELLO_PORT taskset -c 0 "$HELLO" >/dev/null 2>&1 &
  server=$!
  wait_port "$HELLO_PORT"
  hello=$(rate 32 "http://127.0.0.1:$HELLO_PORT/publish")
  stop "$server"

  read -r r32 r64 fps ppf < <(herald_round)
  read -r n32 n64 nfps nppf < <(herald_round "$NOSYNC")
  for r in "$r32" "$r64"; do ratios+=("$((100 * r / hello))"); done
  line="round $round: warp hello (32 connections) $hello req/s"
  line+="; Herald durable: 32 connections $r32 req/s ($((100 * r32 / hello)) %), 64: $r64 ($((100 * r64 / hello)) %),"
  line+=" $fps flushes/s, $ppf publishes per flush"
  line+="; without the power-safe sync: $n32 ($((100 * n32 / hello)) %), $n64 ($((100 * n64 / hello)) %), $nfps flushes/s, $nppf per flush"
  echo "$line"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
echo "Herald durable publish ÷ warp hello: median $median % over ${#ratios[@]} measurements (target: 50 %)"
