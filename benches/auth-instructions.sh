#!/usr/bin/env bash
# The cost of access control in instructions, which other load on a shared machine does
# not move: a release Herald runs under callgrind (a token configured, default_access =
# "all") and answers N publishes over one keep-alive connection without a token, with a
# Bearer token, or with a Bearer JWT, and with a header of the same length that nothing
# reads (what the bytes on the wire cost). The figure is the instructions of serving that
# connection (hyper, the routes, the check, the layer; not timers, the sweep or the
# flusher thread) divided by N. Valgrind's CPU has no SHA extensions, so the SHA-256 of
# an opaque token is counted in software here (about 3,500 instructions); natively it
# runs on SHA-NI where the CPU has it.
#
#   bash benches/auth-instructions.sh [N]     # 2000
#   TARGET=/v1/channels/bench/messages bash benches/auth-instructions.sh   # durable sends
#
# Needs valgrind and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
PORT=${HERALD_PORT:-18351}
HERALD=${HERALD_BIN:-target/release/herald}
# A group without members: no write, the cheapest publish, where the check weighs most.
TARGET=${TARGET:-/v1/groups/nobody/messages}
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[ -n "${HERALD_BIN:-}" ] || cargo build --release --quiet
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

NEW=$("$HERALD" token new --name bench --publish '*' --subscribe '*' 2>/dev/null)
TOKEN=$(head -1 <<<"$NEW")
printf 'bench-jwt-secret\n' > "$DIR/jwt.secret"
JWT=$("$HERALD" token jwt --secret-file "$DIR/jwt.secret" --publish '*' --subscribe '*' --sub bench)
printf '[auth]\ndefault_access = "all"\njwt_secret = "bench-jwt-secret"\n%s\n' "$(tail -n +2 <<<"$NEW")" \
  > "$DIR/herald.toml"

# The server's instructions for $2 publishes with the header line $1 ("" for none).
instructions() {
  local out="$DIR/callgrind.out"
  rm -rf "$DIR/data" "$out"
  HERALD_LAYER__CAPACITY=100000000 RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$HERALD" serve --config "$DIR/herald.toml" --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" \
    >/dev/null 2>"$DIR/valgrind.log" &
  local server=$!
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
  done
  python3 - "$PORT" "$TARGET" "$1" "$2" <<'EOF'
import socket, sys
port, target, token, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
body = b'{"type":"bench","text":"a message of about fifty-seven bytes"}'
auth = f"{token}\r\n" if token else ""
request = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
s = socket.create_connection(("127.0.0.1", port))
buf = b""
for _ in range(n):
    s.sendall(request)
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 202"), head
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(buf) < length:
        buf += s.recv(65536)
    buf = buf[length:]
s.close()
EOF
  kill -TERM "$server"
  wait "$server" || true
  callgrind_annotate --inclusive=yes "$out" 2>/dev/null \
    | awk '!found && /herald::server::connection::serve::\{\{closure\}\}/ { gsub(",", "", $1); print $1; found = 1 }'
}

echo "instructions per publish, POST $TARGET ($N publishes on one connection, callgrind)"
echo "(x-padding: a header as long as the token's, that nothing reads: what the bytes cost)"
none=0
for kind in none x-padding/token token x-padding/jwt jwt; do
  case $kind in
    none) header="" ;;
    x-padding/token) header="X-Padding: Bearer $TOKEN" ;;
    token) header="Authorization: Bearer $TOKEN" ;;
    x-padding/jwt) header="X-Padding: Bearer $JWT" ;;
    jwt) header="Authorization: Bearer $JWT" ;;
  esac
  per=$(( $(instructions "$header" "$N") / N ))
  [ "$kind" = none ] && none=$per
  printf '%-16s %8d  %6.1f%%\n' "$kind" "$per" "$(echo "100 * $per / $none" | bc -l)"
done
