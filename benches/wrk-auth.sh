#!/usr/bin/env bash
# What access control costs, against one release Herald pinned to CPU 0 (load on CPU 1):
#  1. publishing: rounds of wrk POSTs (durable, as in wrk-publish.sh) without a token,
#     with an opaque Bearer token and with a Bearer JWT, one after the other on the same
#     server (a token configured, default_access = "all"): each one's rate, and the
#     server's CPU time per request, as a share of the tokenless run's in the same round;
#  2. a reconnect storm: 1,000 SSE connections (`?access_token=`) opened one after the
#     other with the same (fresh) JWT, then 1,000 with a JWT each, timed, with the number
#     of signature checks the server logged (`verified a JWT signature`).
#
#   bash benches/wrk-auth.sh [ROUNDS] [SECONDS]     # make bench-auth; 4 rounds of 4 s
#   TARGET=/v1/groups/nobody/messages bash benches/wrk-auth.sh 10 2
#
# Needs wrk, bc and python3. On a shared machine the rates move by ±25 %; for the
# cost of the check itself, benches/auth-instructions.sh counts instructions.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
SECS=${2:-4}
PORT=${HERALD_PORT:-18341}
# What is published to: a durable channel send by default; TARGET=/v1/groups/nobody/messages
# (a group without members: no write, the cheapest publish) shows the check's CPU alone.
TARGET=${TARGET:-/v1/channels/bench/messages}
HERALD=${HERALD_BIN:-target/release/herald}
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
[ -n "${HERALD_BIN:-}" ] || cargo build --release --quiet
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

NEW=$("$HERALD" token new --name bench --publish '*' --subscribe '*' 2>/dev/null)
TOKEN=$(head -1 <<<"$NEW")
printf 'bench-jwt-secret\n' > "$DIR/jwt.secret"
jwt() { "$HERALD" token jwt --secret-file "$DIR/jwt.secret" --publish '*' --subscribe '*' --sub "$1"; }
JWT=$(jwt bench)
printf '[auth]\ndefault_access = "all"\njwt_secret = "bench-jwt-secret"\n%s\n' "$(tail -n +2 <<<"$NEW")" \
  > "$DIR/herald.toml"

for kind in none token jwt; do
  case $kind in
    none) header="" ;;
    token) header="wrk.headers[\"Authorization\"] = \"Bearer $TOKEN\"" ;;
    jwt) header="wrk.headers[\"Authorization\"] = \"Bearer $JWT\"" ;;
  esac
  cat > "$DIR/$kind.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"type":"bench","text":"a message of about fifty-seven bytes"}'
wrk.headers["Content-Type"] = "application/json"
$header
EOF
done

HERALD_LAYER__CAPACITY=100000000 RUST_LOG=warn,herald::auth=debug taskset -c 0 "$HERALD" serve \
  --config "$DIR/herald.toml" --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" \
  >/dev/null 2>"$DIR/server.log" &
SERVER=$!
for _ in $(seq 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.05
done

# The server's CPU time so far (user + system, all threads), in clock ticks.
cpu() { awk '{ print $14 + $15 }' "/proc/$SERVER/stat"; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# "REQ_PER_S CPU_US_PER_REQUEST" of one wrk run with the headers of $1.
rate() {
  local before after out requests
  before=$(cpu)
  out=$(taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -s "$DIR/$1.lua" "http://127.0.0.1:$PORT$TARGET")
  after=$(cpu)
  if grep -q Non-2xx <<<"$out"; then echo "non-2xx answers: $out" >&2; exit 1; fi
  requests=$(awk '/requests in/ { print $1 }' <<<"$out")
  awk -v rps="$(awk '/Requests\/sec/ { print int($2) }' <<<"$out")" \
    -v cpu="$(( (after - before) * TICK_US ))" -v n="$requests" 'BEGIN { printf "%d %.2f\n", rps, cpu / n }'
}

echo "publish, wrk -t1 -c32 -d${SECS}s, POST $TARGET: req/s and the server's CPU per request"
printf '%-5s %-18s %-18s %-18s %10s %10s\n' round none token jwt token/none jwt/none
for round in $(seq "$ROUNDS"); do
  read -r n_rps n_cpu <<<"$(rate none)"
  read -r t_rps t_cpu <<<"$(rate token)"
  read -r j_rps j_cpu <<<"$(rate jwt)"
  printf '%-5s %6s %5.1fµs     %6s %5.1fµs     %6s %5.1fµs     %9.1f%% %9.1f%%\n' "$round" \
    "$n_rps" "$n_cpu" "$t_rps" "$t_cpu" "$j_rps" "$j_cpu" \
    "$(echo "100 * $t_cpu / $n_cpu" | bc -l)" "$(echo "100 * $j_cpu / $n_cpu" | bc -l)"
done

storm() {
  taskset -c 1 python3 - "$PORT" "$@" <<'EOF'
import socket, sys, time
port, tokens = int(sys.argv[1]), sys.argv[2:]
start = time.monotonic()
for token in tokens:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET /v1/channels/storm/events?access_token={token} HTTP/1.1\r\n"
              f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    s.close()
print(f"{len(tokens)} connects in {time.monotonic() - start:.3f} s")
EOF
}
verified() { grep -c "verified a JWT signature" "$DIR/server.log" || true; }

echo
echo "reconnect storm: SSE connects, one after the other, token in ?access_token="
before=$(verified)
fresh=$(jwt storm)
same=()
for _ in $(seq 1000); do same+=("$fresh"); done
echo "same JWT:     $(storm "${same[@]}"), signature checks: $(( $(verified) - before ))"
distinct=()
for i in $(seq 1000); do distinct+=("$(jwt "user$i")"); done
before=$(verified)
echo "1,000 JWTs:   $(storm "${distinct[@]}"), signature checks: $(( $(verified) - before ))"
