#!/usr/bin/env bash
# What access control costs, against one release Herald pinned to CPU 0 (load on CPU 1):
#  1. publishing: rounds of wrk POSTs (durable, as in wrk-publish.sh) without a token,
#     with an opaque Bearer token and with a Bearer JWT, one after the other on the same
#     server (a token configured, default_access = "all"), and each one's rate as a
#     share of the tokenless one in the same round;
#  2. a reconnect storm: 1,000 SSE connections (`?access_token=`) opened one after the
#     other with the same JWT, then 1,000 with a JWT each, timed, with the number of
#     signature checks the server logged (`verified a JWT signature`).
#
#   bash benches/wrk-auth.sh [ROUNDS] [SECONDS]     # make bench-auth; 4 rounds of 4 s
#
# Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
SECS=${2:-4}
PORT=${HERALD_PORT:-18341}
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
for _ in $(seq 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.05
done

rate() {
  taskset -c 1 wrk -t1 -c32 -d"${SECS}s" -s "$DIR/$1.lua" "http://127.0.0.1:$PORT/v1/channels/bench/messages" \
    | awk '/Non-2xx/ { bad = $NF } /Requests\/sec/ { rps = int($2) } END { if (bad) print "non-2xx:" bad; else print rps }'
}

echo "publish, wrk -t1 -c32 -d${SECS}s, durable POST /v1/channels/bench/messages (req/s)"
printf '%-6s %9s %9s %9s %8s %8s\n' round none token jwt token% jwt%
for round in $(seq "$ROUNDS"); do
  none=$(rate none); token=$(rate token); jwt_rate=$(rate jwt)
  printf '%-6s %9s %9s %9s %7.1f%% %7.1f%%\n' "$round" "$none" "$token" "$jwt_rate" \
    "$(echo "100 * $token / $none" | bc -l)" "$(echo "100 * $jwt_rate / $none" | bc -l)"
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
same=()
for _ in $(seq 1000); do same+=("$JWT"); done
echo "same JWT:     $(storm "${same[@]}"), signature checks: $(( $(verified) - before ))"
distinct=()
for i in $(seq 1000); do distinct+=("$(jwt "user$i")"); done
before=$(verified)
echo "1,000 JWTs:   $(storm "${distinct[@]}"), signature checks: $(( $(verified) - before ))"
