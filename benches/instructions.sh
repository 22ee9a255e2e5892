#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable for the same binary and
# inputs whatever else the machine is doing, so two builds can be compared where wrk's
# figures are lost in this machine's noise.
#
#   needs:  apt-get install valgrind nginx openssl     (and python3, a Rust toolchain)
#   run:    benches/instructions.sh [BINARY...]     (default: ./target/release/tollgate)
#           e.g. benches/instructions.sh /tmp/tollgate-before ./target/release/tollgate
#           UPSTREAM=https benches/instructions.sh ...   nginx over TLS (a private CA made
#           here with openssl), verified and kept alive; rustls's work is then counted too
#           DPOP=1 benches/instructions.sh ...   with DPoP-bound tokens (auth.dpop): a proof
#           signed for every request (nginx does not check it)
#           BY_CRATE=1 benches/instructions.sh ...   and where a request's instructions go:
#           each function's own cost, summed by the crate it belongs to (a generic
#           function goes to the first crate named in it other than core, alloc and std)
#           BY_FUNCTION=30 benches/instructions.sh ...   and the 30 functions that cost a
#           request the most, each by its own instructions
#           WORKERS=1 benches/instructions.sh ...   with one worker thread (default 2, this
#           machine's cores; one connection, so one of them serves)
#
# For each binary: tollgate (`serve --workers 2`, client_credentials from the simulated
# identity server) in front of nginx (`return 200`), under callgrind, answers N1 and then,
# in a fresh run, N2 GETs on one keep-alive connection. (I(N2) - I(N1)) / (N2 - N1) is the
# cost of one request, start-up and shutdown cancelled out.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/private_ca.sh
N1=${N1:-1000}
N2=${N2:-4000}
UPSTREAM_PORT=${UPSTREAM_PORT:-18180}
PROXY_PORT=${PROXY_PORT:-18182}
IDENTITY_PORT=${IDENTITY_PORT:-18183}
UPSTREAM=${UPSTREAM:-plain}
[ $# -gt 0 ] || set -- ./target/release/tollgate
for tool in valgrind nginx python3 openssl; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

work=$(mktemp -d)
sim=
cleanup() {
  [ -n "$sim" ] && kill "$sim" 2>/dev/null || true
  [ -f "$work/up.pid" ] && kill "$(cat "$work/up.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet --example sim
listen="127.0.0.1:$UPSTREAM_PORT"
url="http://127.0.0.1:$UPSTREAM_PORT"
trust=""
if [ "$UPSTREAM" = https ]; then
  make_private_ca "$work"
  listen="$listen ssl; ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key"
  url="https://localhost:$UPSTREAM_PORT"
  trust="ca_file = \"$work/ca.pem\""
fi
cat > "$work/up.conf" <<CONF
worker_processes 1; pid $work/up.pid; error_log $work/up.err warn;
events { worker_connections 1024; }
http { access_log off; server { listen $listen; keepalive_requests 1000000;
  location / { return 200 '{"ok":true}\n'; } } }
CONF
nginx -c "$work/up.conf" -e "$work/up.err"
dpop_flag=""
dpop_line=""
if [ "${DPOP:-0}" = 1 ]; then
  dpop_flag="--dpop"
  dpop_line="dpop = true"
fi
./target/release/examples/sim --identity "127.0.0.1:$IDENTITY_PORT" $dpop_flag > "$work/sim.out" &
sim=$!
for _ in $(seq 50); do grep -q '^seed ' "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
client_id=$(awk '/^client_id /{print $2}' "$work/sim.out")
client_secret=$(awk '/^client_secret /{print $2}' "$work/sim.out")

cat > "$work/client.py" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    c.request("GET", "/api/items?id=1")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY

count() { # binary requests -> instructions of the whole run
  rm -rf "$work/state"
  cat > "$work/t.toml" <<CONF
[state]
store = "file:$work/state"

[[upstream]]
name = "bench"
listen = "127.0.0.1:$PROXY_PORT"
url = "$url"
$trust

[upstream.auth]
grant = "client_credentials"
token_url = "http://127.0.0.1:$IDENTITY_PORT/token"
client_id = "$client_id"
client_secret = "$client_secret"
$dpop_line
CONF
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
    "$1" serve --workers "${WORKERS:-2}" -c "$work/t.toml" 2> "$work/vg.err" &
  local pid=$!
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$PROXY_PORT/" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 "$work/client.py" "$PROXY_PORT" "$2"
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/^summary:/{print $2}' "$work/cg.out"
  cp "$work/cg.out" "$work/cg.$2.out"
}

# Instructions per request by crate, from the two runs' profiles.
by_crate() { # N1-profile N2-profile
  python3 - "$1" "$2" "$((N2 - N1))" "${BY_FUNCTION:-0}" <<'PY'
import re, subprocess, sys
CRATES = ["tollgate", "hyper_util", "hyper", "h2", "httparse", "http_body", "http", "rustls",
          "aws_lc", "ring", "webpki", "tokio", "mio", "bytes", "tracing", "futures", "governor",
          "smallvec", "serde", "arc_swap"]
def annotate(path):
    return subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", "--show-percs=no", path],
                          capture_output=True, text=True).stdout.splitlines()
def costs(path):
    by = {}
    for line in annotate(path):
        m = re.match(r"\s*([\d,]+)\s+(.*)$", line)
        if not m or ":" not in m.group(2):
            continue
        n, name = int(m.group(1).replace(",", "")), m.group(2)
        found = [(name.find(c + "::"), c) for c in CRATES if c + "::" in name]
        if found:
            crate = min(found)[1]
        elif re.search(r"\b(core|alloc|std)::", name):
            crate = "core/alloc/std"
        elif re.search(r"mem(cpy|move|set|cmp)|malloc|free|realloc|_int_|calloc", name):
            crate = "libc (malloc, memcpy)"
        else:
            crate = "other"
        by[crate] = by.get(crate, 0) + n
    return by
def functions(path):
    by = {}
    for line in annotate(path):
        m = re.match(r"\s*([\d,]+)\s+\S+:(.*?)( \[.*\])?$", line)
        if m:
            by[m.group(2)] = by.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    return by
top = int(sys.argv[4])
a, b, n = (functions if top else costs)(sys.argv[1]), (functions if top else costs)(sys.argv[2]), int(sys.argv[3])
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
for per, k in list(reversed(rows))[: top or None]:
    if abs(per) >= (5 if top else 50):
        print(f"    {k[:110]:<110} {per:10,.0f}" if top else f"    {k:<24} {per:10,.0f}")
PY
}

printf '%-40s %14s %14s %12s\n' binary "I($N1)" "I($N2)" "Ir/request"
for bin in "$@"; do
  a=$(count "$bin" "$N1")
  b=$(count "$bin" "$N2")
  printf '%-40s %14s %14s %12s\n' "$bin" "$a" "$b" "$(( (b - a) / (N2 - N1) ))"
  if [ -n "${BY_CRATE:-}${BY_FUNCTION:-}" ]; then by_crate "$work/cg.$N1.out" "$work/cg.$N2.out"; fi
done
